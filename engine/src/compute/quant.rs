//! Quantized weight matrices and the integer kernels that stream them.
//!
//! Four formats with GGML's arithmetic: q8_0 (blocks of 32 weights, one f16 scale, 8-bit
//! values: 8.5 bits a weight), q6 (the same blocks with 6-bit values: 6.5 bits a weight),
//! q5_0 (5-bit values: 5.5 bits a weight) and q4_0 (4-bit values: 4.5 bits a weight, the
//! format the GPU path calls q4). q6 is not one of GGML's formats (its 6-bit one is the
//! k-quant q6_K, 6.56 bits a weight in blocks of 16 under 8-bit scales): it is q5_0's
//! block and rounding with 64 levels, so every format here shares one layout and one
//! kernel shape. A product quantizes each activation row
//! once to 8-bit blocks, takes every block's dot product in integers and scales it by
//! both scales, as llama.cpp's CPU kernels do. Written here rather than through candle's
//! `QMatMul` because candle's kernels are compute-bound at batch 1 (q4k barely beats q8_0
//! though it reads half the bytes): these read each weight row once from memory for any
//! number of activation rows (taken two at a time while four weight rows sit in L1).
//!
//! Instruction sets, chosen at run time ([`Isa::detect`]; `PARLEY_CPU_ISA=portable|avx2`
//! forces a lower one): AVX-512 VNNI (`vpdpbusd`, 64 weights per instruction), AVX2
//! (`vpmaddubsw` + `vpmaddwd`), ARM NEON with the dot-product extension (`sdot`, ARMv8.2:
//! Apple M1 and later, Graviton 2 and later), and portable Rust, which the others are
//! tested against beside an f64 definition.
//!
//! Storage, repacked for the kernels (as llama.cpp repacks for its CPU kernels): rows in
//! groups of four (padded with zero rows), each group a run of super-blocks of 16 blocks
//! per row. A super-block holds the four rows' 16 f16 scales (128 bytes), then each row's
//! values transposed so that one 64-byte vector holds four consecutive values of each of
//! the 16 blocks: 32-bit lane `l` of every vector belongs to block `l`. Eight integer
//! dot-product instructions then leave each block's whole dot product in its own lane, and
//! the scales are applied once per 16 blocks (one conversion, one multiply, one FMA)
//! instead of once per block; the four rows' vectors lie side by side, so a product reads
//! one sequential stream, which the hardware prefetchers follow at full rate. Values are
//! unsigned, `q + 128` for q8_0, `q + 8` for q4_0, `q + 16` for q5_0 and `q + 32` for q6
//! (q4_0, q5_0 and q6 pack two vectors into one: the even one in the low nibbles, the odd
//! one in the high ones; the bits above the nibbles follow each row's nibbles as planes of
//! 64-byte vectors per super-block: q5_0 has one, whose byte `p` holds in bit `k` the
//! fifth bit of byte `p` of value vector `k`; q6 has two, plane `j` holding in bits `2i`
//! and `2i + 1` of byte `p` the two high bits of byte `p` of value vector `4j + i`), so
//! `vpdpbusd` multiplies them directly; the offset times each activation block's sum
//! starts the accumulator.
//! Blocks past a row's end are zero.

use half::f16;

use crate::{Error, Result};

/// Weights per block (GGML's QK8_0 and QK4_0).
pub const BLOCK: usize = 32;
/// Blocks per row in a super-block.
const SUPER: usize = 16;
/// Rows stored together.
const GROUP: usize = 4;
/// Bytes of the scales at the head of a super-block.
const SCALE_BYTES: usize = GROUP * SUPER * 2;
/// Bytes of one vector: four values of each block of a super-block.
const VEC: usize = SUPER * 4;
/// Activation vectors per super-block (a block's 32 values, four per lane).
const VECS: usize = BLOCK / 4;

/// A quantized format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    Q8_0,
    Q4_0,
    /// GGML's q5_0 arithmetic (5-bit values, 5.5 bits a weight): q4_0's nibbles plus a
    /// plane of fifth bits.
    Q5_0,
    /// q5_0's arithmetic with 6-bit values (6.5 bits a weight): q4_0's nibbles plus two
    /// planes of the two high bits. Not a GGML format.
    Q6,
}

impl QFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q5_0 => "q5_0",
            Self::Q6 => "q6",
        }
    }

    /// Bits per value.
    const fn bits(self) -> u32 {
        match self {
            Self::Q8_0 => 8,
            Self::Q4_0 => 4,
            Self::Q5_0 => 5,
            Self::Q6 => 6,
        }
    }

    /// What is added to a value to store it unsigned.
    const fn offset(self) -> i32 {
        1 << (self.bits() - 1)
    }

    /// Stored nibble or byte vectors per row and super-block (the nibble formats pack two
    /// in one).
    const fn chunks(self) -> usize {
        match self {
            Self::Q8_0 => VECS,
            _ => VECS / 2,
        }
    }

    /// Bits of each value above its nibble, kept in planes after the nibbles.
    const fn high_bits(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q4_0 => 0,
            Self::Q5_0 => 1,
            Self::Q6 => 2,
        }
    }

    /// 64-byte plane vectors per row and super-block: the high bits of the eight value
    /// vectors.
    const fn planes(self) -> usize {
        self.high_bits()
    }

    /// Which plane holds the high bits of value vector `k`, and at which bit of its bytes
    /// they start.
    const fn high_at(self, k: usize) -> (usize, usize) {
        let h = self.high_bits();
        let per_plane = 8 / h;
        (k / per_plane, k % per_plane * h)
    }

    /// Bytes per block as GGML stores it (values and an f16 scale), for sizing (q6, which
    /// GGML has not: its 6 bits a value and the scale).
    pub fn ggml_block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => BLOCK + 2,
            Self::Q4_0 => BLOCK / 2 + 2,
            Self::Q5_0 => BLOCK / 2 + 4 + 2,
            Self::Q6 => BLOCK * 3 / 4 + 2,
        }
    }
}

/// The instruction set a product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust: the definition, and the path of CPUs without the others.
    Portable,
    /// AVX2, FMA and F16C.
    Avx2,
    /// AVX-512 (F, BW, VL) with VNNI, plus the AVX2 set.
    Avx512Vnni,
    /// ARMv8.2 NEON with the dot-product extension (`sdot`).
    NeonDot,
}

impl Isa {
    /// The best this CPU offers, or a lower one forced by `PARLEY_CPU_ISA` (`portable`,
    /// `avx2` on x86), never a higher one.
    pub fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            let best = Self::available()
                .into_iter()
                .last()
                .unwrap_or(Self::Portable);
            match std::env::var("PARLEY_CPU_ISA").ok().as_deref() {
                None => best,
                Some("portable") => Self::Portable,
                Some("avx2") if Self::Avx2.supported() => Self::Avx2,
                Some(other) => {
                    // (Not `eprintln!`, which panics when stderr cannot be written.)
                    use std::io::Write as _;
                    let _ = writeln!(
                        std::io::stderr(),
                        "PARLEY_CPU_ISA={other} ignored: expected portable or avx2 (a set \
                         this CPU has); using {}",
                        best.name()
                    );
                    best
                }
            }
        })
    }

    /// Every set this CPU can run, lowest first.
    pub fn available() -> Vec<Self> {
        [Self::Portable, Self::NeonDot, Self::Avx2, Self::Avx512Vnni]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }

    /// Whether this CPU has the instructions.
    pub fn supported(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Vnni => {
                Self::Avx2.supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Self::NeonDot => std::arch::is_aarch64_feature_detected!("dotprod"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512Vnni => "avx512-vnni",
            Self::NeonDot => "neon-dotprod",
        }
    }
}

/// A `[rows, cols]` matrix in q8_0, q5_0 or q4_0 blocks (see the module's notes on the layout).
#[derive(Debug, Clone)]
pub struct QMatrix {
    format: QFormat,
    rows: usize,
    cols: usize,
    /// Super-blocks per row.
    supers: usize,
    q: Vec<u8>,
}

/// GGML's q8_0 rounding of one block: scale `max|x| / 127`, values rounded to nearest,
/// ties to even (as GGML's SIMD quantizers round).
/// Returns the scale; `q` gets the signed values.
fn quantize_block_q8(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        // Round to nearest even by the float adder (exact for |x| < 2^22); `round_ties_even`
        // is a library call on baseline x86-64 and kept this loop scalar.
        const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
        let r = ((v * inv).clamp(-127.0, 127.0) + MAGIC) - MAGIC;
        *q = r as i8;
    }
    d
}

/// GGML's q4_0 and q5_0 rounding of one block, for `bits` of 4, 5 or 6 (q6 the same with
/// 64 levels): the value of largest magnitude maps to `-2^(bits-1)`, the rest round half
/// up into `0..2^bits` (stored `q + 2^(bits-1)`). Returns the scale.
fn quantize_block_signed(x: &[f32], q: &mut [u8], bits: u32) -> f32 {
    let half = (1u32 << (bits - 1)) as f32;
    let max = x
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -half;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((v * inv + half + 0.5).clamp(0.0, 2.0 * half - 1.0)) as u8;
    }
    d
}

impl QMatrix {
    fn empty(format: QFormat, rows: usize, cols: usize) -> Result<Self> {
        if rows == 0 || cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(Error::InvalidInput(format!(
                "{} needs rows of whole 32-weight blocks, not {rows} x {cols}",
                format.name()
            )));
        }
        let supers = (cols / BLOCK).div_ceil(SUPER);
        let mut m = Self {
            format,
            rows,
            cols,
            supers,
            q: vec![],
        };
        // Zero values (the offset) everywhere, zero scales.
        // (q5_0's 16 is a high bit of 1 over a zero nibble: planes of ones; q6's 32 is
        // high bits 0b10 over a zero nibble: planes of 0b10101010.)
        let (pad, plane_pad) = match format {
            QFormat::Q8_0 => (0x80, 0),
            QFormat::Q4_0 => (0x88, 0),
            QFormat::Q5_0 => (0x00, 0xFF),
            QFormat::Q6 => (0x00, 0xAA),
        };
        m.q = vec![pad; rows.div_ceil(GROUP) * m.group_bytes()];
        let planes = SCALE_BYTES + format.chunks() * GROUP * VEC;
        let plane_bytes = format.planes() * GROUP * VEC;
        for g in 0..rows.div_ceil(GROUP) {
            for sb in 0..supers {
                let at = m.super_at(g, sb);
                m.q[at..at + SCALE_BYTES].fill(0);
                m.q[at + planes..at + planes + plane_bytes].fill(plane_pad);
            }
        }
        Ok(m)
    }

    fn super_bytes(&self) -> usize {
        SCALE_BYTES + (self.format.chunks() + self.format.planes()) * GROUP * VEC
    }

    fn group_bytes(&self) -> usize {
        self.supers * self.super_bytes()
    }

    /// Where super-block `sb` of row group `g` starts.
    fn super_at(&self, g: usize, sb: usize) -> usize {
        g * self.group_bytes() + sb * self.super_bytes()
    }

    /// Where the scale of block `b` of row `r` is.
    fn scale_at(&self, r: usize, b: usize) -> usize {
        self.super_at(r / GROUP, b / SUPER) + (r % GROUP * SUPER + b % SUPER) * 2
    }

    /// Where value `e` of block `b` of row `r` is, and whether it is the high nibble.
    fn value_at(&self, r: usize, b: usize, e: usize) -> (usize, bool) {
        let (k, lane_byte) = (e / 4, b % SUPER * 4 + e % 4);
        let (chunk, high) = match self.format {
            QFormat::Q8_0 => (k, false),
            _ => (k / 2, k % 2 == 1),
        };
        let at = self.super_at(r / GROUP, b / SUPER)
            + SCALE_BYTES
            + (chunk * GROUP + r % GROUP) * VEC
            + lane_byte;
        (at, high)
    }

    /// Where the high bits of value `e` of block `b` of row `r` are (q5_0, q6): the byte,
    /// and the bit they start at (see the module's notes).
    fn plane_at(&self, r: usize, b: usize, e: usize) -> (usize, u32) {
        let (k, lane_byte) = (e / 4, b % SUPER * 4 + e % 4);
        let (plane, shift) = self.format.high_at(k);
        let at = self.super_at(r / GROUP, b / SUPER)
            + SCALE_BYTES
            + ((self.format.chunks() + plane) * GROUP + r % GROUP) * VEC
            + lane_byte;
        (at, shift as u32)
    }

    fn scale(&self, r: usize, b: usize) -> f16 {
        let at = self.scale_at(r, b);
        f16::from_le_bytes([self.q[at], self.q[at + 1]])
    }

    fn set_scale(&mut self, r: usize, b: usize, d: f16) {
        let at = self.scale_at(r, b);
        self.q[at..at + 2].copy_from_slice(&d.to_le_bytes());
    }

    /// Stores block `b` of row `r` from its unsigned values (0..=255 for q8_0, 0..=15 for
    /// q4_0, 0..=31 for q5_0, 0..=63 for q6).
    fn set_block(&mut self, r: usize, b: usize, vals: &[u8; BLOCK]) {
        for (e, &v) in vals.iter().enumerate() {
            let (at, high) = self.value_at(r, b, e);
            let o = &mut self.q[at];
            *o = match (self.format, high) {
                (QFormat::Q8_0, _) => v,
                (_, false) => (*o & 0xF0) | (v & 0x0F),
                (_, true) => (*o & 0x0F) | (v << 4),
            };
            if self.format.planes() > 0 {
                let (at, shift) = self.plane_at(r, b, e);
                let mask = (1u8 << self.format.high_bits()) - 1;
                self.q[at] = (self.q[at] & !(mask << shift)) | ((v >> 4) & mask) << shift;
            }
        }
    }

    /// The signed values of block `b` of row `r`.
    fn block(&self, r: usize, b: usize, out: &mut [i8; BLOCK]) {
        for (e, o) in out.iter_mut().enumerate() {
            let (at, high) = self.value_at(r, b, e);
            let v = self.q[at];
            let nibble = if high { v >> 4 } else { v & 0x0F } as i8;
            *o = match self.format {
                QFormat::Q8_0 => (v ^ 0x80) as i8,
                QFormat::Q4_0 => nibble - 8,
                QFormat::Q5_0 | QFormat::Q6 => {
                    let (at, shift) = self.plane_at(r, b, e);
                    let mask = (1u8 << self.format.high_bits()) - 1;
                    let high = (self.q[at] >> shift) & mask;
                    (nibble as u8 | high << 4) as i8 - self.format.offset() as i8
                }
            };
        }
    }

    /// Quantizes row-major `w` (`cols` a multiple of 32).
    pub fn quantize(w: &[f32], rows: usize, cols: usize, format: QFormat) -> Result<Self> {
        if w.len() != rows * cols {
            return Err(Error::InvalidInput(format!(
                "{} values for a {rows} x {cols} matrix",
                w.len()
            )));
        }
        Self::quantize_rows(rows, cols, format, |r, out| {
            out.copy_from_slice(&w[r * cols..(r + 1) * cols])
        })
    }

    /// Quantizes a matrix whose row `r` `row(r, out)` writes as f32, one row at a time (so
    /// a bf16 matrix is never widened whole).
    pub fn quantize_rows(
        rows: usize,
        cols: usize,
        format: QFormat,
        mut row: impl FnMut(usize, &mut [f32]),
    ) -> Result<Self> {
        let mut m = Self::empty(format, rows, cols)?;
        let mut vals = [0i8; BLOCK];
        let mut stored = [0u8; BLOCK];
        let mut buf = vec![0f32; cols];
        for r in 0..rows {
            row(r, &mut buf);
            for (b, x) in buf.chunks_exact(BLOCK).enumerate() {
                let d = match format {
                    QFormat::Q8_0 => {
                        let d = quantize_block_q8(x, &mut vals);
                        for (o, &v) in stored.iter_mut().zip(&vals) {
                            *o = (v as u8) ^ 0x80;
                        }
                        d
                    }
                    _ => quantize_block_signed(x, &mut stored, format.bits()),
                };
                m.set_scale(r, b, f16::from_f32(d));
                m.set_block(r, b, &stored);
            }
        }
        Ok(m)
    }

    /// Takes GGML blocks as a GGUF file stores them (q8_0: an f16 scale and 32 int8
    /// values; q4_0: an f16 scale and 16 bytes holding value `k` in the low nibble of
    /// byte `k` and value `k + 16` in the high one): nothing is rounded again.
    pub fn from_ggml(bytes: &[u8], rows: usize, cols: usize, format: QFormat) -> Result<Self> {
        if format == QFormat::Q6 {
            return Err(Error::InvalidInput(
                "q6 is not a GGML block format: its matrices are quantized from f32 or bf16".into(),
            ));
        }
        let mut m = Self::empty(format, rows, cols)?;
        let per = format.ggml_block_bytes();
        let blocks = cols / BLOCK;
        if bytes.len() != rows * blocks * per {
            return Err(Error::InvalidInput(format!(
                "{} bytes of {} blocks for a {rows} x {cols} matrix ({} expected)",
                bytes.len(),
                format.name(),
                rows * blocks * per
            )));
        }
        let mut stored = [0u8; BLOCK];
        for (i, blk) in bytes.chunks_exact(per).enumerate() {
            let (r, b) = (i / blocks, i % blocks);
            m.set_scale(r, b, f16::from_le_bytes([blk[0], blk[1]]));
            match format {
                QFormat::Q8_0 => {
                    for (o, &v) in stored.iter_mut().zip(&blk[2..]) {
                        *o = v ^ 0x80;
                    }
                }
                QFormat::Q4_0 => {
                    for (k, &v) in blk[2..].iter().enumerate() {
                        stored[k] = v & 0x0F;
                        stored[k + 16] = v >> 4;
                    }
                }
                QFormat::Q5_0 => {
                    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                    for (k, &v) in blk[6..].iter().enumerate() {
                        stored[k] = (v & 0x0F) | (((qh >> k) & 1) << 4) as u8;
                        stored[k + 16] = (v >> 4) | (((qh >> (k + 16)) & 1) << 4) as u8;
                    }
                }
                QFormat::Q6 => unreachable!("refused above"),
            }
            m.set_block(r, b, &stored);
        }
        Ok(m)
    }

    pub fn format(&self) -> QFormat {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes one product reads.
    pub fn size_in_bytes(&self) -> usize {
        self.q.len()
    }

    /// The weights as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        let mut vals = [0i8; BLOCK];
        for r in 0..self.rows {
            for b in 0..self.cols / BLOCK {
                let d = self.scale(r, b).to_f32();
                self.block(r, b, &mut vals);
                out.extend(vals.iter().map(|&v| v as f32 * d));
            }
        }
        out
    }

    /// `out[i][j] = sum_k w[j][k] * x[i][k]` for `m` rows of `x` (`x @ w^T`), on the best
    /// instruction set of this CPU.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.matmul_t_with(x, m, Isa::detect())
    }

    /// [`Self::matmul_t`] on a chosen instruction set (tests and benchmarks compare them).
    pub fn matmul_t_with(&self, x: &[f32], m: usize, isa: Isa) -> Result<Vec<f32>> {
        if x.len() != m * self.cols {
            return Err(Error::InvalidInput(format!(
                "matmul: {} values for {m} rows of {}",
                x.len(),
                self.cols
            )));
        }
        if !isa.supported() {
            return Err(Error::InvalidInput(format!(
                "this CPU cannot run the {} kernels",
                isa.name()
            )));
        }
        if m == 0 {
            return Ok(vec![]);
        }
        let acts = Acts::quantize(x, m, self.cols, self.supers, self.format.offset());
        // `out_t` is [rows][m], padded to whole groups: each thread writes one contiguous
        // block of it.
        let groups = self.rows.div_ceil(GROUP);
        let mut out_t = vec![0f32; groups * GROUP * m];
        let threads = rayon::current_num_threads();
        let run = |g0: usize, out: &mut [f32]| match isa {
            Isa::Portable => portable_groups(self, g0, &acts, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512Vnni => x86::groups(isa, self, g0, &acts, out),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => arm::groups(self, g0, &acts, out),
            #[allow(unreachable_patterns)]
            _ => portable_groups(self, g0, &acts, out),
        };
        if self.rows * self.cols < super::cpu::PARALLEL_MIN_WEIGHTS || threads == 1 {
            run(0, &mut out_t);
        } else {
            // A few runs of whole groups per thread; four groups (16 rows) keep the blocks
            // of `out_t` on separate cache lines.
            let per = groups.div_ceil(threads * 8).next_multiple_of(4);
            super::team::chunks_mut(&mut out_t, per * GROUP * m, |c, out| run(c * per, out));
        }
        out_t.truncate(self.rows * m);
        Ok(super::cpu::transpose(out_t, self.rows, m))
    }
}

/// Activation rows quantized to q8_0 blocks (padded with zeros to whole super-blocks),
/// laid out as the weights are (each super-block as eight vectors of four values per
/// block), with each block's scale and its bias `-offset * (sum of its values)`.
struct Acts {
    m: usize,
    /// Blocks per row, padded.
    blocks: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
    /// Read by the x86 kernels (the ARM one makes the values signed instead).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    bias: Vec<i32>,
}

impl Acts {
    fn quantize(x: &[f32], m: usize, cols: usize, supers: usize, offset: i32) -> Self {
        let blocks = supers * SUPER;
        let width = blocks * BLOCK;
        let mut q = vec![0i8; m * width];
        let mut scale = vec![0f32; m * blocks];
        let mut bias = vec![0i32; m * blocks];
        let mut qb = [0i8; BLOCK];
        for (i, row) in x.chunks_exact(cols).enumerate() {
            for (b, xb) in row.chunks_exact(BLOCK).enumerate() {
                scale[i * blocks + b] = quantize_block_q8(xb, &mut qb);
                bias[i * blocks + b] = -offset * qb.iter().map(|&v| v as i32).sum::<i32>();
                let sb = i * width + b / SUPER * SUPER * BLOCK + b % SUPER * 4;
                for (k, quad) in qb.chunks_exact(4).enumerate() {
                    q[sb + k * VEC..sb + k * VEC + 4].copy_from_slice(quad);
                }
            }
        }
        Self {
            m,
            blocks,
            q,
            scale,
            bias,
        }
    }

    fn q_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.q)
    }
}

/// The same arithmetic in plain Rust, over the same layout: every block's dot product in
/// integers, scaled by both scales, summed in f32. Row groups `g0..` of `w` into `out_t`
/// (`[rows][m]`).
fn portable_groups(w: &QMatrix, g0: usize, acts: &Acts, out_t: &mut [f32]) {
    let m = acts.m;
    let width = acts.blocks * BLOCK;
    let offset = w.format.offset();
    for (g, out) in out_t.chunks_exact_mut(GROUP * m).enumerate() {
        out.fill(0.0);
        for sb in 0..w.supers {
            let base = w.super_at(g0 + g, sb);
            for r in 0..GROUP {
                let mut vals = [[0i32; VEC]; VECS];
                for (c, chunk) in (0..w.format.chunks()).map(|c| {
                    let at = base + SCALE_BYTES + (c * GROUP + r) * VEC;
                    (c, &w.q[at..at + VEC])
                }) {
                    for (p, &v) in chunk.iter().enumerate() {
                        if w.format == QFormat::Q8_0 {
                            vals[c][p] = v as i32;
                        } else {
                            vals[2 * c][p] = (v & 0x0F) as i32;
                            vals[2 * c + 1][p] = (v >> 4) as i32;
                        }
                    }
                }
                if w.format.planes() > 0 {
                    let mask = (1u8 << w.format.high_bits()) - 1;
                    for (k, vk) in vals.iter_mut().enumerate() {
                        let (j, shift) = w.format.high_at(k);
                        let plane =
                            base + SCALE_BYTES + ((w.format.chunks() + j) * GROUP + r) * VEC;
                        for (p, v) in vk.iter_mut().enumerate() {
                            *v += (((w.q[plane + p] >> shift) & mask) << 4) as i32;
                        }
                    }
                }
                for i in 0..m {
                    let xq = &acts.q[i * width + sb * SUPER * BLOCK..][..SUPER * BLOCK];
                    let mut dots = [0i32; SUPER];
                    for (k, wv) in vals.iter().enumerate() {
                        for (p, &wv) in wv.iter().enumerate() {
                            dots[p / 4] += (wv - offset) * xq[k * VEC + p] as i32;
                        }
                    }
                    let mut sum = 0f32;
                    for (l, &dot) in dots.iter().enumerate() {
                        let b = sb * SUPER + l;
                        let dw = f16::from_le_bytes([
                            w.q[base + (r * SUPER + l) * 2],
                            w.q[base + (r * SUPER + l) * 2 + 1],
                        ]);
                        sum += dw.to_f32() * acts.scale[i * acts.blocks + b] * dot as f32;
                    }
                    out[r * m + i] += sum;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    //! The x86 kernels. `unsafe` is allowed here for three things only: calling a
    //! `#[target_feature]` function, after [`Isa::supported`] has checked that this CPU
    //! has every feature it enables (`matmul_t_with` refuses an unsupported set before any
    //! kernel runs); unaligned SIMD loads from slices whose bounds are checked by slicing
    //! first; prefetches, which cannot fault.
    use std::arch::x86_64::*;

    use super::{Acts, Isa, QFormat, QMatrix, BLOCK, GROUP, SCALE_BYTES, SUPER, VEC, VECS};

    /// Row groups `g0..` of `w` into `out_t` (`[rows][m]`, whole groups) on `isa` (AVX2 or
    /// AVX-512 VNNI).
    pub(super) fn groups(isa: Isa, w: &QMatrix, g0: usize, acts: &Acts, out_t: &mut [f32]) {
        let n = out_t.len() / (acts.m * GROUP);
        // SAFETY: `isa` was checked by `Isa::supported` in `matmul_t_with`, so every
        // feature the kernels enable is present.
        unsafe {
            match (isa, w.format) {
                (Isa::Avx512Vnni, QFormat::Q8_0) => avx512_groups::<Q8>(w, g0, n, acts, out_t),
                (Isa::Avx512Vnni, QFormat::Q4_0) => avx512_groups::<Q4>(w, g0, n, acts, out_t),
                (Isa::Avx512Vnni, QFormat::Q5_0) => avx512_groups::<Q5>(w, g0, n, acts, out_t),
                (Isa::Avx512Vnni, QFormat::Q6) => avx512_groups::<Q6>(w, g0, n, acts, out_t),
                (_, QFormat::Q8_0) => avx2_groups::<Q8>(w, g0, n, acts, out_t),
                (_, QFormat::Q4_0) => avx2_groups::<Q4>(w, g0, n, acts, out_t),
                (_, QFormat::Q5_0) => avx2_groups::<Q5>(w, g0, n, acts, out_t),
                (_, QFormat::Q6) => avx2_groups::<Q6>(w, g0, n, acts, out_t),
            }
        }
    }

    /// The kernels' format parameter: bytes, nibbles, nibbles with a plane of fifth bits,
    /// nibbles with two planes of sixth and fifth bits.
    const Q8: u8 = 0;
    const Q4: u8 = 1;
    const Q5: u8 = 2;
    const Q6: u8 = 3;

    /// The format `F` stands for.
    const fn format(f: u8) -> QFormat {
        match f {
            Q8 => QFormat::Q8_0,
            Q4 => QFormat::Q4_0,
            Q5 => QFormat::Q5_0,
            _ => QFormat::Q6,
        }
    }

    /// Stored vectors per row and super-block for format `F`.
    const fn chunks(f: u8) -> usize {
        format(f).chunks()
    }

    /// Where row `r`'s plane `j` of super-block `base` is.
    fn plane_at(f: u8, base: usize, j: usize, r: usize) -> usize {
        base + SCALE_BYTES + ((chunks(f) + j) * GROUP + r) * VEC
    }

    /// Activation rows taken together against a row group (their accumulators stay in
    /// registers).
    const ACT_CHUNK: usize = 2;

    /// Calls `kernel(job, rows)` for every row group and chunk of activation rows.
    macro_rules! each_job {
        ($w:expr, $g0:expr, $n:expr, $acts:expr, |$job:ident, $mc:ident| $body:expr) => {
            for g in 0..$n {
                let mut i = 0;
                while i < $acts.m {
                    let $mc = ($acts.m - i).min(ACT_CHUNK);
                    let $job = Job {
                        w: $w,
                        group: $g0 + g,
                        out_row: g * GROUP,
                        acts: $acts,
                        i0: i,
                    };
                    $body;
                    i += $mc;
                }
            }
        };
    }

    /// `$name::<F>(w, g0, n, acts, out_t)`: every row group and chunk of activation rows
    /// through `$kernel`, compiled with `$features` (the kernel's own, so it inlines).
    macro_rules! groups_fn {
        ($name:ident, $kernel:ident, $features:literal) => {
            #[target_feature(enable = $features)]
            fn $name<const F: u8>(
                w: &QMatrix,
                g0: usize,
                n: usize,
                acts: &Acts,
                out_t: &mut [f32],
            ) {
                each_job!(w, g0, n, acts, |job, mc| if mc == 1 {
                    $kernel::<F, 1>(&job, out_t)
                } else {
                    $kernel::<F, ACT_CHUNK>(&job, out_t)
                });
            }
        };
    }

    groups_fn!(
        avx512_groups,
        avx512,
        "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"
    );
    groups_fn!(avx2_groups, avx2, "avx2,fma,f16c");

    /// One row group against `M` activation rows from `i0`.
    struct Job<'a> {
        w: &'a QMatrix,
        group: usize,
        out_row: usize,
        acts: &'a Acts,
        i0: usize,
    }

    /// How far ahead of the bytes being read the kernels prefetch, for format `F`. Measured
    /// on the Intel Xeon VM (stt-1b-en_fr, three runs each way, interleaved): q8_0 steps on
    /// two threads 32.0 ms at 2 KB against 33.2 at 4 KB (one thread 61 against 62.5); the
    /// nibble formats no better at 2 KB (q4 18.9 against 18.4 ms), so they keep 4 KB.
    const fn ahead(f: u8) -> usize {
        if f == Q8 {
            2048
        } else {
            4096
        }
    }

    #[inline(always)]
    fn load128(s: &[u8], at: usize) -> __m128i {
        let s = &s[at..at + 16];
        // SAFETY: `s` holds the 16 bytes read; the load is unaligned.
        unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
    }

    #[inline(always)]
    fn load256(s: &[u8], at: usize) -> __m256i {
        let s = &s[at..at + 32];
        // SAFETY: `s` holds the 32 bytes read; the load is unaligned.
        unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
    }

    #[inline(always)]
    fn load512(s: &[u8], at: usize) -> __m512i {
        let s = &s[at..at + 64];
        // SAFETY: as `load256`, 64 bytes. Only called from AVX-512 kernels.
        unsafe { _mm512_loadu_si512(s.as_ptr().cast()) }
    }

    /// Asks for the line at `s[at]` (which may lie past the end: a prefetch never faults).
    #[inline(always)]
    fn prefetch(s: &[u8], at: usize) {
        let p = s.as_ptr().wrapping_add(at);
        // SAFETY: a prefetch reads nothing into the program and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
    }

    /// `p` with the bits from `at` of each byte moved to bit 4 (16-bit shifts: the bits
    /// that cross into a neighbouring byte land outside bits 4-5, which are all that is
    /// kept).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    fn shift_to_bit4_512(p: __m512i, at: usize) -> __m512i {
        if at <= 4 {
            _mm512_sll_epi16(p, _mm_cvtsi32_si128(4 - at as i32))
        } else {
            _mm512_srl_epi16(p, _mm_cvtsi32_si128(at as i32 - 4))
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    #[inline]
    fn avx512<const F: u8, const M: usize>(job: &Job, out_t: &mut [f32]) {
        let (w, acts) = (job.w, job.acts);
        let width = acts.blocks * BLOCK;
        let xq = acts.q_bytes();
        let xs: &[u8] = bytemuck::cast_slice(&acts.scale);
        let xb: &[u8] = bytemuck::cast_slice(&acts.bias);
        let low = _mm512_set1_epi8(0x0F);
        let bit4 = _mm512_set1_epi8(0x10);
        let mut acc = [[_mm512_setzero_ps(); M]; GROUP];
        for sb in 0..w.supers {
            let base = w.super_at(job.group, sb);
            for line in (0..w.super_bytes()).step_by(64) {
                prefetch(&w.q, base + line + ahead(F));
            }
            let b0 = sb * SUPER;
            // Each lane starts at its block's bias (the offset times the block's sum).
            let mut dot = [[_mm512_setzero_si512(); M]; GROUP];
            let mut x = [[_mm512_setzero_si512(); VECS]; M];
            for i in 0..M {
                let ai = job.i0 + i;
                let bias = load512(xb, (ai * acts.blocks + b0) * 4);
                for d in dot.iter_mut() {
                    d[i] = bias;
                }
                for (k, v) in x[i].iter_mut().enumerate() {
                    *v = load512(xq, ai * width + b0 * BLOCK + k * VEC);
                }
            }
            let planes: [[__m512i; 2]; GROUP] = std::array::from_fn(|r| {
                std::array::from_fn(|j| {
                    if j < format(F).planes() {
                        load512(&w.q, plane_at(F, base, j, r))
                    } else {
                        _mm512_setzero_si512()
                    }
                })
            });
            for c in 0..chunks(F) {
                for r in 0..GROUP {
                    let v = load512(&w.q, base + SCALE_BYTES + (c * GROUP + r) * VEC);
                    if F != Q8 {
                        let mut lo = _mm512_and_si512(v, low);
                        let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                        if F == Q5 {
                            // Bit k of the plane's byte is the fifth bit of vector k's: a
                            // byte mask of it, then 16 added where it is set.
                            let fifth = |k: usize| {
                                let bit = _mm512_set1_epi8((1u8 << k) as i8);
                                _mm512_test_epi8_mask(planes[r][0], bit)
                            };
                            lo = _mm512_mask_add_epi8(lo, fifth(2 * c), lo, bit4);
                            hi = _mm512_mask_add_epi8(hi, fifth(2 * c + 1), hi, bit4);
                        } else if F == Q6 {
                            // Vector k's two high bits moved to bits 4-5 of each byte, then
                            // `nibble | (moved & 0x30)` in one ternary-logic instruction
                            // (0xF8: a | (b & c)).
                            let two = _mm512_set1_epi8(0x30);
                            let high = |k: usize| {
                                let (j, at) = format(F).high_at(k);
                                shift_to_bit4_512(planes[r][j], at)
                            };
                            lo = _mm512_ternarylogic_epi32::<0xF8>(lo, high(2 * c), two);
                            hi = _mm512_ternarylogic_epi32::<0xF8>(hi, high(2 * c + 1), two);
                        }
                        for i in 0..M {
                            dot[r][i] = _mm512_dpbusd_epi32(dot[r][i], lo, x[i][2 * c]);
                            dot[r][i] = _mm512_dpbusd_epi32(dot[r][i], hi, x[i][2 * c + 1]);
                        }
                    } else {
                        for i in 0..M {
                            dot[r][i] = _mm512_dpbusd_epi32(dot[r][i], v, x[i][c]);
                        }
                    }
                }
            }
            // Lane l now holds block l's whole dot product: scale all 16 at once.
            for i in 0..M {
                let ai = job.i0 + i;
                let s = _mm512_castsi512_ps(load512(xs, (ai * acts.blocks + b0) * 4));
                for r in 0..GROUP {
                    let ws = _mm512_cvtph_ps(load256(&w.q, base + r * SUPER * 2));
                    acc[r][i] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(dot[r][i]),
                        _mm512_mul_ps(ws, s),
                        acc[r][i],
                    );
                }
            }
        }
        let m = acts.m;
        for r in 0..GROUP {
            for i in 0..M {
                out_t[(job.out_row + r) * m + job.i0 + i] = _mm512_reduce_add_ps(acc[r][i]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn avx2<const F: u8, const M: usize>(job: &Job, out_t: &mut [f32]) {
        let (w, acts) = (job.w, job.acts);
        let width = acts.blocks * BLOCK;
        let xq = acts.q_bytes();
        let xs: &[u8] = bytemuck::cast_slice(&acts.scale);
        let xb: &[u8] = bytemuck::cast_slice(&acts.bias);
        let low = _mm256_set1_epi8(0x0F);
        let flip = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); M]; GROUP];
        for sb in 0..w.supers {
            let base = w.super_at(job.group, sb);
            for line in (0..w.super_bytes()).step_by(64) {
                prefetch(&w.q, base + line + ahead(F));
            }
            // Blocks 0-7 of the super-block, then 8-15: a 256-bit vector is half of one.
            for h in 0..2 {
                let b0 = sb * SUPER + h * 8;
                let mut dot = [[_mm256_setzero_si256(); M]; GROUP];
                if F != Q8 {
                    for i in 0..M {
                        let bias = load256(xb, ((job.i0 + i) * acts.blocks + b0) * 4);
                        for d in dot.iter_mut() {
                            d[i] = bias;
                        }
                    }
                }
                let xv = |i: usize, k: usize| {
                    load256(
                        xq,
                        (job.i0 + i) * width + sb * SUPER * BLOCK + k * VEC + h * 32,
                    )
                };
                let planes: [[__m256i; 2]; GROUP] = std::array::from_fn(|r| {
                    std::array::from_fn(|j| {
                        if j < format(F).planes() {
                            load256(&w.q, plane_at(F, base, j, r) + h * 32)
                        } else {
                            _mm256_setzero_si256()
                        }
                    })
                });
                // The high bits above a nibble: q5_0's fifth, q6's fifth and sixth.
                let high_mask = _mm256_set1_epi8(if F == Q6 { 0x30 } else { 0x10 });
                for c in 0..chunks(F) {
                    for r in 0..GROUP {
                        let v = load256(&w.q, base + SCALE_BYTES + (c * GROUP + r) * VEC + h * 32);
                        if F != Q8 {
                            let mut lo = _mm256_and_si256(v, low);
                            let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                            if F == Q5 || F == Q6 {
                                // Vector k's high bits moved to bit 4 up, masked, added.
                                let high = |k: usize| {
                                    let (j, at) = format(F).high_at(k);
                                    let p = if at <= 4 {
                                        _mm256_sll_epi16(
                                            planes[r][j],
                                            _mm_cvtsi32_si128(4 - at as i32),
                                        )
                                    } else {
                                        _mm256_srl_epi16(
                                            planes[r][j],
                                            _mm_cvtsi32_si128(at as i32 - 4),
                                        )
                                    };
                                    _mm256_and_si256(p, high_mask)
                                };
                                lo = _mm256_or_si256(lo, high(2 * c));
                                hi = _mm256_or_si256(hi, high(2 * c + 1));
                            }
                            for i in 0..M {
                                for (nib, k) in [(lo, 2 * c), (hi, 2 * c + 1)] {
                                    let p = _mm256_maddubs_epi16(nib, xv(i, k));
                                    dot[r][i] =
                                        _mm256_add_epi32(dot[r][i], _mm256_madd_epi16(p, ones));
                                }
                            }
                        } else {
                            // Signed values again: `vpmaddubsw` multiplies unsigned bytes
                            // by signed ones and saturates, so the sign moves onto the
                            // activations (llama.cpp's way).
                            let q = _mm256_xor_si256(v, flip);
                            let aq = _mm256_abs_epi8(q);
                            for i in 0..M {
                                let p = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(xv(i, c), q));
                                dot[r][i] = _mm256_add_epi32(dot[r][i], _mm256_madd_epi16(p, ones));
                            }
                        }
                    }
                }
                for i in 0..M {
                    let ai = job.i0 + i;
                    let s = _mm256_castsi256_ps(load256(xs, (ai * acts.blocks + b0) * 4));
                    for r in 0..GROUP {
                        let ws = _mm256_cvtph_ps(load128(&w.q, base + r * SUPER * 2 + h * 16));
                        acc[r][i] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(dot[r][i]),
                            _mm256_mul_ps(ws, s),
                            acc[r][i],
                        );
                    }
                }
            }
        }
        let m = acts.m;
        for r in 0..GROUP {
            for i in 0..M {
                let a: [f32; 8] = bytemuck::cast(acc[r][i]);
                out_t[(job.out_row + r) * m + job.i0 + i] =
                    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
mod arm {
    //! The ARM kernel. `unsafe` is allowed here for calling the `#[target_feature]`
    //! kernel after [`Isa::supported`] found the dot-product extension (`matmul_t_with`
    //! refuses an unsupported set first), and for NEON loads from slices whose bounds are
    //! checked by slicing first.
    use std::arch::aarch64::*;

    use super::{Acts, QFormat, QMatrix, BLOCK, GROUP, SCALE_BYTES, SUPER, VEC};

    /// Row groups `g0..` of `w` into `out_t` (`[rows][m]`, whole groups).
    pub(super) fn groups(w: &QMatrix, g0: usize, acts: &Acts, out_t: &mut [f32]) {
        // SAFETY: only reached for `Isa::NeonDot`, which `matmul_t_with` checked.
        unsafe { dot_groups(w, g0, acts, out_t) }
    }

    #[inline(always)]
    fn load(s: &[u8], at: usize) -> uint8x16_t {
        let s = &s[at..at + 16];
        // SAFETY: `s` holds the 16 bytes read.
        unsafe { vld1q_u8(s.as_ptr()) }
    }

    /// `sdot`: four lanes, each the sum of four byte products. Through `asm!` because the
    /// `vdotq_s32` intrinsic is still unstable (Rust 1.95).
    #[target_feature(enable = "neon,dotprod")]
    #[inline]
    fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: a register-only instruction; this function only runs where the CPU has
        // the dot-product extension (its target feature, checked before any kernel runs).
        unsafe {
            std::arch::asm!(
                "sdot {0:v}.4s, {1:v}.16b, {2:v}.16b",
                inout(vreg) acc,
                in(vreg) a,
                in(vreg) b,
                options(pure, nomem, nostack)
            );
        }
        acc
    }

    #[inline(always)]
    fn load_f32(s: &[f32], at: usize) -> float32x4_t {
        let s = &s[at..at + 4];
        // SAFETY: `s` holds the 4 values read.
        unsafe { vld1q_f32(s.as_ptr()) }
    }

    /// Each 16-byte quarter of a 64-byte vector covers 4 blocks: `sdot` leaves block `l`'s
    /// sum in lane `l % 4` of quarter `l / 4`. Values are made signed again (q8_0: flip
    /// the offset bit; the nibble formats: subtract the offset), so no bias is needed.
    #[target_feature(enable = "neon,dotprod")]
    fn dot_groups(w: &QMatrix, g0: usize, acts: &Acts, out_t: &mut [f32]) {
        let m = acts.m;
        let width = acts.blocks * BLOCK;
        let xq = acts.q_bytes();
        let nibbles = w.format != QFormat::Q8_0;
        let (flip, low) = (vdupq_n_u8(0x80), vdupq_n_u8(0x0F));
        // The high bits above a nibble: q5_0's fifth, q6's fifth and sixth.
        let high_mask = vdupq_n_u8(((1u8 << w.format.high_bits()) - 1) << 4);
        let offset = vdupq_n_s8(w.format.offset() as i8);
        for (g, out) in out_t.chunks_exact_mut(GROUP * m).enumerate() {
            for i in 0..m {
                let mut acc = [[vdupq_n_f32(0.0); 4]; GROUP];
                for sb in 0..w.supers {
                    let base = w.super_at(g0 + g, sb);
                    let b0 = sb * SUPER;
                    let x: [[int8x16_t; 4]; 8] = std::array::from_fn(|k| {
                        std::array::from_fn(|q| {
                            let at = i * width + b0 * BLOCK + k * VEC + q * 16;
                            vreinterpretq_s8_u8(load(xq, at))
                        })
                    });
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let mut dot = [vdupq_n_s32(0); 4];
                        for c in 0..w.format.chunks() {
                            for (q, d) in dot.iter_mut().enumerate() {
                                let v =
                                    load(&w.q, base + SCALE_BYTES + (c * GROUP + r) * VEC + q * 16);
                                if nibbles {
                                    let (mut lo, mut hi) = (vandq_u8(v, low), vshrq_n_u8::<4>(v));
                                    if w.format.planes() > 0 {
                                        // Vector k's high bits moved to bit 4 up (a
                                        // negative count shifts right).
                                        let high = |k: usize| {
                                            let (j, shift) = w.format.high_at(k);
                                            let at = base
                                                + SCALE_BYTES
                                                + ((w.format.chunks() + j) * GROUP + r) * VEC
                                                + q * 16;
                                            let count = vdupq_n_s8(4 - shift as i8);
                                            vandq_u8(vshlq_u8(load(&w.q, at), count), high_mask)
                                        };
                                        lo = vorrq_u8(lo, high(2 * c));
                                        hi = vorrq_u8(hi, high(2 * c + 1));
                                    }
                                    let lo = vsubq_s8(vreinterpretq_s8_u8(lo), offset);
                                    let hi = vsubq_s8(vreinterpretq_s8_u8(hi), offset);
                                    *d = sdot(*d, lo, x[2 * c][q]);
                                    *d = sdot(*d, hi, x[2 * c + 1][q]);
                                } else {
                                    let sv = vreinterpretq_s8_u8(veorq_u8(v, flip));
                                    *d = sdot(*d, sv, x[c][q]);
                                }
                            }
                        }
                        for (q, a) in acc.iter_mut().enumerate() {
                            let ws: [f32; 4] = std::array::from_fn(|l| {
                                let at = base + (r * SUPER + q * 4 + l) * 2;
                                half::f16::from_le_bytes([w.q[at], w.q[at + 1]]).to_f32()
                            });
                            let xs = load_f32(&acts.scale, i * acts.blocks + b0 + q * 4);
                            let scale = vmulq_f32(load_f32(&ws, 0), xs);
                            *a = vfmaq_f32(*a, vcvtq_f32_s32(dot[q]), scale);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    let sum = vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3]));
                    out[r * m + i] = vaddvq_f32(sum);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// The arithmetic, in f64 over the stored values: what every path must give.
    fn definition(w: &QMatrix, x: &[f32], m: usize) -> Vec<f32> {
        let blocks = w.cols / BLOCK;
        let mut out = vec![0f32; m * w.rows];
        for i in 0..m {
            for j in 0..w.rows {
                let mut acc = 0f64;
                for b in 0..blocks {
                    let mut xq = [0i8; BLOCK];
                    let xd = quantize_block_q8(
                        &x[i * w.cols + b * BLOCK..i * w.cols + (b + 1) * BLOCK],
                        &mut xq,
                    );
                    let mut vals = [0i8; BLOCK];
                    w.block(j, b, &mut vals);
                    let s: i64 = (0..BLOCK).map(|k| vals[k] as i64 * xq[k] as i64).sum();
                    acc += w.scale(j, b).to_f64() * xd as f64 * s as f64;
                }
                out[i * w.rows + j] = acc as f32;
            }
        }
        out
    }

    #[test]
    fn every_path_matches_the_definition_on_awkward_sizes() {
        let paths = Isa::available();
        eprintln!("paths on this CPU: {paths:?}");
        // One block per row (a super-block mostly padding), odd row counts (a partial last
        // group of four), 17 blocks (a second super-block cut short), a matrix split over
        // threads; 1, 2, 3, 5 and 16 activation rows.
        for format in [QFormat::Q8_0, QFormat::Q4_0, QFormat::Q5_0, QFormat::Q6] {
            for (rows, cols) in [
                (1, 32),
                (7, 64),
                (33, 96),
                (5, 544),
                (130, 512),
                (1031, 1056),
            ] {
                let w = QMatrix::quantize(&values(rows * cols, 3), rows, cols, format).expect("w");
                for m in [1, 2, 3, 5, 16] {
                    let x = values(m * cols, 7 + m as u32);
                    let want = definition(&w, &x, m);
                    for &isa in &paths {
                        let got = w.matmul_t_with(&x, m, isa).expect("product");
                        let worst = got
                            .iter()
                            .zip(&want)
                            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
                            .fold(0f32, f32::max);
                        assert!(
                            worst < 1e-5,
                            "{} {} {rows}x{cols} m={m}: off by {worst}",
                            format.name(),
                            isa.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rounding_is_ggmls() {
        // q4_0: the largest magnitude maps to -8; the rest round half up into 0..=15.
        let mut x = [0f32; BLOCK];
        x[0] = -2.0;
        x[1] = 1.0;
        x[2] = 0.125;
        x[3] = 2.0;
        let mut q = [0u8; BLOCK];
        let d = quantize_block_signed(&x, &mut q, 4);
        assert_eq!(d, 0.25);
        assert_eq!(&q[..4], &[0, 12, 9, 15]);
        let w = QMatrix::quantize(&x, 1, BLOCK, QFormat::Q4_0).expect("q4");
        let back = w.dequantize();
        assert_eq!(&back[..4], &[-2.0, 1.0, 0.25, 1.75]);
        // q5_0: the largest magnitude maps to -16; the rest round half up into 0..=31.
        let d = quantize_block_signed(&x, &mut q, 5);
        assert_eq!(d, 0.125);
        assert_eq!(&q[..4], &[0, 24, 17, 31]);
        let w = QMatrix::quantize(&x, 1, BLOCK, QFormat::Q5_0).expect("q5");
        assert_eq!(&w.dequantize()[..4], &[-2.0, 1.0, 0.125, 1.875]);
        // q6: the same with 64 levels, -32 to 31 (0.125 is two steps of 1/16: 34; 2.0 is
        // 32 steps, clipped to 31).
        let d = quantize_block_signed(&x, &mut q, 6);
        assert_eq!(d, 0.0625);
        assert_eq!(&q[..4], &[0, 48, 34, 63]);
        let w = QMatrix::quantize(&x, 1, BLOCK, QFormat::Q6).expect("q6");
        assert_eq!(&w.dequantize()[..4], &[-2.0, 1.0, 0.125, 1.9375]);
        // q8_0: max|x| / 127.
        let mut q8 = [0i8; BLOCK];
        let d = quantize_block_q8(&x, &mut q8);
        assert_eq!(d, 2.0 / 127.0);
        assert_eq!(&q8[..4], &[-127, 64, 8, 127]);
    }

    #[test]
    fn ggml_blocks_are_taken_as_they_are() {
        let (rows, cols) = (3, 96);
        for format in [QFormat::Q8_0, QFormat::Q4_0, QFormat::Q5_0] {
            let w = QMatrix::quantize(&values(rows * cols, 1), rows, cols, format).expect("w");
            let mut bytes = vec![];
            for r in 0..rows {
                for b in 0..cols / BLOCK {
                    bytes.extend(w.scale(r, b).to_le_bytes());
                    let mut v = [0i8; BLOCK];
                    w.block(r, b, &mut v);
                    match format {
                        QFormat::Q8_0 => bytes.extend(v.iter().map(|&v| v as u8)),
                        QFormat::Q4_0 => bytes.extend(
                            (0..16).map(|k| (v[k] + 8) as u8 | ((v[k + 16] + 8) as u8) << 4),
                        ),
                        QFormat::Q5_0 => {
                            let u: Vec<u8> = v.iter().map(|&v| (v + 16) as u8).collect();
                            let qh = (0..32).fold(0u32, |h, k| h | u32::from(u[k] >> 4) << k);
                            bytes.extend(qh.to_le_bytes());
                            bytes.extend((0..16).map(|k| (u[k] & 15) | (u[k + 16] & 15) << 4));
                        }
                        QFormat::Q6 => unreachable!("not a GGML format"),
                    }
                }
            }
            let g = QMatrix::from_ggml(&bytes, rows, cols, format).expect("ggml");
            assert_eq!(g.q, w.q, "{}", format.name());
            let err = QMatrix::from_ggml(&bytes[1..], rows, cols, format).expect_err("short");
            assert!(err.to_string().contains(format.name()), "{err}");
        }
        assert!(QMatrix::quantize(&values(40, 1), 1, 40, QFormat::Q8_0).is_err());
        let bytes = vec![0u8; rows * cols / BLOCK * QFormat::Q6.ggml_block_bytes()];
        let err = QMatrix::from_ggml(&bytes, rows, cols, QFormat::Q6).expect_err("q6");
        assert!(err.to_string().contains("not a GGML"), "{err}");
    }

    #[test]
    fn every_value_survives_the_planes() {
        // Each of the 64 q6 levels (and 32 q5_0 levels) at every position of a block and
        // of a super-block, through storage and back, and in a product with unit
        // activations on every path.
        for format in [QFormat::Q5_0, QFormat::Q6] {
            let levels = 1i32 << format.bits();
            let (rows, cols) = (5, 2 * SUPER * BLOCK);
            let mut w = QMatrix::empty(format, rows, cols).expect("empty");
            let mut want = vec![0i8; rows * cols];
            for r in 0..rows {
                for b in 0..cols / BLOCK {
                    w.set_scale(r, b, f16::ONE);
                    let mut vals = [0u8; BLOCK];
                    for (e, v) in vals.iter_mut().enumerate() {
                        *v = ((r * 7 + b * 3 + e * 5) as i32 % levels) as u8;
                        want[r * cols + b * BLOCK + e] = (*v as i32 - format.offset()) as i8;
                    }
                    w.set_block(r, b, &vals);
                }
            }
            let back: Vec<i8> = w.dequantize().iter().map(|&v| v as i8).collect();
            assert_eq!(back, want, "{}", format.name());
            for isa in Isa::available() {
                for col in [0, 37, cols - 1] {
                    let mut x = vec![0f32; cols];
                    x[col] = 1.0;
                    let got = w.matmul_t_with(&x, 1, isa).expect("product");
                    for (r, &g) in got.iter().enumerate() {
                        // One-hot activations quantize to 127 at scale 1/127.
                        let v = f32::from(want[r * cols + col]);
                        assert!(
                            (g - v).abs() < 1e-4,
                            "{} {} row {r} col {col}: {g} vs {v}",
                            format.name(),
                            isa.name()
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore = "timing: run by hand with --release --ignored --nocapture"]
    fn kernel_bandwidth() {
        // Many matrices, 0.6 GB in all (q8_0): far beyond the caches, as a model step.
        let (rows, cols) = (6144, 2048);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 255) as f32 - 127.0)
            .collect();
        for format in [QFormat::Q8_0, QFormat::Q4_0, QFormat::Q5_0, QFormat::Q6] {
            let count = std::env::var("QCOUNT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(48);
            let q: Vec<QMatrix> = (0..count)
                .map(|_| QMatrix::quantize(&w, rows, cols, format).expect("q"))
                .collect();
            let q: Vec<&QMatrix> = (0..48).map(|i| &q[i % count]).collect();
            let t = std::time::Instant::now();
            let sum: u64 = q
                .iter()
                .map(|q| q.q.iter().map(|&v| v as u64).sum::<u64>())
                .sum();
            eprintln!(
                "plain read: {:.1} GB/s ({sum})",
                48.0 * q[0].size_in_bytes() as f64 / t.elapsed().as_secs_f64() / 1e9
            );
            let bytes: usize = q.iter().map(|q| q.size_in_bytes()).sum();
            let q: Vec<&QMatrix> = q;
            for isa in Isa::available().into_iter().skip(1) {
                for m in [1, 2, 4] {
                    let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.1).sin()).collect();
                    let mut best = f64::MAX;
                    for _ in 0..4 {
                        let t = std::time::Instant::now();
                        for &q in &q {
                            std::hint::black_box(q.matmul_t_with(&x, m, isa).expect("p"));
                        }
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    eprintln!(
                        "{} {} m={m}: {:.2} ms, {:.1} GB/s",
                        format.name(),
                        isa.name(),
                        best * 1e3,
                        bytes as f64 / best / 1e9
                    );
                }
            }
        }
    }
}
