//! Weight-streaming matrix products for the CPU.
//!
//! A streaming step multiplies a few rows of activations (one or two time steps, up to a
//! few dozen for a convolution's im2col) by a large weight matrix. General-purpose gemm
//! (candle's, through the `gemm` crate) packs the whole weight matrix before multiplying,
//! which for so few rows triples the memory traffic of an operation that is bound by it.
//! [`Matrix::matmul_t`] instead reads each weight row once, straight from the tensor's
//! storage, and dots it with every activation row while it sits in L1. SIMD comes from
//! `pulp`, which picks AVX2/FMA (or NEON, ...) at run time behind a safe API; rows are
//! split across rayon's threads (`RAYON_NUM_THREADS`). Larger batches go to gemm.
//!
//! Weights may be held in bf16 ([`Matrix::to_bf16`]): halves the bytes a step reads; each
//! value widens to f32 exactly, and all arithmetic stays in f32.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Storage, Tensor};
use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

use super::quant::{QFormat, QMatrix};
use crate::{Error, Result};

/// Batches up to this many rows use the streaming kernel; larger ones use gemm.
pub const STREAMING_MAX_ROWS: usize = 16;
/// Below this many weights a product runs on the calling thread alone.
pub(crate) const PARALLEL_MIN_WEIGHTS: usize = 1 << 18;

/// How large weight matrices are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightPrecision {
    /// As loaded, widened to f32: results match the reference to float rounding.
    #[default]
    F32,
    /// Matrices of at least [`BF16_MIN_WEIGHTS`] weights rounded to bf16 (half the bytes
    /// per streaming step; the arithmetic stays f32). Published bf16 checkpoints lose
    /// nothing; f32 ones are rounded.
    Bf16,
    /// Large matrices in GGML's q8_0 (8-bit blocks of 32, 8.5 bits a weight), multiplied
    /// by Parley's integer kernels ([`super::quant`]); others as for `Bf16`.
    Q8_0,
    /// Large matrices in 6-bit blocks of 32 (6.5 bits a weight; q5_0's arithmetic with 64
    /// levels, [`super::quant::QFormat::Q6`]), the same kernels; others as for `Bf16`.
    Q6,
    /// Large matrices in GGML's q5_0 (5-bit blocks of 32, 5.5 bits a weight), the same
    /// kernels; others as for `Bf16`.
    Q5,
    /// Large matrices in GGML's q4_0 (4-bit blocks of 32, 4.5 bits a weight), the same
    /// kernels; others as for `Bf16`.
    Q4,
}

impl std::str::FromStr for WeightPrecision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "q6" => Ok(Self::Q6),
            "q5" | "q5_0" => Ok(Self::Q5),
            "q4" | "q4_0" => Ok(Self::Q4),
            other => Err(format!(
                "unknown weight precision `{other}` (f32, bf16, q8_0, q6, q5 or q4)"
            )),
        }
    }
}

impl std::fmt::Display for WeightPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q6 => "q6",
            Self::Q5 => "q5",
            Self::Q4 => "q4",
        })
    }
}

impl WeightPrecision {
    /// Bytes per weight this precision holds a model's matrices in (q8_0: 34 bytes per
    /// block of 32; q4_0: 18), for sizing; embeddings and small matrices are a
    /// few percent of a model and are not counted apart.
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            Self::F32 => 4.0,
            Self::Bf16 => 2.0,
            Self::Q8_0 => 34.0 / 32.0,
            Self::Q6 => 26.0 / 32.0,
            Self::Q5 => 22.0 / 32.0,
            Self::Q4 => 18.0 / 32.0,
        }
    }

    /// The share of the CPU's read probe a step in this format reaches on its weights
    /// (measured at full context on the 2-core Xeon VM, one and two threads, against its
    /// AVX-512 probe: q8_0 0.79 / 0.75, q5 0.63 / 0.61, q4 0.67 / 0.67; bf16 and f32 about
    /// 0.77 and 0.9; q6 on two threads of a slower host of the same VM type, at the start
    /// of a context, 0.71 beside q8_0's 0.89), rounded down, for predicting a step's time.
    fn probe_share(self) -> f64 {
        match self {
            Self::F32 => 0.9,
            Self::Bf16 | Self::Q8_0 => 0.75,
            Self::Q4 | Self::Q6 => 0.65,
            Self::Q5 => 0.6,
        }
    }

    /// About how long one step of a model of `params` weights takes in this format on a
    /// CPU that reads `read_gbs` GB/s (its SIMD probe): the weights over the share of the
    /// probe this format reaches. Embedding tables count too, so it errs long.
    pub fn predicted_step_ms(self, params: u64, read_gbs: f64) -> f64 {
        params as f64 * self.bytes_per_weight() / (read_gbs * 1e9 * self.probe_share()) * 1e3
    }

    /// `--precision auto` on the CPU: q8_0, the fastest format that keeps the model's
    /// quality (8-bit blocks of 32: GGML's near-lossless format, and the one Kyutai
    /// publishes for its own Rust CPU path), unless a copy of a model of `params` weights
    /// does not fit in `available` bytes with [`AUTO_HEADROOM`] to spare, or, where the
    /// CPU's read bandwidth `read_gbs` is known, its step would take more than
    /// [`AUTO_STEP_BUDGET_MS`] (the model would fall behind live audio): then q6, q5, q4
    /// (0.76x, 0.65x and 0.53x the bytes, each a measurable loss growing as bits go:
    /// `tests/lm_quantized.rs`), the first that fits and keeps up; q4 when none keeps up. f32 and bf16 read 3.8x and
    /// 1.9x q8_0's bytes per step, and a step is bound by them: they are for parity
    /// checks, asked for by name. Returns the choice and why.
    pub fn auto_for(params: u64, available: Option<u64>, read_gbs: Option<f64>) -> (Self, String) {
        // A probe that measured nothing usable (zero, negative, not a number) says nothing.
        let read_gbs = read_gbs.filter(|bw| bw.is_finite() && *bw > 0.0);
        let gb = |b: f64| b / 1e9;
        let need = |p: Self| params as f64 * p.bytes_per_weight() * AUTO_HEADROOM;
        let fits = |p: Self| available.is_none_or(|a| need(p) <= a as f64);
        let step = |p: Self| read_gbs.map(|bw| p.predicted_step_ms(params, bw));
        let keeps_up = |p: Self| step(p).is_none_or(|ms| ms <= AUTO_STEP_BUDGET_MS);
        let fastest = "the fastest format that keeps the model's quality";
        let memory = match available {
            Some(a) => format!(
                "{:.1} GB of {:.1} GB available",
                gb(need(Self::Q8_0)),
                gb(a as f64)
            ),
            None => "available memory unknown".into(),
        };
        let speed = |p: Self| match (step(p), read_gbs) {
            (Some(ms), Some(bw)) => format!("a step about {ms:.0} ms at this CPU's {bw:.0} GB/s"),
            _ => "read bandwidth not measured".into(),
        };
        if fits(Self::Q8_0) && keeps_up(Self::Q8_0) {
            return (
                Self::Q8_0,
                format!("{fastest}: {memory}; {}", speed(Self::Q8_0)),
            );
        }
        let q8 = if fits(Self::Q8_0) {
            format!(
                "q8_0 would take about {:.0} ms a step at this CPU's {:.0} GB/s, more than the {AUTO_STEP_BUDGET_MS:.0} ms a live frame leaves it",
                step(Self::Q8_0).unwrap_or(0.0),
                read_gbs.unwrap_or(0.0)
            )
        } else {
            format!(
                "q8_0 would need {:.1} GB, {:.1} GB available",
                gb(need(Self::Q8_0)),
                gb(available.unwrap_or(0) as f64)
            )
        };
        // Smaller, in order of quality: each bit fewer doubles the rounding error.
        for p in [Self::Q6, Self::Q5, Self::Q4] {
            if fits(p) && keeps_up(p) {
                return (
                    p,
                    format!("{q8}; {p} needs {:.1} GB, {}", gb(need(p)), speed(p)),
                );
            }
        }
        if fits(Self::Q4) {
            return (
                Self::Q4,
                format!(
                    "{q8}; no format keeps up with live audio on this CPU: q4, the fastest, {}",
                    speed(Self::Q4)
                ),
            );
        }
        let why = format!(
            "even q4 needs {:.1} GB and {:.1} GB are available: loading may fail",
            gb(need(Self::Q4)),
            gb(available.unwrap_or(0) as f64)
        );
        (Self::Q4, why)
    }
}

/// The longest CPU step `--precision auto` calls live: 60 ms of each 80 ms frame, the rest
/// for Mimi (about 9 ms on two threads of the Xeon VM) and the pipeline.
pub const AUTO_STEP_BUDGET_MS: f64 = 60.0;

/// What `--precision auto` leaves spare beyond a model's own size (the streaming state,
/// Mimi, the rest of the process and of the machine).
pub const AUTO_HEADROOM: f64 = 1.25;

/// Runs `f` (one step of a model) on one of rayon's worker threads, with the others
/// spinning beside it to share its parallel loops ([`super::team`]), and returns its
/// result. A step runs a hundred parallel products with short serial work between them:
/// from outside the pool every product would wake the sleeping workers anew (measured:
/// the 2-thread LM step lost about a tenth of its time that way), and inside it rayon's
/// workers still fall asleep between products.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    super::team::session(f)
}

/// This CPU's model name (`/proc/cpuinfo`) and the quantized kernels' instruction set,
/// for benchmark output: "Intel(R) Xeon(R) Processor; quantized kernels: avx512-vnni".
pub fn cpu_description() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!(
        "CPU: {model}; quantized kernels: {}; f32/bf16 weight products: {}; attention: {}",
        super::quant::Isa::detect().name(),
        arch_name(streaming_arch()),
        arch_name(arch())
    )
}

/// The SIMD level of Parley's f32 and bf16 kernels: pulp's best for this CPU (AVX-512, AVX2
/// with FMA, NEON), or the lower one that `PARLEY_CPU_ISA` forces on the quantized kernels
/// too (`avx2`: AVX2 with FMA, `portable`: scalar). candle's products through `gemm` pick
/// their own level (AVX-512 where present), whatever `PARLEY_CPU_ISA` says.
pub(crate) fn arch() -> Arch {
    static ARCH: std::sync::OnceLock<Arch> = std::sync::OnceLock::new();
    *ARCH.get_or_init(|| match super::quant::Isa::detect() {
        super::quant::Isa::Portable => Arch::Scalar,
        #[cfg(target_arch = "x86_64")]
        super::quant::Isa::Avx2 => pulp::x86::V3::try_new().map_or(Arch::Scalar, Arch::V3),
        _ => Arch::new(),
    })
}

/// The level of the weight-streaming f32/bf16 products: [`arch`], but AVX2 where that is
/// AVX-512, whose loops stream the weights slower (stt-1b-en_fr on one thread of the Intel
/// Xeon VM: f32 225.5 ms a step against 212.5 with AVX2, bf16 144.6 against 118.9; the
/// attention's loops over the cache, and candle's gemm, gain from AVX-512 and keep it).
fn streaming_arch() -> Arch {
    static ARCH: std::sync::OnceLock<Arch> = std::sync::OnceLock::new();
    *ARCH.get_or_init(|| match arch() {
        #[cfg(target_arch = "x86_64")]
        Arch::V4(_) => pulp::x86::V3::try_new().map_or(arch(), Arch::V3),
        other => other,
    })
}

/// Every level [`arch`] can take on this CPU, lowest first.
#[cfg(test)]
pub(crate) fn arches() -> Vec<Arch> {
    let mut all = vec![Arch::Scalar];
    #[cfg(target_arch = "x86_64")]
    all.extend(pulp::x86::V3::try_new().map(Arch::V3));
    let best = Arch::new();
    if arch_name(best) != arch_name(*all.last().expect("scalar")) {
        all.push(best);
    }
    all
}

fn arch_name(arch: Arch) -> &'static str {
    let lanes = arch.dispatch(Lanes);
    match (std::env::consts::ARCH, lanes) {
        (_, 1) => "portable",
        ("x86_64", 8) => "avx2",
        ("x86_64", 16) => "avx-512",
        ("aarch64", 4) => "neon",
        _ => "simd",
    }
}

/// Memory the system can give without swapping (`MemAvailable` of /proc/meminfo), where
/// known.
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Matrices smaller than this stay f32 under [`WeightPrecision::Bf16`]: they are not
/// what a step's time goes to, and gemm wants them in f32.
pub const BF16_MIN_WEIGHTS: usize = 1 << 18;

/// A row-major `[rows, cols]` weight matrix: f32, bf16, or quantized (q8_0, q4_0).
#[derive(Debug, Clone)]
pub struct Matrix {
    tensor: Tensor,
    /// Set when quantized; `tensor` is then an empty placeholder.
    quant: Option<Arc<QMatrix>>,
    rows: usize,
    cols: usize,
}

impl Matrix {
    /// Takes `[rows, cols]` (or any shape, flattened after the first dimension: a conv
    /// kernel `[c_out, c_in, k]` is `[c_out, c_in * k]`). f32 or bf16.
    pub fn new(t: &Tensor) -> Result<Self> {
        let rows = t.dim(0)?;
        let cols = t.elem_count() / rows.max(1);
        let tensor = t.contiguous()?.reshape((rows, cols))?;
        if !matches!(tensor.dtype(), DType::F32 | DType::BF16) {
            return Err(Error::InvalidInput(format!(
                "weight matrices are f32 or bf16, not {:?}",
                tensor.dtype()
            )));
        }
        Ok(Self {
            tensor,
            quant: None,
            rows,
            cols,
        })
    }

    /// [`Self::new`] then [`Self::set_precision`].
    pub fn with_precision(t: &Tensor, precision: WeightPrecision) -> Result<Self> {
        let mut m = Self::new(t)?;
        m.set_precision(precision)?;
        Ok(m)
    }

    /// Bytes the weights occupy (what one product reads).
    pub fn size_in_bytes(&self) -> usize {
        match &self.quant {
            Some(q) => q.size_in_bytes(),
            None => self.rows * self.cols * self.tensor.dtype().size_in_bytes(),
        }
    }

    /// How the weights are held: "f32", "bf16", "q8_0", "q4_0".
    pub fn format(&self) -> String {
        match &self.quant {
            Some(q) => q.format().name().to_string(),
            None => format!("{:?}", self.tensor.dtype()).to_lowercase(),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether the weights are held in a quantized format.
    pub fn is_quantized(&self) -> bool {
        self.quant.is_some()
    }

    pub fn dtype(&self) -> DType {
        self.tensor.dtype()
    }

    /// Applies `precision` to this matrix in place (see [`WeightPrecision`]). A quantized
    /// matrix stays as it is.
    pub fn set_precision(&mut self, precision: WeightPrecision) -> Result<()> {
        if self.quant.is_some() {
            return Ok(());
        }
        let large = self.rows * self.cols >= BF16_MIN_WEIGHTS;
        if let Some(q) = Self::quant_format(self.rows, self.cols, precision) {
            // Row by row from the tensor's own storage (a view's offset respected): no
            // widened copy of the whole matrix, so loading peaks near the model's size.
            let (rows, cols) = (self.rows, self.cols);
            let (storage, layout) = self.tensor.storage_and_layout();
            let (Storage::Cpu(cpu), true) = (&*storage, layout.is_contiguous()) else {
                return Err(Error::InvalidInput("weights are not on the CPU".into()));
            };
            let start = layout.start_offset();
            let quant = match self.tensor.dtype() {
                DType::F32 => {
                    let w = &cpu.as_slice::<f32>()?[start..start + rows * cols];
                    QMatrix::quantize(w, rows, cols, q)?
                }
                _ => {
                    let w = &cpu.as_slice::<half::bf16>()?[start..start + rows * cols];
                    QMatrix::quantize_rows(rows, cols, q, |r, out| {
                        for (o, v) in out.iter_mut().zip(&w[r * cols..(r + 1) * cols]) {
                            *o = v.to_f32();
                        }
                    })?
                }
            };
            drop(storage);
            self.quant = Some(Arc::new(quant));
            self.tensor = Tensor::zeros(0, DType::F32, &Device::Cpu)?;
            return Ok(());
        }
        let want = if precision != WeightPrecision::F32 && large {
            DType::BF16
        } else {
            DType::F32
        };
        if self.tensor.dtype() != want {
            self.tensor = self.tensor.to_dtype(want)?;
        }
        Ok(())
    }

    /// A matrix stored quantized (a GGUF checkpoint's tensor). Kept as it is when
    /// [`Self::set_precision`] would have chosen its format for it (a q8_0 file run at
    /// q8_0 is never dequantized); otherwise dequantized and converted to `precision`.
    pub fn from_quantized(q: QTensor, precision: WeightPrecision) -> Result<Self> {
        let dims = q.shape().dims().to_vec();
        let rows = dims.first().copied().unwrap_or(1);
        let cols = dims.iter().skip(1).product::<usize>();
        let stored = match q.dtype() {
            GgmlDType::Q8_0 => Some(QFormat::Q8_0),
            GgmlDType::Q4_0 => Some(QFormat::Q4_0),
            GgmlDType::Q5_0 => Some(QFormat::Q5_0),
            _ => None,
        };
        if let Some(format) =
            stored.filter(|&f| Self::quant_format(rows, cols, precision) == Some(f))
        {
            let blocks = QMatrix::from_ggml(&q.data()?, rows, cols, format)?;
            return Ok(Self {
                tensor: Tensor::zeros(0, DType::F32, &Device::Cpu)?,
                quant: Some(Arc::new(blocks)),
                rows,
                cols,
            });
        }
        let t = q.dequantize(&Device::Cpu)?.reshape((rows, cols))?;
        Self::with_precision(&t, precision)
    }

    /// The quantized format [`WeightPrecision`] gives a `rows` x `cols` matrix, if any.
    fn quant_format(rows: usize, cols: usize, precision: WeightPrecision) -> Option<QFormat> {
        let large = rows * cols >= BF16_MIN_WEIGHTS;
        match precision {
            WeightPrecision::Q4 if large && cols.is_multiple_of(32) => Some(QFormat::Q4_0),
            WeightPrecision::Q5 if large && cols.is_multiple_of(32) => Some(QFormat::Q5_0),
            WeightPrecision::Q6 if large && cols.is_multiple_of(32) => Some(QFormat::Q6),
            WeightPrecision::Q8_0 if large && cols.is_multiple_of(32) => Some(QFormat::Q8_0),
            _ => None,
        }
    }

    /// The same matrix with its weights rounded to bf16, whatever its size (tests; models
    /// use [`Self::set_precision`]).
    #[cfg(test)]
    fn to_bf16(&self) -> Result<Self> {
        Ok(Self {
            tensor: self.tensor.to_dtype(DType::BF16)?,
            ..self.clone()
        })
    }

    /// The weights as an f32 tensor `[rows, cols]` (dequantized if need be).
    pub fn to_f32(&self) -> Result<Tensor> {
        match &self.quant {
            Some(q) => Ok(Tensor::from_vec(
                q.dequantize(),
                (self.rows, self.cols),
                &Device::Cpu,
            )?),
            None => Ok(self.tensor.to_dtype(DType::F32)?),
        }
    }

    /// Adds row `i` (widened to f32) to `out`: an embedding lookup.
    pub fn add_row_to(&self, i: usize, out: &mut [f32]) -> Result<()> {
        if i >= self.rows || out.len() != self.cols {
            return Err(Error::InvalidInput(format!(
                "row {i} of a {}x{} matrix into {} values",
                self.rows,
                self.cols,
                out.len()
            )));
        }
        if self.quant.is_some() {
            return Err(Error::InvalidInput(
                "rows of a quantized matrix cannot be read one by one".into(),
            ));
        }
        let row: Vec<f32> = self.tensor.get(i)?.to_dtype(DType::F32)?.to_vec1()?;
        out.iter_mut().zip(&row).for_each(|(o, v)| *o += v);
        Ok(())
    }

    /// `out[i][j] = sum_k self[j][k] * x[i][k]`: `x` is `m` rows of `cols`, the result `m`
    /// rows of `rows` (that is `x @ self^T`, a linear layer without bias).
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.matmul_t_on(streaming_arch(), x, m)
    }

    /// [`Self::matmul_t`] taking `x` by value: a batch past the streaming kernels' rows goes
    /// to candle's gemm without being copied first (a convolution's im2col matrix).
    pub fn matmul_t_owned(&self, x: Vec<f32>, m: usize) -> Result<Vec<f32>> {
        if m > STREAMING_MAX_ROWS && self.quant.is_none() && x.len() == m * self.cols {
            return self.gemm_t(Tensor::from_vec(x, (m, self.cols), &Device::Cpu)?);
        }
        self.matmul_t(&x, m)
    }

    /// `xt @ self^T` through candle's gemm.
    fn gemm_t(&self, xt: Tensor) -> Result<Vec<f32>> {
        let w = self.tensor.to_dtype(DType::F32)?;
        Ok(xt.matmul(&w.t()?)?.flatten_all()?.to_vec1()?)
    }

    /// [`Self::matmul_t`] with the f32/bf16 kernels at SIMD level `arch`.
    fn matmul_t_on(&self, arch: Arch, x: &[f32], m: usize) -> Result<Vec<f32>> {
        if x.len() != m * self.cols {
            return Err(Error::InvalidInput(format!(
                "matmul: {} values for {m} rows of {}",
                x.len(),
                self.cols
            )));
        }
        if m == 0 {
            return Ok(vec![]);
        }
        if let Some(q) = &self.quant {
            return q.matmul_t(x, m);
        }
        if m > STREAMING_MAX_ROWS {
            return self.gemm_t(Tensor::from_slice(x, (m, self.cols), &Device::Cpu)?);
        }
        let (storage, layout) = self.tensor.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Err(Error::InvalidInput("weights are not on the CPU".into()));
        };
        let start = layout.start_offset();
        let n = self.rows * self.cols;
        // out_t is [rows][m]: contiguous per weight row, so threads write disjoint blocks.
        let mut out_t = vec![0f32; self.rows * m];
        let cols = self.cols;
        match self.tensor.dtype() {
            DType::F32 => {
                let w = &cpu.as_slice::<f32>()?[start..start + n];
                run_rows(w, cols, cols, x, m, &mut out_t, |w, x, m, out| {
                    arch.dispatch(Dot::<F32Rows> { w, cols, x, m, out })
                });
            }
            _ => {
                let w = &cpu.as_slice::<half::bf16>()?[start..start + n];
                let pairs: &[u32] = match bytemuck::try_cast_slice(w) {
                    Ok(p) if cols.is_multiple_of(2) => p,
                    _ => {
                        // Odd rows or a misaligned buffer: widen once, then as f32.
                        let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
                        run_rows(&wide, cols, cols, x, m, &mut out_t, |w, x, m, out| {
                            arch.dispatch(Dot::<F32Rows> { w, cols, x, m, out })
                        });
                        return Ok(transpose(out_t, self.rows, m));
                    }
                };
                let lanes = arch.dispatch(Lanes);
                let xi = interleave_for_bf16(x, cols, lanes);
                run_rows(pairs, cols / 2, cols, &xi, m, &mut out_t, |w, x, m, out| {
                    arch.dispatch(Dot::<Bf16Rows> { w, cols, x, m, out })
                });
            }
        }
        Ok(transpose(out_t, self.rows, m))
    }
}

/// `[rows][m]` to `[m][rows]`.
pub(crate) fn transpose(out_t: Vec<f32>, rows: usize, m: usize) -> Vec<f32> {
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

/// The f32 lane count of the SIMD level `Arch` dispatches to.
struct Lanes;

impl WithSimd for Lanes {
    type Output = usize;
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) -> usize {
        S::F32_LANES
    }
}

/// Sums `data` on rayon's threads with the SIMD reader of [`measure_read_bandwidth_gbs`]
/// (benchmarks use it to push a model's weights out of the caches).
pub fn read_all(data: &[f32]) -> f32 {
    let chunk = (data.len() / (rayon::current_num_threads() * 8)).max(1 << 16);
    data.par_chunks(chunk)
        .map(|c| arch().dispatch(Sum(c)))
        .sum()
}

/// Measures this machine's memory read bandwidth in GB/s: the best of five SIMD sums over
/// a buffer of `bytes` (far larger than the caches), on rayon's threads.
pub fn measure_read_bandwidth_gbs(bytes: usize) -> f64 {
    let data = vec![1.0f32; bytes / 4];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = std::time::Instant::now();
        std::hint::black_box(read_all(&data));
        best = best.min(t0.elapsed().as_secs_f64());
    }
    (data.len() * 4) as f64 / best / 1e9
}

struct Sum<'a>(&'a [f32]);

impl WithSimd for Sum<'_> {
    type Output = f32;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f32 {
        // Eight independent accumulators: the sum is bound by loads, not by add latency.
        let (v, t) = S::as_simd_f32s(self.0);
        let mut acc = [simd.splat_f32s(0.0); 8];
        let mut chunks = v.chunks_exact(8);
        for c in &mut chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a = simd.add_f32s(*a, x);
            }
        }
        let mut total = simd.splat_f32s(0.0);
        for a in acc.iter().chain(chunks.remainder()) {
            total = simd.add_f32s(total, *a);
        }
        simd.reduce_sum_f32s(total) + t.iter().sum::<f32>()
    }
}

/// Rows of f32 or bf16 values: the attention cache.
#[derive(Debug, Clone, Copy)]
pub enum RowsRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

/// `out_t[j * m + i] = w[j] . x[i]` over rows of `cols`, on the calling thread: the
/// attention scores of `m` queries against a block of keys.
pub fn dot_rows(w: RowsRef, cols: usize, x: &[f32], m: usize, out_t: &mut [f32]) {
    dot_rows_on(arch(), w, cols, x, m, out_t)
}

fn dot_rows_on(arch: Arch, w: RowsRef, cols: usize, x: &[f32], m: usize, out_t: &mut [f32]) {
    match w {
        RowsRef::F32(w) => dot_rows_f32(arch, w, cols, x, m, out_t),
        RowsRef::Bf16(w) => {
            out_t.iter_mut().for_each(|v| *v = 0.0);
            match bf16_pairs(w, cols) {
                Some(pairs) => {
                    let xi = interleave_for_bf16(x, cols, arch.dispatch(Lanes));
                    arch.dispatch(Dot::<Bf16Rows> {
                        w: pairs,
                        cols,
                        x: &xi,
                        m,
                        out: out_t,
                    })
                }
                None => {
                    let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
                    dot_rows_f32(arch, &wide, cols, x, m, out_t)
                }
            }
        }
    }
}

/// bf16 values as the u32 pairs [`Bf16Rows`] reads, where rows have an even length and
/// the slice is 4-byte aligned.
fn bf16_pairs(w: &[half::bf16], cols: usize) -> Option<&[u32]> {
    if !cols.is_multiple_of(2) {
        return None;
    }
    bytemuck::try_cast_slice(w).ok()
}

fn dot_rows_f32(arch: Arch, w: &[f32], cols: usize, x: &[f32], m: usize, out_t: &mut [f32]) {
    out_t.iter_mut().for_each(|v| *v = 0.0);
    arch.dispatch(Dot::<F32Rows> {
        w,
        cols,
        x,
        m,
        out: out_t,
    });
}

/// `out[c] += sum_j p[j] * v[j * cols + c]`: attention's weighted sum of values.
pub fn weighted_sum_rows(v: RowsRef, cols: usize, p: &[f32], out: &mut [f32]) {
    weighted_sum_rows_on(arch(), v, cols, p, out)
}

fn weighted_sum_rows_on(arch: Arch, v: RowsRef, cols: usize, p: &[f32], out: &mut [f32]) {
    match v {
        RowsRef::F32(v) => arch.dispatch(WeightedSum { v, cols, p, out }),
        RowsRef::Bf16(v) => {
            let Some(pairs) = bf16_pairs(v, cols) else {
                let wide: Vec<f32> = v.iter().map(|v| v.to_f32()).collect();
                return arch.dispatch(WeightedSum {
                    v: &wide,
                    cols,
                    p,
                    out,
                });
            };
            // Sums in [`Bf16Rows`]'s order (each block's even columns, then its odd ones),
            // put back in order at the end; the columns past the last block, one by one.
            let block = 2 * arch.dispatch(Lanes);
            let full = cols / block * block;
            let mut sums = vec![0f32; full];
            arch.dispatch(WeightedSumBf16 {
                v: pairs,
                cols,
                p,
                out: &mut sums,
            });
            for (b, s) in sums.chunks_exact(block).enumerate() {
                let o = &mut out[b * block..(b + 1) * block];
                for (k, &e) in s[..block / 2].iter().enumerate() {
                    o[2 * k] += e;
                }
                for (k, &od) in s[block / 2..].iter().enumerate() {
                    o[2 * k + 1] += od;
                }
            }
            for (row, &pj) in pairs.chunks_exact(cols / 2).zip(p) {
                for (k, o) in out.iter_mut().enumerate().skip(full) {
                    *o += pj * Bf16Rows::scalar(row, k);
                }
            }
        }
    }
}

/// [`WeightedSum`] over bf16 rows read as u32 pairs, into the whole blocks' sums in
/// [`Bf16Rows`]'s order.
struct WeightedSumBf16<'a> {
    v: &'a [u32],
    cols: usize,
    p: &'a [f32],
    out: &'a mut [f32],
}

impl WithSimd for WeightedSumBf16<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        let WeightedSumBf16 { v, cols, p, out } = self;
        let ov: &mut [[S::f32s; 2]] = bytemuck::cast_slice_mut(S::as_mut_simd_f32s(out).0);
        let stride = cols / 2;
        let row_bytes = stride * 4;
        let (ahead, lines) = if row_bytes <= SHORT_ROW_BYTES {
            (
                PREFETCH_BYTES.div_ceil(row_bytes.max(1)),
                row_bytes.div_ceil(64),
            )
        } else {
            (0, 0)
        };
        for (j, (row, &pj)) in v.chunks_exact(stride).zip(p).enumerate() {
            for l in 0..lines {
                super::prefetch::read(v, (j + ahead) * stride + l * 16);
            }
            if pj == 0.0 {
                continue;
            }
            let pv = simd.splat_f32s(pj);
            for (o, &u) in ov.iter_mut().zip(Bf16Rows::units::<S>(row)) {
                let [e, od] = Bf16Rows::widen(simd, u);
                o[0] = simd.mul_add_e_f32s(pv, e, o[0]);
                o[1] = simd.mul_add_e_f32s(pv, od, o[1]);
            }
        }
    }
}

struct WeightedSum<'a> {
    v: &'a [f32],
    cols: usize,
    p: &'a [f32],
    out: &'a mut [f32],
}

impl WithSimd for WeightedSum<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        let WeightedSum { v, cols, p, out } = self;
        let (ov, ot) = S::as_mut_simd_f32s(out);
        let nv = ov.len();
        for (row, &pj) in v.chunks_exact(cols).zip(p) {
            if pj == 0.0 {
                continue;
            }
            let (rv, rt) = S::as_simd_f32s(row);
            let rv = &rv[..nv];
            let pv = simd.splat_f32s(pj);
            for (o, &r) in ov.iter_mut().zip(rv) {
                *o = simd.mul_add_e_f32s(pv, r, *o);
            }
            for (o, &r) in ot.iter_mut().zip(rt) {
                *o += pj * r;
            }
        }
    }
}

/// Splits the weight rows (`stride` storage elements each, `cols` weights) into blocks,
/// in parallel when the matrix is large.
fn run_rows<T: Sync>(
    w: &[T],
    stride: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    out_t: &mut [f32],
    kernel: impl Fn(&[T], &[f32], usize, &mut [f32]) + Sync,
) {
    let threads = rayon::current_num_threads();
    let rows = w.len() / stride;
    if rows * cols < PARALLEL_MIN_WEIGHTS || threads == 1 {
        kernel(w, x, m, out_t);
        return;
    }
    let block = rows.div_ceil(threads * 4).max(1);
    super::team::chunks_mut(out_t, block * m, |i, ob| {
        let start = i * block * stride;
        let end = (start + block * stride).min(w.len());
        kernel(&w[start..end], x, m, ob)
    });
}

/// Weight storage the kernel reads in units that each widen to two f32 SIMD vectors.
trait Rows: Sync {
    type Elem: Copy + Sync;
    type Unit<S: Simd>: Copy;
    /// Storage elements per row of `cols` weights.
    fn stride(cols: usize) -> usize;
    /// The vectorised part of one row.
    fn units<S: Simd>(row: &[Self::Elem]) -> &[Self::Unit<S>];
    fn widen<S: Simd>(simd: S, u: Self::Unit<S>) -> [S::f32s; 2];
    /// Weight `k` of a row (for the scalar tail).
    fn scalar(row: &[Self::Elem], k: usize) -> f32;
}

struct F32Rows;

impl Rows for F32Rows {
    type Elem = f32;
    type Unit<S: Simd> = [S::f32s; 2];
    fn stride(cols: usize) -> usize {
        cols
    }
    #[inline(always)]
    fn units<S: Simd>(row: &[f32]) -> &[[S::f32s; 2]] {
        let v = S::as_simd_f32s(row).0;
        bytemuck::cast_slice(&v[..v.len() / 2 * 2])
    }
    #[inline(always)]
    fn widen<S: Simd>(_simd: S, u: [S::f32s; 2]) -> [S::f32s; 2] {
        u
    }
    #[inline(always)]
    fn scalar(row: &[f32], k: usize) -> f32 {
        row[k]
    }
}

/// bf16 weights read as u32 pairs: a unit widens to the even elements of its block, then
/// the odd ones; activations are permuted to match ([`interleave_for_bf16`]). Widening
/// bf16 is exact: the bits move up 16 places.
struct Bf16Rows;

impl Rows for Bf16Rows {
    type Elem = u32;
    type Unit<S: Simd> = S::u32s;
    fn stride(cols: usize) -> usize {
        cols / 2
    }
    #[inline(always)]
    fn units<S: Simd>(row: &[u32]) -> &[S::u32s] {
        S::as_simd_u32s(row).0
    }
    #[inline(always)]
    fn widen<S: Simd>(simd: S, u: S::u32s) -> [S::f32s; 2] {
        let even = simd.mul_u32s(u, simd.splat_u32s(1 << 16));
        let odd = simd.and_u32s(u, simd.splat_u32s(0xFFFF_0000));
        [
            simd.transmute_f32s_u32s(even),
            simd.transmute_f32s_u32s(odd),
        ]
    }
    #[inline(always)]
    fn scalar(row: &[u32], k: usize) -> f32 {
        let w = row[k / 2];
        f32::from_bits(if k.is_multiple_of(2) {
            w << 16
        } else {
            w & 0xFFFF_0000
        })
    }
}

/// Reorders each activation row to match [`Bf16Rows`]: per block of `2 * lanes` values,
/// the even ones then the odd ones; the scalar tail keeps its order.
fn interleave_for_bf16(x: &[f32], cols: usize, lanes: usize) -> Vec<f32> {
    let block = 2 * lanes;
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols) {
        let full = cols / block * block;
        for b in row[..full].chunks_exact(block) {
            out.extend(b.iter().step_by(2));
            out.extend(b.iter().skip(1).step_by(2));
        }
        out.extend_from_slice(&row[full..]);
    }
    out
}

/// Dots every weight row with every activation row: `out[j * m + i] = w[j] . x[i]`.
struct Dot<'a, W: Rows> {
    w: &'a [W::Elem],
    cols: usize,
    x: &'a [f32],
    m: usize,
    out: &'a mut [f32],
}

impl<W: Rows> WithSimd for Dot<'_, W> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        let Dot { w, cols, x, m, out } = self;
        let mut i = 0;
        while i < m {
            let r = (m - i).min(4);
            let xs = &x[i * cols..(i + r) * cols];
            match r {
                1 => rows_pass::<S, W, 1>(simd, w, cols, xs, i, m, out),
                2 => rows_pass::<S, W, 2>(simd, w, cols, xs, i, m, out),
                3 => rows_pass::<S, W, 3>(simd, w, cols, xs, i, m, out),
                _ => rows_pass::<S, W, 4>(simd, w, cols, xs, i, m, out),
            }
            i += r;
        }
    }
}

/// `J` weight rows at once against `R` activation rows, one column block.
#[inline(always)]
fn multi_row<S: Simd, W: Rows, const R: usize, const J: usize>(
    simd: S,
    w: &[W::Elem],
    stride: usize,
    s0: usize,
    s1: usize,
    nu: usize,
    xv: &[&[[S::f32s; 2]]; R],
    j: usize,
    i0: usize,
    m: usize,
    out: &mut [f32],
) {
    let zero = simd.splat_f32s(0.0);
    let u: [&[W::Unit<S>]; J] = std::array::from_fn(|q| {
        &W::units::<S>(&w[(j + q) * stride + s0..(j + q) * stride + s1])[..nu]
    });
    let mut acc = [[zero; R]; J];
    for v in 0..nu {
        let wq: [[S::f32s; 2]; J] = std::array::from_fn(|q| W::widen(simd, u[q][v]));
        for r in 0..R {
            let [xa, xb] = xv[r][v];
            for q in 0..J {
                acc[q][r] = simd.mul_add_e_f32s(wq[q][0], xa, acc[q][r]);
                acc[q][r] = simd.mul_add_e_f32s(wq[q][1], xb, acc[q][r]);
            }
        }
    }
    for q in 0..J {
        for r in 0..R {
            out[(j + q) * m + i0 + r] += simd.reduce_sum_f32s(acc[q][r]);
        }
    }
}

/// Columns per block: activation chunks of this many values stay in L1 while every weight
/// row streams past them.
const COL_BLOCK: usize = 1 << 20;
/// Rows at least this long are read two at a time (two streams keep the prefetchers busier
/// on long rows; on short ones, one stream is faster).
const PAIRED_ROW_MIN_COLS: usize = 3072;
/// Batches of this many rows also pair weight rows: each activation load then feeds two
/// FMAs, which is what bounds these products.
const PAIRED_ROW_MIN_BATCH: usize = 8;

/// Rows of at most this many bytes are prefetched ahead (the hardware prefetchers follow
/// long rows well and short ones late).
const SHORT_ROW_BYTES: usize = 1024;
/// How far ahead short rows are prefetched.
const PREFETCH_BYTES: usize = 2048;

/// One pass over all weight rows for `R` activation rows, a block of columns at a time,
/// adding into `out`.
#[inline(always)]
fn rows_pass<S: Simd, W: Rows, const R: usize>(
    simd: S,
    w: &[W::Elem],
    cols: usize,
    xs: &[f32],
    i0: usize,
    m: usize,
    out: &mut [f32],
) {
    let stride = W::stride(cols);
    let rows = w.len() / stride;
    let unit_cols = 2 * S::F32_LANES;
    let vec_cols = cols / unit_cols * unit_cols;
    let block = (COL_BLOCK / unit_cols).max(1) * unit_cols;
    let zero = simd.splat_f32s(0.0);
    let mut c0 = 0;
    while c0 < vec_cols {
        let c1 = (c0 + block).min(vec_cols);
        let nu = (c1 - c0) / unit_cols;
        // Storage offsets of the block (bf16 pairs: half the column index).
        let (s0, s1) = (c0 * stride / cols, c1 * stride / cols);
        let xv: [&[[S::f32s; 2]]; R] = std::array::from_fn(|r| {
            let v = S::as_simd_f32s(&xs[r * cols + c0..r * cols + c1]).0;
            let pairs: &[[S::f32s; 2]] = bytemuck::cast_slice(&v[..2 * nu]);
            pairs
        });
        let mut j = 0;
        if cols >= PAIRED_ROW_MIN_COLS || m >= PAIRED_ROW_MIN_BATCH {
            let group = if R <= 2 && cols >= PAIRED_ROW_MIN_COLS {
                4
            } else {
                2
            };
            if group == 4 {
                while j + 3 < rows {
                    multi_row::<S, W, R, 4>(simd, w, stride, s0, s1, nu, &xv, j, i0, m, out);
                    j += 4;
                }
            }
            while j + 1 < rows {
                multi_row::<S, W, R, 2>(simd, w, stride, s0, s1, nu, &xv, j, i0, m, out);
                j += 2;
            }
        }
        // Short rows (attention's keys): prefetch about 2 KB ahead, a line at a time.
        let row_bytes = stride * std::mem::size_of::<W::Elem>();
        let (ahead, lines) = if row_bytes <= SHORT_ROW_BYTES {
            let ahead = PREFETCH_BYTES.div_ceil(row_bytes.max(1));
            (ahead, row_bytes.div_ceil(64))
        } else {
            (0, 0)
        };
        let line = 64 / std::mem::size_of::<W::Elem>();
        while j < rows {
            for l in 0..lines {
                super::prefetch::read(w, (j + ahead) * stride + l * line);
            }
            let u = &W::units::<S>(&w[j * stride + s0..j * stride + s1])[..nu];
            // Separate accumulators for the two halves of a unit: twice the independent
            // FMA chains, so small batches are not bound by FMA latency.
            let mut acc_a = [zero; R];
            let mut acc_b = [zero; R];
            for v in 0..nu {
                let [a, b] = W::widen(simd, u[v]);
                for r in 0..R {
                    let [xa, xb] = xv[r][v];
                    acc_a[r] = simd.mul_add_e_f32s(a, xa, acc_a[r]);
                    acc_b[r] = simd.mul_add_e_f32s(b, xb, acc_b[r]);
                }
            }
            for r in 0..R {
                out[j * m + i0 + r] += simd.reduce_sum_f32s(simd.add_f32s(acc_a[r], acc_b[r]));
            }
            j += 1;
        }
        c0 = c1;
    }
    if vec_cols < cols {
        for j in 0..rows {
            let row = &w[j * stride..(j + 1) * stride];
            for r in 0..R {
                let xrow = &xs[r * cols..(r + 1) * cols];
                let tail: f32 = (vec_cols..cols).map(|k| W::scalar(row, k) * xrow[k]).sum();
                out[j * m + i0 + r] += tail;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn quantized_matrices_stay_quantized_when_their_format_is_asked_for() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (rows, cols) = (512, 512);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).expect("t");
        let q = || QTensor::quantize(&t, GgmlDType::Q8_0).expect("q8");
        let kept = Matrix::from_quantized(q(), WeightPrecision::Q8_0).expect("kept");
        assert_eq!(kept.format(), "q8_0");
        assert_eq!(kept.size_in_bytes(), rows * cols / 32 * 34);
        // The same product as quantizing the dequantized weights again.
        let deq = q().dequantize(&Device::Cpu).expect("deq");
        let again = Matrix::with_precision(&deq, WeightPrecision::Q8_0).expect("again");
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        assert_eq!(
            kept.matmul_t(&x, 1).expect("a"),
            again.matmul_t(&x, 1).expect("b")
        );
        // Other precisions convert it as it loads.
        let bf16 = Matrix::from_quantized(q(), WeightPrecision::Bf16).expect("bf16");
        assert_eq!(bf16.format(), "bf16");
        let t_small = Tensor::ones((4, 64), DType::F32, &Device::Cpu).expect("small");
        let small = QTensor::quantize(&t_small, GgmlDType::Q8_0).expect("s");
        assert_eq!(
            Matrix::from_quantized(small, WeightPrecision::Q8_0)
                .expect("small")
                .format(),
            "f32"
        );
    }

    #[test]
    fn ggml_blocks_read_as_ggml_defines_them() {
        // candle's q8_0 and q4_0 blocks (GGML's layouts), taken as stored: dequantized they
        // are candle's dequantization exactly.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (rows, cols) = (520, 544);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).expect("t");
        for (dtype, precision, name) in [
            (GgmlDType::Q8_0, WeightPrecision::Q8_0, "q8_0"),
            (GgmlDType::Q4_0, WeightPrecision::Q4, "q4_0"),
        ] {
            let q = QTensor::quantize(&t, dtype).expect("quantize");
            let want: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .and_then(|d| d.flatten_all()?.to_vec1())
                .expect("candle");
            let m = Matrix::from_quantized(q, precision).expect("kept");
            assert_eq!(m.format(), name);
            let got: Vec<f32> = m
                .to_f32()
                .and_then(|d| Ok(d.flatten_all()?.to_vec1()?))
                .expect("ours");
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn a_slice_of_a_stacked_tensor_is_quantized_from_its_own_rows() {
        // Two per-step matrices stacked on the rows, as the published depformer holds them.
        let (rows, cols) = (512, 512);
        let wave = |offset: f32| {
            let v: Vec<f32> = (0..rows * cols)
                .map(|i| offset + 0.5 * (i as f32 * 0.1).sin())
                .collect();
            Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("wave")
        };
        let (top, bottom) = (wave(1.0), wave(-3.0));
        let stacked = Tensor::cat(&[&top, &bottom], 0).expect("cat");
        for precision in [
            WeightPrecision::Q8_0,
            WeightPrecision::Q6,
            WeightPrecision::Q5,
            WeightPrecision::Q4,
            WeightPrecision::Bf16,
        ] {
            let m =
                Matrix::with_precision(&stacked.narrow(0, rows, rows).expect("view"), precision)
                    .expect("matrix");
            let back: Vec<f32> = m
                .to_f32()
                .expect("f32")
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .expect("values");
            let mean = back.iter().sum::<f32>() / back.len() as f32;
            assert!(
                back.iter().all(|&v| v < -2.0) && (mean + 3.0).abs() < 0.05,
                "{precision}: {:?}, mean {mean}",
                &back[..4]
            );
        }
    }

    #[test]
    fn auto_precision_fits_the_memory_available() {
        let gb = 1_000_000_000u64;
        // STT 1B (about 1 billion weights) with 24 GB free: q8_0.
        let (p, why) = WeightPrecision::auto_for(gb, Some(24 * gb), None);
        assert_eq!(p, WeightPrecision::Q8_0, "{why}");
        assert!(why.contains("keeps the model's quality"), "{why}");
        // Moshi 7B (7.7 billion): q8_0 needs 10.2 GB.
        assert_eq!(
            WeightPrecision::auto_for(7_700_000_000, Some(12 * gb), None).0,
            WeightPrecision::Q8_0
        );
        // q6 needs 7.8 GB.
        let (p, why) = WeightPrecision::auto_for(7_700_000_000, Some(8 * gb), None);
        assert_eq!(p, WeightPrecision::Q6, "{why}");
        assert!(
            why.contains("q8_0 would need") && why.contains("q6 needs 7.8 GB"),
            "{why}"
        );
        let (p, why) = WeightPrecision::auto_for(7_700_000_000, Some(7 * gb), None);
        assert_eq!(p, WeightPrecision::Q5, "{why}");
        assert!(
            why.contains("q8_0 would need") && why.contains("q5 needs"),
            "{why}"
        );
        let (p, why) = WeightPrecision::auto_for(7_700_000_000, Some(6 * gb), None);
        assert_eq!(p, WeightPrecision::Q4, "{why}");
        assert!(
            why.contains("q8_0 would need") && why.contains("q4 needs"),
            "{why}"
        );
        let (p, why) = WeightPrecision::auto_for(7_700_000_000, Some(2 * gb), None);
        assert_eq!(p, WeightPrecision::Q4, "{why}");
        assert!(why.contains("may fail"), "{why}");
        assert_eq!(
            WeightPrecision::auto_for(gb, None, None).0,
            WeightPrecision::Q8_0
        );
    }

    #[test]
    fn auto_precision_keeps_up_with_live_audio() {
        let gb = 1_000_000_000u64;
        // STT 1B at the Xeon VM's 32 GB/s: q8_0 about 44 ms a step, within the budget.
        let (p, why) = WeightPrecision::auto_for(gb, Some(24 * gb), Some(32.0));
        assert_eq!(p, WeightPrecision::Q8_0, "{why}");
        assert!(
            why.contains("a step about 44 ms at this CPU's 32 GB/s"),
            "{why}"
        );
        // At 16 GB/s (one thread of it): q8_0 89 ms, q5 72, q4 54: q4.
        let (p, why) = WeightPrecision::auto_for(gb, Some(24 * gb), Some(16.0));
        assert_eq!(p, WeightPrecision::Q4, "{why}");
        assert!(why.contains("q8_0 would take about 89 ms"), "{why}");
        assert!(why.contains("q4 needs 0.7 GB, a step about 54 ms"), "{why}");
        // At 22 GB/s: q8_0 64 ms, q6 57: q6.
        let (p, why) = WeightPrecision::auto_for(gb, Some(24 * gb), Some(22.0));
        assert_eq!(p, WeightPrecision::Q6, "{why}");
        assert!(why.contains("q6 needs 1.0 GB, a step about 57 ms"), "{why}");
        // At 20 GB/s: q8_0 71 ms, q6 62, q5 57: q5.
        assert_eq!(
            WeightPrecision::auto_for(gb, Some(24 * gb), Some(20.0)).0,
            WeightPrecision::Q5
        );
        // Moshi 7B on the same CPU: nothing keeps up; q4, said so.
        let (p, why) = WeightPrecision::auto_for(7_700_000_000, Some(24 * gb), Some(32.0));
        assert_eq!(p, WeightPrecision::Q4, "{why}");
        assert!(why.contains("no format keeps up"), "{why}");
        // A probe that measured nothing is ignored.
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let (p, why) = WeightPrecision::auto_for(gb, Some(24 * gb), Some(bad));
            assert_eq!(p, WeightPrecision::Q8_0, "{bad}: {why}");
            assert!(why.contains("not measured"), "{why}");
        }
        // Memory still comes first.
        let (p, why) = WeightPrecision::auto_for(7_700_000_000, Some(6 * gb), Some(1000.0));
        assert_eq!(p, WeightPrecision::Q4, "{why}");
        assert!(why.contains("q8_0 would need"), "{why}");
    }

    use super::*;

    fn reference(w: &[f32], rows: usize, cols: usize, x: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * rows];
        for i in 0..m {
            for j in 0..rows {
                out[i * rows + j] = (0..cols)
                    .map(|k| w[j * cols + k] as f64 * x[i * cols + k] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn quantized_products_stay_close_to_f32() {
        let (rows, cols) = (600, 1024);
        let mut seed = 11u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let w: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
        let t = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).expect("t");
        for (precision, label, bytes, tol) in [
            // Measured: q8_0 5.4e-3, q6 1.6e-2, q5 3.2e-2, q4 6.5e-2 (the rounding step
            // halves with each bit).
            (WeightPrecision::Q8_0, "q8_0", rows * cols / 32 * 34, 0.01),
            (WeightPrecision::Q6, "q6", rows * cols / 32 * 26, 0.025),
            (WeightPrecision::Q5, "q5_0", rows * cols / 32 * 22, 0.05),
            (WeightPrecision::Q4, "q4_0", rows * cols / 32 * 18, 0.1),
        ] {
            let mat = Matrix::with_precision(&t, precision).expect("quantize");
            assert_eq!(mat.format(), label);
            assert_eq!(mat.size_in_bytes(), bytes);
            for m in [1, 2, 5] {
                let x: Vec<f32> = (0..m * cols).map(|_| rnd()).collect();
                let got = mat.matmul_t(&x, m).expect("matmul");
                let want = reference(&w, rows, cols, &x, m);
                let err: f32 = got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum();
                let norm: f32 = want.iter().map(|b| b * b).sum();
                let rel = (err / norm).sqrt();
                eprintln!("{label}, m {m}: relative error {rel:.2e}");
                assert!(rel < tol, "{label}, m {m}: relative error {rel}");
            }
        }
    }

    #[test]
    fn matches_a_plain_loop_on_awkward_sizes() {
        let mut seed = 3u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &(rows, cols) in &[
            (1, 1),
            (3, 7),
            (33, 17),
            (7, 130),
            (64, 48),
            (600, 515),
            (1030, 1024),
            (9, 4100),
        ] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
            let t = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).expect("t");
            let mat = Matrix::new(&t).expect("matrix");
            let bf = mat.to_bf16().expect("bf16");
            let w_bf: Vec<f32> = bf
                .to_f32()
                .expect("f32")
                .flatten_all()
                .expect("f")
                .to_vec1()
                .expect("v");
            for m in [1, 2, 3, 5, 16, 17] {
                let x: Vec<f32> = (0..m * cols).map(|_| rnd()).collect();
                for (mat, w) in [(&mat, &w), (&bf, &w_bf)] {
                    let want = reference(w, rows, cols, &x, m);
                    for arch in arches() {
                        let got = mat.matmul_t_on(arch, &x, m).expect("matmul");
                        let err = got
                            .iter()
                            .zip(&want)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, f32::max);
                        assert!(
                            err < 1e-4,
                            "{rows}x{cols}, m {m}, {:?}, {}: err {err}",
                            mat.dtype(),
                            arch_name(arch)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn attention_kernels_match_a_plain_loop_at_every_simd_level() {
        let mut seed = 9u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        #[cfg(target_arch = "x86_64")]
        if pulp::x86::V3::try_new().is_some() {
            assert!(arches().len() >= 2, "scalar and at least AVX2");
        }
        for &(n, cols) in &[(1, 1), (5, 7), (13, 64), (40, 130), (3, 2050)] {
            let keys: Vec<f32> = (0..n * cols).map(|_| rnd()).collect();
            let keys_bf: Vec<half::bf16> = keys.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let keys_bf_f32: Vec<f32> = keys_bf.iter().map(|v| v.to_f32()).collect();
            let p: Vec<f32> = (0..n).map(|_| rnd().abs()).collect();
            for m in [1, 2, 3] {
                let x: Vec<f32> = (0..m * cols).map(|_| rnd()).collect();
                for (rows, plain) in [
                    (RowsRef::F32(&keys), &keys),
                    (RowsRef::Bf16(&keys_bf), &keys_bf_f32),
                ] {
                    // scores[j * m + i] = key j . query i
                    let want: Vec<f32> = (0..n)
                        .flat_map(|j| {
                            let key = &plain[j * cols..(j + 1) * cols];
                            let x = &x;
                            (0..m).map(move |i| {
                                key.iter()
                                    .zip(&x[i * cols..(i + 1) * cols])
                                    .map(|(a, b)| a * b)
                                    .sum()
                            })
                        })
                        .collect();
                    let mut sum_want = vec![0.5f32; cols];
                    for (j, &pj) in p.iter().enumerate() {
                        for (o, v) in sum_want.iter_mut().zip(&plain[j * cols..(j + 1) * cols]) {
                            *o += pj * v;
                        }
                    }
                    for arch in arches() {
                        let mut got = vec![f32::NAN; n * m];
                        dot_rows_on(arch, rows, cols, &x, m, &mut got);
                        let mut sum = vec![0.5f32; cols];
                        weighted_sum_rows_on(arch, rows, cols, &p, &mut sum);
                        for (a, b) in got.iter().zip(&want).chain(sum.iter().zip(&sum_want)) {
                            assert!(
                                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                                "{n} rows of {cols}, m {m}, {}: {a} vs {b}",
                                arch_name(arch)
                            );
                        }
                    }
                }
            }
        }
    }
}
