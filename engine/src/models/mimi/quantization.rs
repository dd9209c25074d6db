//! The split residual vector quantizer (the reference's `SplitResidualVectorQuantizer`):
//! one semantic RVQ with a single codebook and one acoustic RVQ with the rest, both
//! quantizing the same latent (the acoustic one does not see the semantic residual), their
//! decodings summed.

use super::config::QuantizerConfig;
use super::conv::Seq;
use crate::compute::cpu::{Matrix, WeightPrecision};
use crate::models::weights::Weights;
use crate::{Error, Result};
use candle_core::{Device, Tensor};

#[derive(Debug, Clone)]
struct Codebook {
    /// `[bins, dim]`, the centroids.
    embedding: Matrix,
    /// The same quantized centroids two to a row (`[bins / 2, 2 * dim]`), searched instead
    /// of `embedding` where a row of `dim` would be padded to a whole super-block of the
    /// quantized kernels (Mimi's 256 of 512: half of every row read would be padding).
    /// The blocks, and so the values and scales, are those of `embedding`.
    paired: Option<Matrix>,
    rows: Vec<f32>,
    /// Squared norm of each centroid.
    norms: Vec<f32>,
    dim: usize,
}

impl Codebook {
    fn load(w: &Weights, bins: usize, dim: usize) -> Result<Self> {
        // Names of the current reference, then those of older releases (its load hook).
        let sum = w.get_any(&["embedding_sum", "embed_sum", "embed_avg"], &[bins, dim])?;
        let usage = w.get_any(&["cluster_usage", "cluster_size"], &[bins])?;
        w.skip("_initialized");
        w.skip("inited");
        let embedding = sum.broadcast_div(&usage.clamp(1e-5f32, f32::INFINITY)?.unsqueeze(1)?)?;
        Self::from_matrix(Matrix::new(&embedding)?, dim)
    }

    /// Centroid rows and norms as the (possibly rounded) matrix holds them, so that the
    /// search and the decoding agree with each other.
    fn from_matrix(embedding: Matrix, dim: usize) -> Result<Self> {
        let rows: Vec<f32> = embedding.to_f32()?.flatten_all()?.to_vec1()?;
        let norms = rows
            .chunks_exact(dim)
            .map(|r| r.iter().map(|v| v * v).sum())
            .collect();
        Ok(Self {
            embedding,
            paired: None,
            rows,
            norms,
            dim,
        })
    }

    fn set_precision(&mut self, precision: WeightPrecision) -> Result<()> {
        let (bins, dim) = (self.embedding.rows(), self.dim);
        let mut m = self.embedding.clone();
        m.set_precision(precision)?;
        let paired = if m.is_quantized() && bins.is_multiple_of(2) && dim % 512 == 256 {
            let mut p = Matrix::new(&Tensor::from_vec(
                self.rows.clone(),
                (bins / 2, 2 * dim),
                &Device::Cpu,
            )?)?;
            p.set_precision(precision)?;
            Some(p)
        } else {
            None
        };
        *self = Self::from_matrix(m, dim)?;
        self.paired = paired;
        Ok(())
    }

    /// Every centroid's dot product with each of the `t` rows of `x`: `[t][bins]`.
    fn dots(&self, x: &[f32], t: usize) -> Result<Vec<f32>> {
        let Some(paired) = &self.paired else {
            return self.embedding.matmul_t(x, t);
        };
        // Row `i` of `paired` is centroids `2i` and `2i + 1`: each row of `x` is dotted
        // with them as `[x, 0]` and `[0, x]`.
        let d = self.dim;
        let mut wide = vec![0f32; 4 * t * d];
        for (r, row) in x.chunks_exact(d).enumerate() {
            wide[4 * r * d..4 * r * d + d].copy_from_slice(row);
            wide[(4 * r + 3) * d..(4 * r + 4) * d].copy_from_slice(row);
        }
        let half = paired.matmul_t(&wide, 2 * t)?;
        let pairs = paired.rows();
        let mut out = vec![0f32; t * 2 * pairs];
        for (r, o) in out.chunks_exact_mut(2 * pairs).enumerate() {
            let (even, odd) = (&half[2 * r * pairs..], &half[(2 * r + 1) * pairs..]);
            for (i, pair) in o.chunks_exact_mut(2).enumerate() {
                pair[0] = even[i];
                pair[1] = odd[i];
            }
        }
        Ok(out)
    }

    /// Nearest centroid of each row of `x` (`t` rows of `dim`), by Euclidean distance.
    fn encode(&self, x: &[f32], t: usize) -> Result<Vec<u32>> {
        let dots = self.dots(x, t)?;
        Ok(dots
            .chunks_exact(self.embedding.rows())
            .map(|row| {
                let mut best = (f32::INFINITY, 0u32);
                for (j, (&dot, &n)) in row.iter().zip(&self.norms).enumerate() {
                    let dist = n - 2.0 * dot;
                    if dist < best.0 {
                        best = (dist, j as u32);
                    }
                }
                best.1
            })
            .collect())
    }

    fn centroid(&self, code: u32) -> &[f32] {
        let c = code as usize;
        &self.rows[c * self.dim..(c + 1) * self.dim]
    }
}

#[derive(Debug, Clone)]
struct Rvq {
    /// `[dim, in]` and `[out, dim]` (1x1 convolutions without bias).
    input_proj: Matrix,
    output_proj: Matrix,
    codebooks: Vec<Codebook>,
    dim: usize,
}

impl Rvq {
    fn load(w: &Weights, cfg: &QuantizerConfig, n_q: usize) -> Result<Self> {
        let dim = cfg.dimension;
        let in_dim = cfg.input_dimension.unwrap_or(dim);
        let out_dim = cfg.output_dimension.unwrap_or(dim);
        let input_proj = Matrix::new(&w.get("input_proj.weight", &[dim, in_dim, 1])?)?;
        let output_proj = Matrix::new(&w.get("output_proj.weight", &[out_dim, dim, 1])?)?;
        let codebooks = (0..n_q)
            .map(|i| Codebook::load(&w.pp(format!("vq.layers.{i}._codebook")), cfg.bins, dim))
            .collect::<Result<_>>()?;
        Ok(Self {
            input_proj,
            output_proj,
            codebooks,
            dim,
        })
    }

    fn set_precision(&mut self, precision: WeightPrecision) -> Result<()> {
        self.input_proj.set_precision(precision)?;
        self.output_proj.set_precision(precision)?;
        self.codebooks
            .iter_mut()
            .try_for_each(|c| c.set_precision(precision))
    }

    /// `x`: `t` rows of `in`. Returns `n` rows of `t` codes.
    fn encode(&self, x: &[f32], t: usize, n: usize) -> Result<Vec<Vec<u32>>> {
        let mut residual = self.input_proj.matmul_t(x, t)?;
        let mut codes = Vec::with_capacity(n);
        for (k, cb) in self.codebooks[..n].iter().enumerate() {
            let c = cb.encode(&residual, t)?;
            if k + 1 < n {
                for (row, &code) in residual.chunks_exact_mut(self.dim).zip(&c) {
                    row.iter_mut()
                        .zip(cb.centroid(code))
                        .for_each(|(r, q)| *r -= q);
                }
            }
            codes.push(c);
        }
        Ok(codes)
    }

    /// `codes`: rows of `t` codes, one per codebook. Returns `t` rows of `out`.
    fn decode(&self, codes: &[Vec<u32>], t: usize) -> Result<Vec<f32>> {
        let mut sum = vec![0f32; t * self.dim];
        for (cb, row) in self.codebooks.iter().zip(codes) {
            for (ti, &code) in row.iter().enumerate() {
                let dst = &mut sum[ti * self.dim..(ti + 1) * self.dim];
                dst.iter_mut()
                    .zip(cb.centroid(code))
                    .for_each(|(d, c)| *d += c);
            }
        }
        self.output_proj.matmul_t(&sum, t)
    }
}

/// One RVQ as the GPU codec takes it: its projections and each codebook's centroid rows
/// and squared norms, exactly as the CPU searches them.
pub(super) struct RvqParts<'a> {
    pub input_proj: &'a Matrix,
    pub output_proj: &'a Matrix,
    pub codebooks: Vec<(&'a [f32], &'a [f32])>,
    pub dim: usize,
}

impl Rvq {
    fn parts(&self) -> RvqParts<'_> {
        RvqParts {
            input_proj: &self.input_proj,
            output_proj: &self.output_proj,
            codebooks: self
                .codebooks
                .iter()
                .map(|c| (c.rows.as_slice(), c.norms.as_slice()))
                .collect(),
            dim: self.dim,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SplitRvq {
    first: Rvq,
    rest: Rvq,
    n_q_semantic: usize,
    bins: usize,
}

impl SplitRvq {
    pub fn load(w: &Weights, cfg: &QuantizerConfig) -> Result<Self> {
        Ok(Self {
            first: Rvq::load(&w.pp("rvq_first"), cfg, cfg.n_q_semantic)?,
            rest: Rvq::load(&w.pp("rvq_rest"), cfg, cfg.n_q - cfg.n_q_semantic)?,
            n_q_semantic: cfg.n_q_semantic,
            bins: cfg.bins,
        })
    }

    pub fn set_precision(&mut self, precision: WeightPrecision) -> Result<()> {
        self.first.set_precision(precision)?;
        self.rest.set_precision(precision)
    }

    pub fn total_codebooks(&self) -> usize {
        self.first.codebooks.len() + self.rest.codebooks.len()
    }

    pub fn bins(&self) -> usize {
        self.bins
    }

    /// The semantic RVQ and the acoustic one.
    pub(super) fn parts(&self) -> (RvqParts<'_>, RvqParts<'_>) {
        (self.first.parts(), self.rest.parts())
    }

    /// `x`: latents, one row per frame; returns `num_codebooks` rows of codes.
    pub fn encode(&self, x: &Seq, num_codebooks: usize) -> Result<Vec<Vec<u32>>> {
        let t = x.t();
        let mut codes = self.first.encode(&x.data, t, self.n_q_semantic)?;
        if num_codebooks > self.n_q_semantic {
            codes.extend(
                self.rest
                    .encode(&x.data, t, num_codebooks - self.n_q_semantic)?,
            );
        }
        Ok(codes)
    }

    /// `codes`: `K` rows of `T` codes (`n_q_semantic <= K <= total`); returns `T` rows of
    /// latents.
    pub fn decode(&self, codes: &[Vec<u32>]) -> Result<Seq> {
        let k = codes.len();
        if k < self.n_q_semantic || k > self.total_codebooks() {
            return Err(Error::InvalidInput(format!(
                "{k} codebooks given; this Mimi decodes {} to {}",
                self.n_q_semantic,
                self.total_codebooks()
            )));
        }
        let t = codes[0].len();
        if let Some((i, _)) = codes.iter().enumerate().find(|(_, r)| r.len() != t) {
            return Err(Error::InvalidInput(format!(
                "codebook {i} has a different number of frames than codebook 0"
            )));
        }
        if let Some(bad) = codes.iter().flatten().find(|&&c| c as usize >= self.bins) {
            return Err(Error::InvalidInput(format!(
                "code {bad} is out of range: codebooks have {} entries",
                self.bins
            )));
        }
        let mut y = self.first.decode(&codes[..self.n_q_semantic], t)?;
        if k > self.n_q_semantic {
            let rest = self.rest.decode(&codes[self.n_q_semantic..], t)?;
            y.iter_mut().zip(&rest).for_each(|(a, b)| *a += b);
        }
        Ok(Seq::new(y.len() / t, y))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` values in [-0.5, 0.5) from a linear congruential generator.
    fn noise(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    fn codebook(bins: usize, dim: usize, seed: u32) -> Codebook {
        let values = noise(bins * dim, seed);
        let m = Matrix::new(
            &Tensor::from_vec(values, (bins, dim), &Device::Cpu).expect("test codebook"),
        )
        .expect("test codebook");
        Codebook::from_matrix(m, dim).expect("test codebook")
    }

    #[test]
    fn paired_search_reads_the_same_quantized_centroids() {
        let (bins, dim, t) = (1024, 256, 3);
        let mut cb = codebook(bins, dim, 5);
        let reference = cb.clone();
        cb.set_precision(WeightPrecision::Q8_0)
            .expect("test codebook");
        assert!(
            cb.paired.is_some(),
            "a 256-wide quantized codebook is searched in pairs"
        );
        let mut unpaired = cb.clone();
        unpaired.paired = None;
        let x = noise(t * dim, 11);
        let (a, b) = (
            cb.dots(&x, t).expect("test codebook"),
            unpaired.dots(&x, t).expect("test codebook"),
        );
        assert_eq!(a.len(), t * bins);
        for (i, (p, u)) in a.iter().zip(&b).enumerate() {
            assert!(
                (p - u).abs() <= 1e-4 * u.abs().max(1.0),
                "dot {i}: {p} vs {u}"
            );
        }
        // The same nearest centroids, and close to the f32 search's dot products.
        assert_eq!(
            cb.encode(&x, t).expect("test codebook"),
            unpaired.encode(&x, t).expect("test codebook")
        );
        let exact = reference.dots(&x, t).expect("test codebook");
        let worst = a
            .iter()
            .zip(&exact)
            .map(|(p, e)| (p - e).abs())
            .fold(0f32, f32::max);
        assert!(worst < 0.05, "quantized dots within {worst} of f32");
        // Other widths keep the plain search.
        let mut wide = codebook(512, 512, 3);
        wide.set_precision(WeightPrecision::Q8_0)
            .expect("test codebook");
        assert!(wide.embedding.is_quantized() && wide.paired.is_none());
    }
}
