//! Mimi's encoder and decoder transformers (the reference's `ProjectedTransformer` around a
//! `StreamingTransformer`): pre-norm layers with RoPE self-attention over a causal
//! context window, a GELU MLP and layer scale.
//!
//! Streaming keeps keys and values in a ring of `context` entries, as the reference's
//! `RingKVCache` does, so a session of any length runs in constant memory. The ring is
//! written before attending, so when a call carries `T > 1` steps (Mimi: 2 steps at 25 Hz
//! per 80 ms frame) the first steps of a call see up to `T - 1` fewer past keys than the
//! offline path once the ring has wrapped. That is the reference's behaviour, kept here
//! for token-exact parity; offline runs use a ring large enough to see the whole window.

use candle_core::{Device, Tensor};

use super::config::TransformerConfig;
use super::conv::Seq;
use crate::compute::cpu::{dot_rows, weighted_sum_rows, Matrix, WeightPrecision};
use crate::models::weights::Weights;
use crate::{Error, Result};

#[derive(Debug, Clone)]
enum Norm {
    Layer {
        weight: Vec<f32>,
        bias: Vec<f32>,
        eps: f32,
    },
    Rms {
        alpha: Vec<f32>,
        eps: f32,
    },
}

impl Norm {
    fn load(w: &Weights, kind: &str, dim: usize) -> Result<Self> {
        Ok(match kind {
            "layer_norm" | "layer_norm_f32" => Norm::Layer {
                weight: w.get("weight", &[dim])?.to_vec1()?,
                bias: w.get("bias", &[dim])?.to_vec1()?,
                eps: if kind == "layer_norm" { 1e-5 } else { 1e-8 },
            },
            _ => Norm::Rms {
                alpha: w.get("alpha", &[1, 1, dim])?.flatten_all()?.to_vec1()?,
                eps: if kind == "rms_norm" { 1e-5 } else { 1e-8 },
            },
        })
    }

    /// Normalises each row of `x` (`[T, dim]`, row-major).
    fn forward(&self, x: &[f32], dim: usize) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for (row, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            match self {
                Norm::Layer { weight, bias, eps } => {
                    let mean = row.iter().sum::<f32>() / dim as f32;
                    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
                    let inv = 1.0 / (var + eps).sqrt();
                    for i in 0..dim {
                        o[i] = (row[i] - mean) * inv * weight[i] + bias[i];
                    }
                }
                Norm::Rms { alpha, eps } => {
                    let ms = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
                    let inv = 1.0 / (ms + eps).sqrt();
                    for i in 0..dim {
                        o[i] = row[i] * alpha[i] * inv;
                    }
                }
            }
        }
        out
    }
}

/// Keys and values of the last `capacity` steps with their absolute positions, laid out
/// per head (`[heads][capacity][head_dim]`) so each head's keys are one contiguous block.
#[derive(Debug, Clone)]
struct RingKv {
    capacity: usize,
    heads: usize,
    head_dim: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Absolute position held by each slot; -1 when empty.
    pos: Vec<i64>,
    written: usize,
}

impl RingKv {
    fn new(capacity: usize, heads: usize, head_dim: usize) -> Self {
        Self {
            capacity,
            heads,
            head_dim,
            k: vec![0.0; heads * capacity * head_dim],
            v: vec![0.0; heads * capacity * head_dim],
            pos: vec![-1; capacity],
            written: 0,
        }
    }

    /// Stores one step's keys and values (`heads * head_dim` each, heads concatenated).
    fn push(&mut self, k: &[f32], v: &[f32], pos: i64) {
        let slot = self.written % self.capacity;
        let hd = self.head_dim;
        for h in 0..self.heads {
            let dst = (h * self.capacity + slot) * hd;
            self.k[dst..dst + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
            self.v[dst..dst + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
        self.pos[slot] = pos;
        self.written += 1;
    }

    fn head_keys(&self, h: usize) -> &[f32] {
        let n = self.capacity * self.head_dim;
        &self.k[h * n..(h + 1) * n]
    }

    fn head_values(&self, h: usize) -> &[f32] {
        let n = self.capacity * self.head_dim;
        &self.v[h * n..(h + 1) * n]
    }

    fn reset(&mut self) {
        self.pos.iter_mut().for_each(|p| *p = -1);
        self.written = 0;
    }
}

#[derive(Debug, Clone)]
struct Layer {
    norm1: Norm,
    norm2: Norm,
    /// `[3 * d, d]`: rows are q, k, v, each `(head, head_dim)`.
    in_proj: Matrix,
    out_proj: Matrix,
    linear1: Matrix,
    linear2: Matrix,
    scale1: Option<Vec<f32>>,
    scale2: Option<Vec<f32>>,
}

/// Shared, read-only facts the layers need.
#[derive(Debug, Clone)]
struct Dims {
    d_model: usize,
    num_heads: usize,
    head_dim: usize,
    context: usize,
    rope: bool,
    max_period: f32,
}

#[derive(Debug, Clone)]
pub struct ProjectedTransformer {
    dims: Dims,
    sin_embedding: Option<f32>,
    input_proj: Option<Matrix>,
    output_proj: Option<Matrix>,
    layers: Vec<Layer>,
    /// The streaming state: one ring per layer.
    rings: Vec<RingKv>,
    /// Absolute position of the next step.
    offset: usize,
    device: Device,
}

impl ProjectedTransformer {
    /// Loads `{prefix}.transformer.layers.{i}.…` and the optional projections.
    pub fn load(w: &Weights, cfg: &TransformerConfig) -> Result<Self> {
        let d = cfg.d_model;
        let context = cfg.context.ok_or_else(|| Error::Config {
            path: w.path(),
            reason: "transformer.context must be set: streaming needs a bounded attention window"
                .into(),
        })?;
        let input_proj = if cfg.input_dimension != d {
            Some(Matrix::new(
                &w.get("input_proj.weight", &[d, cfg.input_dimension])?,
            )?)
        } else {
            None
        };
        let out_dim = cfg.output_dimensions[0];
        let output_proj = if out_dim != d {
            Some(Matrix::new(
                &w.get("output_projs.0.weight", &[out_dim, d])?,
            )?)
        } else {
            None
        };
        let ff = cfg.dim_feedforward;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let lw = w.pp(format!("transformer.layers.{i}"));
            let attn = lw.pp("self_attn");
            let scale = |name: &str| -> Result<Option<Vec<f32>>> {
                match cfg.layer_scale {
                    Some(_) => Ok(Some(lw.get(&format!("{name}.scale"), &[d])?.to_vec1()?)),
                    None => Ok(None),
                }
            };
            layers.push(Layer {
                norm1: Norm::load(&lw.pp("norm1"), &cfg.norm, d)?,
                norm2: Norm::load(&lw.pp("norm2"), &cfg.norm, d)?,
                // Published checkpoints say `in_proj_weight`; the current reference saves
                // `in_projs.0.weight`. Both are accepted, as its load hook does.
                in_proj: Matrix::new(&attn.get_any(
                    &["in_proj_weight", "in_proj.weight", "in_projs.0.weight"],
                    &[3 * d, d],
                )?)?,
                out_proj: Matrix::new(
                    &attn.get_any(&["out_proj.weight", "out_projs.0.weight"], &[d, d])?,
                )?,
                linear1: Matrix::new(&lw.get("linear1.weight", &[ff, d])?)?,
                linear2: Matrix::new(&lw.get("linear2.weight", &[d, ff])?)?,
                scale1: scale("layer_scale_1")?,
                scale2: scale("layer_scale_2")?,
            });
        }
        let sin_embedding = matches!(cfg.positional_embedding.as_str(), "sin" | "sin_rope")
            .then_some(cfg.positional_scale as f32);
        Ok(Self {
            dims: Dims {
                d_model: d,
                num_heads: cfg.num_heads,
                head_dim: d / cfg.num_heads,
                context,
                rope: matches!(cfg.positional_embedding.as_str(), "rope" | "sin_rope"),
                max_period: cfg.max_period as f32,
            },
            sin_embedding,
            input_proj,
            output_proj,
            rings: (0..layers.len())
                .map(|_| RingKv::new(context, cfg.num_heads, d / cfg.num_heads))
                .collect(),
            layers,
            offset: 0,
            device: Device::Cpu,
        })
    }

    /// Streaming step over `x.t()` steps; returns as many rows of the output dimension.
    pub fn step(&mut self, x: &Seq) -> Result<Seq> {
        let mut rings = std::mem::take(&mut self.rings);
        let out = self.run(&x.data, x.t(), &mut rings);
        self.rings = rings;
        out
    }

    /// Sizes the rings for `max_steps_per_call` steps per call. With `exact`, every step
    /// sees its whole `context` window (the reference's offline semantics, rings of
    /// `context + max_steps_per_call - 1`); otherwise rings hold `context` steps (the
    /// reference's streaming semantics). Resets the streaming state.
    pub fn set_window(&mut self, exact: bool, max_steps_per_call: usize) {
        let capacity = if exact {
            self.dims.context + max_steps_per_call.max(1) - 1
        } else {
            self.dims.context
        };
        let (heads, hd) = (self.dims.num_heads, self.dims.head_dim);
        self.rings = (0..self.layers.len())
            .map(|_| RingKv::new(capacity, heads, hd))
            .collect();
        self.offset = 0;
    }

    /// Runs `t` steps (`rows`: `[t, C_in]`) through every layer, layer `i` using `rings[i]`.
    fn run(&mut self, rows: &[f32], t: usize, rings: &mut [RingKv]) -> Result<Seq> {
        let dims = &self.dims;
        let d = dims.d_model;
        let mut x = match &self.input_proj {
            Some(w) => w.matmul_t(rows, t)?,
            None => rows.to_vec(),
        };
        if let Some(scale) = self.sin_embedding {
            add_sin_embedding(&mut x, d, self.offset, dims.max_period, scale);
        }
        let rope: Vec<Vec<(f32, f32)>> = if dims.rope {
            (0..t)
                .map(|i| rope_table(self.offset + i, dims.head_dim, dims.max_period))
                .collect()
        } else {
            vec![]
        };
        for (layer, kv) in self.layers.iter().zip(rings.iter_mut()) {
            layer_step(layer, &rope, kv, &mut x, t, self.offset, dims, &self.device)?;
        }
        self.offset += t;
        Ok(match &self.output_proj {
            Some(w) => Seq::new(w.rows(), w.matmul_t(&x, t)?),
            None => Seq::new(d, x),
        })
    }

    pub fn set_precision(&mut self, precision: WeightPrecision) -> Result<()> {
        for l in &mut self.layers {
            for m in [
                &mut l.in_proj,
                &mut l.out_proj,
                &mut l.linear1,
                &mut l.linear2,
            ] {
                m.set_precision(precision)?;
            }
        }
        for m in [&mut self.input_proj, &mut self.output_proj]
            .into_iter()
            .flatten()
        {
            m.set_precision(precision)?;
        }
        Ok(())
    }

    pub fn reset(&mut self) {
        self.offset = 0;
        self.rings.iter_mut().for_each(RingKv::reset);
    }

    pub fn state_bytes(&self) -> usize {
        self.rings
            .iter()
            .map(|r| (r.k.len() + r.v.len()) * 4 + r.pos.len() * 8)
            .sum()
    }
}

fn add_sin_embedding(x: &mut [f32], d: usize, offset: usize, max_period: f32, scale: f32) {
    let half = d / 2;
    for (t, row) in x.chunks_exact_mut(d).enumerate() {
        let pos = (offset + t) as f32;
        for i in 0..half {
            let phase = pos / max_period.powf(i as f32 / (half as f32 - 1.0));
            row[i] += scale * phase.cos();
            row[half + i] += scale * phase.sin();
        }
    }
}

/// `(cos, sin)` of each rotary frequency at `pos` (the reference's interleaved RoPE).
fn rope_table(pos: usize, head_dim: usize, max_period: f32) -> Vec<(f32, f32)> {
    let scale = -max_period.ln() * 2.0 / head_dim as f32;
    (0..head_dim / 2)
        .map(|i| {
            let angle = (i as f32 * scale).exp() * pos as f32;
            let (sin, cos) = angle.sin_cos();
            (cos, sin)
        })
        .collect()
}

/// Rotates each head of `v` by `table` (from [`rope_table`]).
fn apply_rope(v: &mut [f32], table: &[(f32, f32)]) {
    let head_dim = 2 * table.len();
    for head in v.chunks_exact_mut(head_dim) {
        for (pair, &(cos, sin)) in head.chunks_exact_mut(2).zip(table) {
            let (re, im) = (pair[0], pair[1]);
            pair[0] = re * cos - im * sin;
            pair[1] = re * sin + im * cos;
        }
    }
}

fn layer_step(
    layer: &Layer,
    rope: &[Vec<(f32, f32)>],
    kv: &mut RingKv,
    x: &mut [f32],
    t: usize,
    offset: usize,
    dims: &Dims,
    device: &Device,
) -> Result<()> {
    let d = dims.d_model;
    let hd = dims.head_dim;
    // Self-attention block.
    let h = layer.norm1.forward(x, d);
    let mut qkv = layer.in_proj.matmul_t(&h, t)?;
    for (i, row) in qkv.chunks_exact_mut(3 * d).enumerate() {
        if dims.rope {
            let (q, rest) = row.split_at_mut(d);
            let table = &rope[i];
            apply_rope(q, table);
            apply_rope(&mut rest[..d], table);
        }
    }
    for (i, row) in qkv.chunks_exact(3 * d).enumerate() {
        kv.push(&row[d..2 * d], &row[2 * d..], (offset + i) as i64);
    }
    // Queries of all `t` steps, head by head: `[heads][t][head_dim]`, pre-scaled.
    let inv_sqrt = 1.0 / (hd as f32).sqrt();
    let mut q = vec![0f32; t * d];
    for (i, row) in qkv.chunks_exact(3 * d).enumerate() {
        for h in 0..dims.num_heads {
            let dst = &mut q[(h * t + i) * hd..(h * t + i + 1) * hd];
            dst.iter_mut()
                .zip(&row[h * hd..(h + 1) * hd])
                .for_each(|(o, v)| *o = v * inv_sqrt);
        }
    }
    let cap = kv.capacity;
    let mut attn = vec![0f32; t * d];
    let mut scores = vec![0f32; cap * t];
    let mut probs = vec![0f32; cap];
    for h in 0..dims.num_heads {
        // scores[j * t + i]: key slot j against query i.
        dot_rows(
            kv.head_keys(h),
            hd,
            &q[h * t * hd..(h + 1) * t * hd],
            t,
            &mut scores,
        );
        for i in 0..t {
            let pos_q = (offset + i) as i64;
            let mut max = f32::NEG_INFINITY;
            for (j, p) in probs.iter_mut().enumerate() {
                let pk = kv.pos[j];
                let delta = pos_q - pk;
                *p = if pk >= 0 && delta >= 0 && delta < dims.context as i64 {
                    scores[j * t + i]
                } else {
                    f32::NEG_INFINITY
                };
                max = max.max(*p);
            }
            let mut sum = 0f32;
            for p in probs.iter_mut() {
                *p = if p.is_finite() { (*p - max).exp() } else { 0.0 };
                sum += *p;
            }
            let inv = 1.0 / sum;
            probs.iter_mut().for_each(|p| *p *= inv);
            let out = &mut attn[i * d + h * hd..i * d + (h + 1) * hd];
            weighted_sum_rows(kv.head_values(h), hd, &probs, out);
        }
    }
    let update = layer.out_proj.matmul_t(&attn, t)?;
    residual_add(x, &update, layer.scale1.as_deref(), d);
    // Feed-forward block.
    let h = layer.norm2.forward(x, d);
    let hidden = layer.linear1.matmul_t(&h, t)?;
    let ff = hidden.len() / t;
    let hidden: Vec<f32> = Tensor::from_vec(hidden, (t, ff), device)?
        .gelu_erf()?
        .flatten_all()?
        .to_vec1()?;
    let update = layer.linear2.matmul_t(&hidden, t)?;
    residual_add(x, &update, layer.scale2.as_deref(), d);
    Ok(())
}

fn residual_add(x: &mut [f32], update: &[f32], scale: Option<&[f32]>, d: usize) {
    match scale {
        Some(s) => {
            for (i, (xv, u)) in x.iter_mut().zip(update).enumerate() {
                *xv += s[i % d] * u;
            }
        }
        None => x.iter_mut().zip(update).for_each(|(xv, u)| *xv += u),
    }
}
