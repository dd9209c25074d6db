//! The split residual vector quantizer (the reference's `SplitResidualVectorQuantizer`):
//! one semantic RVQ with a single codebook and one acoustic RVQ with the rest, both
//! quantizing the same latent (the acoustic one does not see the semantic residual), their
//! decodings summed.

use super::config::QuantizerConfig;
use super::conv::Seq;
use crate::compute::cpu::{Matrix, WeightPrecision};
use crate::models::weights::Weights;
use crate::{Error, Result};

#[derive(Debug, Clone)]
struct Codebook {
    /// `[bins, dim]`, the centroids.
    embedding: Matrix,
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
            rows,
            norms,
            dim,
        })
    }

    fn set_precision(&mut self, precision: WeightPrecision) -> Result<()> {
        let mut m = self.embedding.clone();
        m.set_precision(precision)?;
        *self = Self::from_matrix(m, self.dim)?;
        Ok(())
    }

    /// Nearest centroid of each row of `x` (`t` rows of `dim`), by Euclidean distance.
    fn encode(&self, x: &[f32], t: usize) -> Result<Vec<u32>> {
        let dots = self.embedding.matmul_t(x, t)?;
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
