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

use candle_core::{DType, Device, Storage, Tensor};
use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

use crate::{Error, Result};

/// Batches up to this many rows use the streaming kernel; larger ones use gemm.
pub const STREAMING_MAX_ROWS: usize = 16;
/// Below this many weights a product runs on the calling thread alone.
const PARALLEL_MIN_WEIGHTS: usize = 1 << 18;

/// A row-major `[rows, cols]` weight matrix (f32 or bf16).
#[derive(Debug, Clone)]
pub struct Matrix {
    tensor: Tensor,
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
        Ok(Self { tensor, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> DType {
        self.tensor.dtype()
    }

    /// The same matrix with its weights rounded to bf16.
    pub fn to_bf16(&self) -> Result<Self> {
        Ok(Self {
            tensor: self.tensor.to_dtype(DType::BF16)?,
            ..self.clone()
        })
    }

    /// The weights as a tensor (for gemm and for tests).
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// `out[i][j] = sum_k self[j][k] * x[i][k]`: `x` is `m` rows of `cols`, the result `m`
    /// rows of `rows` (that is `x @ self^T`, a linear layer without bias).
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
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
        if m > STREAMING_MAX_ROWS {
            let w = self.tensor.to_dtype(DType::F32)?;
            let xt = Tensor::from_slice(x, (m, self.cols), &Device::Cpu)?;
            return Ok(xt.matmul(&w.t()?)?.flatten_all()?.to_vec1()?);
        }
        let (storage, layout) = self.tensor.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Err(Error::InvalidInput("weights are not on the CPU".into()));
        };
        let start = layout.start_offset();
        let n = self.rows * self.cols;
        // out_t is [rows][m]: contiguous per weight row, so threads write disjoint blocks.
        let mut out_t = vec![0f32; self.rows * m];
        match self.tensor.dtype() {
            DType::F32 => {
                let w = &cpu.as_slice::<f32>()?[start..start + n];
                run_rows(w, self.cols, x, m, &mut out_t, |w, xs, m, o| {
                    Arch::new().dispatch(DotF32 {
                        w,
                        x: xs,
                        m,
                        out: o,
                    })
                });
            }
            _ => {
                let w = &cpu.as_slice::<half::bf16>()?[start..start + n];
                run_rows(w, self.cols, x, m, &mut out_t, |w, xs, m, o| {
                    Arch::new().dispatch(DotBf16 {
                        w,
                        x: xs,
                        m,
                        out: o,
                    })
                });
            }
        }
        let mut out = vec![0f32; m * self.rows];
        for (j, row) in out_t.chunks_exact(m).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                out[i * self.rows + j] = v;
            }
        }
        Ok(out)
    }
}

/// Splits the weight rows into blocks, in parallel when the matrix is large.
fn run_rows<T: Sync>(
    w: &[T],
    cols: usize,
    x: &[f32],
    m: usize,
    out_t: &mut [f32],
    kernel: impl Fn(&[T], &[f32], usize, &mut [f32]) + Sync,
) {
    let threads = rayon::current_num_threads();
    if w.len() < PARALLEL_MIN_WEIGHTS || threads == 1 {
        kernel(w, x, m, out_t);
        return;
    }
    let rows = w.len() / cols;
    let block = rows.div_ceil(threads * 4).max(1);
    w.par_chunks(block * cols)
        .zip(out_t.par_chunks_mut(block * m))
        .for_each(|(wb, ob)| kernel(wb, x, m, ob));
}

/// Dots every weight row with every activation row (f32 weights).
struct DotF32<'a> {
    w: &'a [f32],
    x: &'a [f32],
    m: usize,
    out: &'a mut [f32],
}

impl WithSimd for DotF32<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        let cols = self.x.len() / self.m;
        for (wrow, orow) in self
            .w
            .chunks_exact(cols)
            .zip(self.out.chunks_exact_mut(self.m))
        {
            let (wv, wt) = S::as_simd_f32s(wrow);
            let mut i = 0;
            while i < self.m {
                let r = (self.m - i).min(4);
                let mut acc = [simd.splat_f32s(0.0); 4];
                let xs: [&[f32]; 4] =
                    std::array::from_fn(|q| &self.x[(i + q.min(r - 1)) * cols..][..cols]);
                let xv: [&[S::f32s]; 4] = xs.map(|s| S::as_simd_f32s(s).0);
                for (v, &w) in wv.iter().enumerate() {
                    for q in 0..4 {
                        acc[q] = simd.mul_add_e_f32s(w, xv[q][v], acc[q]);
                    }
                }
                for q in 0..r {
                    let tail_x = &xs[q][cols - wt.len()..];
                    let tail: f32 = wt.iter().zip(tail_x).map(|(a, b)| a * b).sum();
                    orow[i + q] = simd.reduce_sum_f32s(acc[q]) + tail;
                }
                i += r;
            }
        }
    }
}

/// The same with bf16 weights, widened to f32 in registers.
struct DotBf16<'a> {
    w: &'a [half::bf16],
    x: &'a [f32],
    m: usize,
    out: &'a mut [f32],
}

impl WithSimd for DotBf16<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
        let cols = self.x.len() / self.m;
        let lanes = S::F32_LANES;
        let mut wbuf = vec![0f32; cols];
        for (wrow, orow) in self
            .w
            .chunks_exact(cols)
            .zip(self.out.chunks_exact_mut(self.m))
        {
            // Widen the row once (exact), then dot as f32; the row stays in L1.
            for (d, s) in wbuf.iter_mut().zip(wrow) {
                *d = s.to_f32();
            }
            let (wv, wt) = S::as_simd_f32s(&wbuf);
            let _ = lanes;
            let mut i = 0;
            while i < self.m {
                let r = (self.m - i).min(4);
                let mut acc = [simd.splat_f32s(0.0); 4];
                let xs: [&[f32]; 4] =
                    std::array::from_fn(|q| &self.x[(i + q.min(r - 1)) * cols..][..cols]);
                let xv: [&[S::f32s]; 4] = xs.map(|s| S::as_simd_f32s(s).0);
                for (v, &w) in wv.iter().enumerate() {
                    for q in 0..4 {
                        acc[q] = simd.mul_add_e_f32s(w, xv[q][v], acc[q]);
                    }
                }
                for q in 0..r {
                    let tail_x = &xs[q][cols - wt.len()..];
                    let tail: f32 = wt.iter().zip(tail_x).map(|(a, b)| a * b).sum();
                    orow[i + q] = simd.reduce_sum_f32s(acc[q]) + tail;
                }
                i += r;
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
    fn matches_a_plain_loop_on_awkward_sizes() {
        let mut seed = 3u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &(rows, cols) in &[(1, 1), (3, 7), (33, 17), (600, 515), (1030, 1024)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
            let t = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).expect("t");
            let mat = Matrix::new(&t).expect("matrix");
            let bf = mat.to_bf16().expect("bf16");
            let w_bf: Vec<f32> = bf
                .tensor()
                .to_dtype(DType::F32)
                .expect("f32")
                .flatten_all()
                .expect("f")
                .to_vec1()
                .expect("v");
            for m in [1, 2, 3, 5, 16, 17] {
                let x: Vec<f32> = (0..m * cols).map(|_| rnd()).collect();
                for (mat, w) in [(&mat, &w), (&bf, &w_bf)] {
                    let got = mat.matmul_t(&x, m).expect("matmul");
                    let want = reference(w, rows, cols, &x, m);
                    let err = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        err < 1e-4,
                        "{rows}x{cols}, m {m}, {:?}: err {err}",
                        mat.dtype()
                    );
                }
            }
        }
    }
}
