//! q8_0 weights times activations quantized to 8 bits, with integer dot products.
//!
//! The arithmetic of GGML's `q8_0 x q8_0` dot product (what llama.cpp and candle run):
//! weights in blocks of 32 with one scale each, the activation row quantized once per
//! product to the same blocks, each block's dot product taken in integers and scaled by
//! both scales. Written here rather than through candle's `QMatMul` because candle's CPU
//! kernel is compute-bound at batch 1 (a step reads 0.9 GB of q8_0 weights in about the
//! time bf16 takes for 1.7 GB): this one streams each weight row once for up to 16
//! activation rows, with AVX2's `maddubs`/`madd` (chosen at run time through `pulp`, no
//! `unsafe` here), a portable fallback elsewhere, and rows split over rayon's threads.
//!
//! Storage: the int8 values of every row in one array (32 per block, rows contiguous)
//! and the blocks' scales in another, as f32, so both stream linearly. That is 36 bytes
//! per 32 weights where GGML stores 34 (f16 scales): 6% more to read, no conversion in
//! the inner loop.

use rayon::prelude::*;

use crate::{Error, Result};

/// Weights per block (GGML's QK8_0).
pub const BLOCK: usize = 32;

/// A `[rows, cols]` matrix in q8_0 blocks.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// `rows * cols / 32` scales.
    d: Vec<f32>,
    /// `rows * cols` values.
    q: Vec<i8>,
}

/// Quantizes one block as GGML's `quantize_row_q8_0` does: scale `max|x| / 127`, values
/// rounded to nearest.
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * inv).round() as i8;
    }
    d
}

impl Q8Matrix {
    /// Quantizes row-major `w` (`cols` a multiple of 32).
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
            return Err(Error::InvalidInput(format!(
                "q8_0 needs rows of whole 32-weight blocks: {rows} x {cols} from {} values",
                w.len()
            )));
        }
        let mut q = vec![0i8; rows * cols];
        let d = w
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .map(|(x, q)| quantize_block(x, q))
            .collect();
        Ok(Self { rows, cols, d, q })
    }

    /// Takes GGML q8_0 blocks as stored (34 bytes: an f16 scale, then 32 int8 values), as
    /// a GGUF file holds them: nothing is rounded again.
    pub fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        const BYTES: usize = 2 + BLOCK;
        let blocks = rows * cols / BLOCK;
        if !cols.is_multiple_of(BLOCK) || bytes.len() != blocks * BYTES {
            return Err(Error::InvalidInput(format!(
                "{} bytes of q8_0 blocks for a {rows} x {cols} matrix ({} expected)",
                bytes.len(),
                blocks * BYTES
            )));
        }
        let mut d = Vec::with_capacity(blocks);
        let mut q = Vec::with_capacity(rows * cols);
        for b in bytes.chunks_exact(BYTES) {
            d.push(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
            q.extend(b[2..].iter().map(|&v| v as i8));
        }
        Ok(Self { rows, cols, d, q })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes one product reads.
    pub fn size_in_bytes(&self) -> usize {
        self.q.len() + self.d.len() * 4
    }

    /// The weights as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .chunks_exact(BLOCK)
            .zip(&self.d)
            .flat_map(|(q, &d)| q.iter().map(move |&v| v as f32 * d))
            .collect()
    }

    /// `out[i][j] = sum_k w[j][k] * x[i][k]` for `m` rows of `x`, the activations
    /// quantized to q8_0 blocks first. `out` is `[m][rows]`.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.matmul_t_with(x, m, Simd::detect())
    }

    /// [`Self::matmul_t`] on a chosen instruction set (tests force the fallback).
    pub fn matmul_t_with(&self, x: &[f32], m: usize, simd: Simd) -> Result<Vec<f32>> {
        let cols = self.cols;
        if x.len() != m * cols {
            return Err(Error::InvalidInput(format!(
                "matmul: {} values for {m} rows of {cols}",
                x.len()
            )));
        }
        let nb = cols / BLOCK;
        let mut xq = vec![0i8; m * cols];
        let xd: Vec<f32> = x
            .chunks_exact(BLOCK)
            .zip(xq.chunks_exact_mut(BLOCK))
            .map(|(x, q)| quantize_block(x, q))
            .collect();
        let acts = Acts {
            q: &xq,
            d: &xd,
            m,
            nb,
        };
        // `out_t` is [rows][m], so each thread writes one contiguous block of it.
        let mut out_t = vec![0f32; self.rows * m];
        let threads = rayon::current_num_threads();
        if self.rows * cols < super::cpu::PARALLEL_MIN_WEIGHTS || threads == 1 {
            rows_kernel(simd, &self.q, &self.d, &acts, &mut out_t);
        } else {
            // Blocks of whole rows, a few per thread, on 64-byte boundaries of out_t.
            let block = self.rows.div_ceil(threads * 4).next_multiple_of(16).max(16);
            self.q
                .par_chunks(block * cols)
                .zip(self.d.par_chunks(block * nb))
                .zip(out_t.par_chunks_mut(block * m))
                .for_each(|((q, d), o)| rows_kernel(simd, q, d, &acts, o));
        }
        Ok(transpose(out_t, self.rows, m))
    }
}

fn transpose(out_t: Vec<f32>, rows: usize, m: usize) -> Vec<f32> {
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * rows];
    for (j, row) in out_t.chunks_exact(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * rows + j] = v;
        }
    }
    out
}

/// The quantized activations: `m` rows of `nb` blocks.
struct Acts<'a> {
    q: &'a [i8],
    d: &'a [f32],
    m: usize,
    nb: usize,
}

/// The instruction set a product runs on.
#[derive(Debug, Clone, Copy)]
pub enum Simd {
    /// Plain Rust (whatever the compiler makes of it).
    Portable,
    /// AVX2 integer dot products (`vpmaddubsw`, `vpmaddwd`) and FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2(pulp::x86::V3),
}

impl Simd {
    /// The best this CPU offers.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(v3) = pulp::x86::V3::try_new() {
            return Self::Avx2(v3);
        }
        Self::Portable
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(_) => "avx2",
        }
    }
}

/// Weight rows `q`/`d` against every activation row; `out_t` is `[rows][m]`.
fn rows_kernel(simd: Simd, q: &[i8], d: &[f32], acts: &Acts, out_t: &mut [f32]) {
    match simd {
        Simd::Portable => portable_rows(q, d, acts, out_t),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2(v3) => v3.vectorize(|| avx2::rows(v3, q, d, acts, out_t)),
    }
}

fn portable_rows(q: &[i8], d: &[f32], acts: &Acts, out_t: &mut [f32]) {
    let (nb, m) = (acts.nb, acts.m);
    let cols = nb * BLOCK;
    for ((wq, wd), out) in q
        .chunks_exact(cols)
        .zip(d.chunks_exact(nb))
        .zip(out_t.chunks_exact_mut(m))
    {
        for (i, o) in out.iter_mut().enumerate() {
            let xq = &acts.q[i * cols..(i + 1) * cols];
            let xd = &acts.d[i * nb..(i + 1) * nb];
            let mut acc = 0f32;
            for b in 0..nb {
                let s: i32 = wq[b * BLOCK..(b + 1) * BLOCK]
                    .iter()
                    .zip(&xq[b * BLOCK..(b + 1) * BLOCK])
                    .map(|(&w, &x)| w as i32 * x as i32)
                    .sum();
                acc += wd[b] * xd[b] * s as f32;
            }
            *o = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::{__m256, __m256i};

    use super::{Acts, BLOCK};
    use pulp::x86::V3;

    /// Activation rows handled together: each weight block is loaded once for all of
    /// them.
    const GROUP: usize = 4;

    #[inline(always)]
    fn load(v: &[i8]) -> __m256i {
        bytemuck::pod_read_unaligned(bytemuck::cast_slice::<i8, u8>(&v[..BLOCK]))
    }

    #[inline(always)]
    fn hsum(simd: V3, v: __m256) -> f32 {
        let a: [f32; 8] = bytemuck::cast(v);
        let _ = simd;
        (a[0] + a[4]) + (a[1] + a[5]) + ((a[2] + a[6]) + (a[3] + a[7]))
    }

    #[inline(always)]
    pub(super) fn rows(simd: V3, q: &[i8], d: &[f32], acts: &Acts, out_t: &mut [f32]) {
        let (nb, m) = (acts.nb, acts.m);
        let cols = nb * BLOCK;
        let ones = simd.avx._mm256_set1_epi16(1);
        for ((wq, wd), out) in q
            .chunks_exact(cols)
            .zip(d.chunks_exact(nb))
            .zip(out_t.chunks_exact_mut(m))
        {
            let mut i0 = 0;
            while i0 < m {
                let g = (m - i0).min(GROUP);
                let mut acc = [simd.avx._mm256_setzero_ps(); GROUP];
                for b in 0..nb {
                    let w = load(&wq[b * BLOCK..]);
                    // maddubs multiplies unsigned by signed bytes: |w| times x with w's
                    // sign moved onto it (llama.cpp's trick).
                    let aw = simd.avx2._mm256_abs_epi8(w);
                    for (r, a) in acc.iter_mut().enumerate().take(g) {
                        let i = i0 + r;
                        let x = load(&acts.q[i * cols + b * BLOCK..]);
                        let sx = simd.avx2._mm256_sign_epi8(x, w);
                        let p16 = simd.avx2._mm256_maddubs_epi16(aw, sx);
                        let p32 = simd.avx2._mm256_madd_epi16(p16, ones);
                        let scale = simd.avx._mm256_set1_ps(wd[b] * acts.d[i * nb + b]);
                        *a = simd
                            .fma
                            ._mm256_fmadd_ps(scale, simd.avx._mm256_cvtepi32_ps(p32), *a);
                    }
                }
                for (r, a) in acc.iter().enumerate().take(g) {
                    out[i0 + r] = hsum(simd, *a);
                }
                i0 += g;
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

    /// The definition: both sides quantized to q8_0 blocks, block dot products in
    /// integers, scaled (what GGML's `vec_dot_q8_0_q8_0` computes).
    fn definition(w: &Q8Matrix, x: &[f32], m: usize) -> Vec<f32> {
        let xq = Q8Matrix::quantize(x, m, w.cols).expect("x");
        let nb = w.cols / BLOCK;
        let mut out = vec![0f32; m * w.rows];
        for i in 0..m {
            for j in 0..w.rows {
                let mut acc = 0f64;
                for b in 0..nb {
                    let s: i64 = (0..BLOCK)
                        .map(|k| {
                            w.q[j * w.cols + b * BLOCK + k] as i64
                                * xq.q[i * w.cols + b * BLOCK + k] as i64
                        })
                        .sum();
                    acc += w.d[j * nb + b] as f64 * xq.d[i * nb + b] as f64 * s as f64;
                }
                out[i * w.rows + j] = acc as f32;
            }
        }
        out
    }

    #[test]
    fn every_path_matches_the_definition_on_awkward_sizes() {
        let mut paths = vec![Simd::Portable];
        if Simd::detect().name() != "portable" {
            paths.push(Simd::detect());
        }
        // Odd row counts, one block per row, many blocks; 1, 3, 5 and 16 activation rows
        // (groups of 4 with a remainder); a matrix large enough to be split over threads.
        for (rows, cols) in [(1, 32), (7, 64), (33, 96), (130, 512), (1031, 1024)] {
            let w = Q8Matrix::quantize(&values(rows * cols, 3), rows, cols).expect("w");
            for m in [1, 3, 5, 16] {
                let x = values(m * cols, 7 + m as u32);
                let want = definition(&w, &x, m);
                for &simd in &paths {
                    let got = w.matmul_t_with(&x, m, simd).expect("product");
                    let worst = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
                        .fold(0f32, f32::max);
                    assert!(
                        worst < 1e-5,
                        "{} {rows}x{cols} m={m}: off by {worst}",
                        simd.name()
                    );
                }
            }
        }
    }

    #[test]
    fn ggml_blocks_are_taken_as_they_are() {
        let (rows, cols) = (3, 64);
        let w = Q8Matrix::quantize(&values(rows * cols, 1), rows, cols).expect("w");
        let mut bytes = vec![];
        for (q, d) in w.q.chunks_exact(BLOCK).zip(&w.d) {
            bytes.extend(half::f16::from_f32(*d).to_le_bytes());
            bytes.extend(q.iter().map(|&v| v as u8));
        }
        let g = Q8Matrix::from_ggml(&bytes, rows, cols).expect("ggml");
        assert_eq!(g.q, w.q);
        let err = Q8Matrix::from_ggml(&bytes[1..], rows, cols).expect_err("short");
        assert!(err.to_string().contains("q8_0"), "{err}");
        assert!(Q8Matrix::quantize(&values(40, 1), 1, 40).is_err());
    }
}
