//! The streaming transformer of Kyutai's models (the reference's `StreamingTransformer`
//! and `StreamingTransformerLayer`), shared by Mimi's encoder and decoder transformers and
//! the delayed-streams language models: pre-norm layers (LayerNorm or RMSNorm) with
//! self-attention (RoPE or none) over a causal window, a GELU MLP or an activation-gated
//! feed-forward, optional layer scale, optionally one set of weights per step (the
//! depformer; several steps may share a set by a schedule), and optionally cross-attention
//! over a fixed conditioning between self-attention and the feed-forward (the TTS: its
//! keys and values computed once per utterance, [`StreamingTransformer::set_cross_source`]).
//!
//! Streaming keeps keys and values in a ring of `context` entries per layer, as the
//! reference's `RingKVCache` does, so a session of any length runs in constant memory. The
//! ring is written before attending, so when a call carries `T > 1` steps (Mimi: 2 steps
//! at 25 Hz per 80 ms frame) the first steps of a call see up to `T - 1` fewer past keys
//! than the offline path once the ring has wrapped. That is the reference's behaviour,
//! kept for token-exact parity; [`StreamingTransformer::set_window`] gives the offline
//! semantics instead.

use crate::compute::cpu::{dot_rows, weighted_sum_rows, Matrix, RowsRef, WeightPrecision};
use crate::compute::team;
use crate::models::weights::Weights;
use crate::profile::{self, span};
use crate::{Error, Result};

/// What a transformer is made of, from a model's config.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerSpec {
    pub d_model: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub dim_feedforward: usize,
    /// `layer_norm`, `layer_norm_f32`, `rms_norm` or `rms_norm_f32`.
    pub norm: String,
    /// `none` (GELU MLP) or an activation for the gated feed-forward (`silu`, `gelu`).
    pub gating: String,
    pub layer_scale: bool,
    /// `rope`, `sin`, `sin_rope` or `none`.
    pub positional_embedding: String,
    pub positional_scale: f64,
    pub max_period: f64,
    /// Attention span in steps; None: unbounded (then `weights_per_step` bounds it).
    pub context: Option<usize>,
    /// 0: one set of weights; N: weights for each of N steps (the depformer).
    pub weights_per_step: usize,
    /// Which weight set each step uses (`depformer_weights_per_step_schedule`; None: step
    /// k uses set k). The sets are `max + 1`.
    pub weights_schedule: Option<Vec<usize>>,
    /// A cross-attention block in every layer (`cross_attention.*`, `norm_cross`).
    pub cross_attention: bool,
}

impl TransformerSpec {
    /// Distinct weight sets per layer (1 without per-step weights).
    pub fn weight_sets(&self) -> usize {
        match &self.weights_schedule {
            Some(s) => s.iter().max().map_or(1, |m| m + 1),
            None => self.weights_per_step.max(1),
        }
    }
}

/// LayerNorm or RMSNorm over the last dimension, as the reference's `create_norm_fn`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Norm {
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
    /// `kind`: `layer_norm` (eps 1e-5), `layer_norm_f32` (1e-8), `rms_norm` (1e-5) or
    /// `rms_norm_f32` (1e-8); LayerNorm reads `weight` and `bias`, RMSNorm `alpha`.
    pub(crate) fn load(w: &Weights, kind: &str, dim: usize) -> Result<Self> {
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
    pub(crate) fn forward(&self, x: &[f32], dim: usize) -> Vec<f32> {
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
    k: KvStore,
    v: KvStore,
    /// Absolute position held by each slot; -1 when empty.
    pos: Vec<i64>,
    written: usize,
}

/// The cache's values: f32 (the reference's arithmetic), or bf16 once the transformer's
/// matrices are quantized (what the reference holds when it runs in bf16; half the bytes,
/// which at full context are a sixth of a quantized model's step). Under `Bf16` it stays
/// f32, so that a bf16 checkpoint computes what it computes in f32, and so does a model
/// too small for any matrix to be quantized.
#[derive(Debug, Clone)]
enum KvStore {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

impl KvStore {
    fn rows(&self, start: usize, len: usize) -> RowsRef<'_> {
        match self {
            KvStore::F32(v) => RowsRef::F32(&v[start..start + len]),
            KvStore::Bf16(v) => RowsRef::Bf16(&v[start..start + len]),
        }
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvStore::F32(v) => v[at..at + src.len()].copy_from_slice(src),
            KvStore::Bf16(v) => v[at..at + src.len()]
                .iter_mut()
                .zip(src)
                .for_each(|(o, &x)| *o = half::bf16::from_f32(x)),
        }
    }

    fn make_bf16(&mut self) {
        if let KvStore::F32(v) = self {
            *self = KvStore::Bf16(v.iter().map(|&x| half::bf16::from_f32(x)).collect());
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KvStore::F32(v) => v.len() * 4,
            KvStore::Bf16(v) => v.len() * 2,
        }
    }
}

impl RingKv {
    fn new(capacity: usize, heads: usize, head_dim: usize) -> Self {
        Self {
            capacity,
            heads,
            head_dim,
            k: KvStore::F32(vec![0.0; heads * capacity * head_dim]),
            v: KvStore::F32(vec![0.0; heads * capacity * head_dim]),
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
            self.k.write(dst, &k[h * hd..(h + 1) * hd]);
            self.v.write(dst, &v[h * hd..(h + 1) * hd]);
        }
        self.pos[slot] = pos;
        self.written += 1;
    }

    /// Slots written since the last reset: the ring fills from slot 0, so these are the
    /// first `filled` slots (all of them once it is full).
    fn filled(&self) -> usize {
        self.written.min(self.capacity)
    }

    /// Head `h`'s keys in the filled slots: attention never reads a slot not yet written
    /// (in a session's first `capacity` steps, only part of the ring).
    fn head_keys(&self, h: usize) -> RowsRef<'_> {
        let n = self.capacity * self.head_dim;
        self.k.rows(h * n, self.filled() * self.head_dim)
    }

    /// Head `h`'s values in the filled slots.
    fn head_values(&self, h: usize) -> RowsRef<'_> {
        let n = self.capacity * self.head_dim;
        self.v.rows(h * n, self.filled() * self.head_dim)
    }

    fn reset(&mut self) {
        self.pos.iter_mut().for_each(|p| *p = -1);
        self.written = 0;
    }
}

#[derive(Debug, Clone)]
pub(crate) enum FeedForward {
    /// `linear2(gelu(linear1(x)))`.
    Mlp { linear1: Matrix, linear2: Matrix },
    /// `linear_out(act(a) * b)` where `[a, b] = linear_in(x)` (the reference's
    /// `ActivationGating`).
    Gated {
        linear_in: Matrix,
        linear_out: Matrix,
        silu: bool,
    },
}

impl FeedForward {
    fn matrices_mut(&mut self) -> [&mut Matrix; 2] {
        match self {
            FeedForward::Mlp { linear1, linear2 } => [linear1, linear2],
            FeedForward::Gated {
                linear_in,
                linear_out,
                ..
            } => [linear_in, linear_out],
        }
    }

    fn forward(&self, h: &[f32], t: usize) -> Result<Vec<f32>> {
        match self {
            FeedForward::Mlp { linear1, linear2 } => {
                let mut hidden = span(
                    || "layer: feed-forward in".into(),
                    || linear1.matmul_t(h, t),
                )?;
                span(
                    || "layer: activation".into(),
                    || {
                        team::chunks_mut(&mut hidden, ACTIVATION_CHUNK, |_, c| {
                            c.iter_mut().for_each(|v| *v = gelu_erf(*v))
                        })
                    },
                );
                span(
                    || "layer: feed-forward out".into(),
                    || linear2.matmul_t(&hidden, t),
                )
            }
            FeedForward::Gated {
                linear_in,
                linear_out,
                silu,
            } => {
                let both = span(
                    || "layer: feed-forward in".into(),
                    || linear_in.matmul_t(h, t),
                )?;
                let act_t0 = profile::start();
                let hidden = both.len() / t / 2;
                let act = |a: f32| {
                    if *silu {
                        a / (1.0 + (-a).exp())
                    } else {
                        gelu_erf(a)
                    }
                };
                let mut gated = vec![0f32; t * hidden];
                for (row, out) in both
                    .chunks_exact(2 * hidden)
                    .zip(gated.chunks_exact_mut(hidden))
                {
                    let (a, b) = row.split_at(hidden);
                    team::chunks_mut(out, ACTIVATION_CHUNK, |i, o| {
                        let at = i * ACTIVATION_CHUNK;
                        for ((o, &a), &b) in o.iter_mut().zip(&a[at..]).zip(&b[at..]) {
                            *o = act(a) * b;
                        }
                    });
                }
                profile::stop(act_t0, "layer: activation");
                span(
                    || "layer: feed-forward out".into(),
                    || linear_out.matmul_t(&gated, t),
                )
            }
        }
    }
}

impl FeedForward {
    fn size_in_bytes(&self) -> usize {
        match self {
            FeedForward::Mlp { linear1, linear2 } => {
                linear1.size_in_bytes() + linear2.size_in_bytes()
            }
            FeedForward::Gated {
                linear_in,
                linear_out,
                ..
            } => linear_in.size_in_bytes() + linear_out.size_in_bytes(),
        }
    }
}

/// GELU with the exact erf (PyTorch's default), as candle computes it.
/// Values per piece of an activation shared among the step's threads (a few microseconds of
/// `exp` or `erf` each).
const ACTIVATION_CHUNK: usize = 1024;

fn gelu_erf(v: f32) -> f32 {
    (candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * v
}

/// The reference's hidden size for gated feed-forwards.
pub(crate) fn gated_hidden(d_model: usize, dim_feedforward: usize) -> usize {
    if dim_feedforward == 4 * d_model {
        21 * d_model / 8
    } else {
        2 * dim_feedforward / 3
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) norm1: Norm,
    pub(crate) norm2: Norm,
    /// One per step (or one): `[3 * d, d]`, rows q, k, v, each `(head, head_dim)`.
    pub(crate) in_proj: Vec<Matrix>,
    pub(crate) out_proj: Vec<Matrix>,
    pub(crate) ff: Vec<FeedForward>,
    pub(crate) scale1: Option<Vec<f32>>,
    pub(crate) scale2: Option<Vec<f32>>,
    pub(crate) cross: Option<CrossAttention>,
}

/// Cross-attention over a conditioning fixed for an utterance (the reference's
/// `StreamingMultiheadAttention(cross_attention=True)` with its `norm_cross`): LayerNorm
/// (eps 1e-5), queries from the first third of `in_proj_weight`, keys and values from the
/// other two thirds applied to the conditioning, no position embedding and no mask,
/// `out_proj`, then the residual (with `layer_scale_cross` where layers have scales).
#[derive(Debug, Clone)]
pub(crate) struct CrossAttention {
    pub(crate) norm: Norm,
    /// `[d, d]`.
    pub(crate) q_proj: Matrix,
    /// `[2 * d, d]`: keys then values, each `(head, head_dim)`.
    pub(crate) kv_proj: Matrix,
    pub(crate) out_proj: Matrix,
    pub(crate) scale: Option<Vec<f32>>,
}

/// A conditioning's keys and values for one layer, per head: `[heads][n][head_dim]`; in
/// bf16 once the layer's matrices are quantized, as the self-attention cache (a TTS's
/// voice is 625 rows: f32 keys and values were 164 MB read every step at full size).
#[derive(Debug, Clone)]
struct CrossKv {
    k: KvStore,
    v: KvStore,
    n: usize,
}

impl Layer {
    fn load(lw: &Weights, spec: &TransformerSpec) -> Result<Self> {
        let d = spec.d_model;
        let n = spec.weight_sets();
        let attn = lw.pp("self_attn");
        // Published checkpoints say `in_proj_weight` (steps stacked on the rows); the
        // current reference saves `in_projs.{k}.weight`. Both are accepted, as its load
        // hook does.
        let per_step = |stacked: &[&str], split: &str, rows: usize| -> Result<Vec<Matrix>> {
            if attn.contains(&format!("{split}.0.weight")) {
                (0..n)
                    .map(|k| attn.matrix(&format!("{split}.{k}.weight"), &[rows, d]))
                    .collect()
            } else if n == 1 {
                Ok(vec![attn.matrix_any(stacked, &[rows, d])?])
            } else {
                let all = attn.get_any(stacked, &[n * rows, d])?;
                (0..n)
                    .map(|k| {
                        Matrix::with_precision(&all.narrow(0, k * rows, rows)?, lw.precision())
                    })
                    .collect()
            }
        };
        let in_proj = per_step(&["in_proj_weight", "in_proj.weight"], "in_projs", 3 * d)?;
        let out_proj = per_step(&["out_proj.weight"], "out_projs", d)?;
        let ff_dim = spec.dim_feedforward;
        let ff = if spec.gating == "none" {
            vec![FeedForward::Mlp {
                linear1: lw.matrix("linear1.weight", &[ff_dim, d])?,
                linear2: lw.matrix("linear2.weight", &[d, ff_dim])?,
            }]
        } else {
            let hidden = gated_hidden(d, ff_dim);
            let silu = spec.gating == "silu";
            let gw = |g: Weights| -> Result<FeedForward> {
                Ok(FeedForward::Gated {
                    linear_in: g.matrix("linear_in.weight", &[2 * hidden, d])?,
                    linear_out: g.matrix("linear_out.weight", &[d, hidden])?,
                    silu,
                })
            };
            if spec.weights_per_step > 0 {
                (0..n)
                    .map(|k| gw(lw.pp(format!("gating.{k}"))))
                    .collect::<Result<_>>()?
            } else {
                vec![gw(lw.pp("gating"))?]
            }
        };
        let scale = |name: &str| -> Result<Option<Vec<f32>>> {
            if spec.layer_scale {
                Ok(Some(lw.get(&format!("{name}.scale"), &[d])?.to_vec1()?))
            } else {
                Ok(None)
            }
        };
        let cross = if spec.cross_attention {
            let ca = lw.pp("cross_attention");
            let all = ca.get_any(&["in_proj_weight", "in_proj.weight"], &[3 * d, d])?;
            let part = |from: usize, rows: usize| {
                Matrix::with_precision(&all.narrow(0, from, rows)?, lw.precision())
            };
            Some(CrossAttention {
                // "Cross attention norm is always a layer norm" (the reference).
                norm: Norm::load(&lw.pp("norm_cross"), "layer_norm", d)?,
                q_proj: part(0, d)?,
                kv_proj: part(d, 2 * d)?,
                out_proj: ca.matrix("out_proj.weight", &[d, d])?,
                scale: scale("layer_scale_cross")?,
            })
        } else {
            None
        };
        Ok(Layer {
            norm1: Norm::load(&lw.pp("norm1"), &spec.norm, d)?,
            norm2: Norm::load(&lw.pp("norm2"), &spec.norm, d)?,
            in_proj,
            out_proj,
            ff,
            scale1: scale("layer_scale_1")?,
            scale2: scale("layer_scale_2")?,
            cross,
        })
    }
}

impl Layer {
    /// The `-candle` layout: one transformer per step (`slices[k].layers.{i}`), each with
    /// its own copy of the norms; the norms of slice 0 are used and the others must match.
    fn load_slices(slices: &[Weights], i: usize, spec: &TransformerSpec) -> Result<Self> {
        let one = TransformerSpec {
            weights_per_step: 0,
            ..spec.clone()
        };
        let mut parts = slices
            .iter()
            .map(|s| Layer::load(&s.pp(format!("layers.{i}")), &one))
            .collect::<Result<Vec<_>>>()?;
        let mut first = parts.remove(0);
        for p in parts {
            if p.norm1 != first.norm1 || p.norm2 != first.norm2 {
                return Err(Error::InvalidInput(format!(
                    "depformer layer {i}: per-step copies of the norms differ"
                )));
            }
            first.in_proj.extend(p.in_proj);
            first.out_proj.extend(p.out_proj);
            first.ff.extend(p.ff);
        }
        Ok(first)
    }
}

/// Shared, read-only facts the layers need.
#[derive(Debug, Clone)]
pub(crate) struct Dims {
    pub(crate) d_model: usize,
    pub(crate) num_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) context: Option<usize>,
    pub(crate) rope: bool,
    pub(crate) max_period: f32,
    pub(crate) weights_per_step: usize,
    /// Which weight set each step uses (see [`TransformerSpec::weights_schedule`]).
    pub(crate) schedule: Option<Vec<usize>>,
}

impl Dims {
    /// The weight set of step `step` (0 without per-step weights).
    pub(crate) fn weight_set(&self, step: usize) -> usize {
        match (&self.schedule, self.weights_per_step) {
            (_, 0) => 0,
            (Some(s), _) => s.get(step).copied().unwrap_or(0),
            (None, _) => step,
        }
    }
}

#[derive(Debug, Clone)]
pub struct StreamingTransformer {
    dims: Dims,
    sin_embedding: Option<f32>,
    layers: Vec<Layer>,
    /// The streaming state: one ring per layer.
    rings: Vec<RingKv>,
    /// The conditioning's keys and values, per layer with cross-attention.
    cross: Vec<Option<CrossKv>>,
    /// Absolute position of the next step.
    offset: usize,
}

impl StreamingTransformer {
    /// Loads `{prefix}.layers.{i}.…`.
    pub fn load(w: &Weights, spec: &TransformerSpec) -> Result<Self> {
        Self::load_from(w, &[], spec)
    }

    /// Loads per-step weights stored as one transformer per step (`{slice}.layers.{i}`,
    /// the `-candle` checkpoints' depformer).
    pub fn load_slices(slices: &[Weights], spec: &TransformerSpec) -> Result<Self> {
        let first = slices
            .first()
            .ok_or_else(|| Error::InvalidInput("no transformer slices".into()))?;
        Self::load_from(first, slices, spec)
    }

    fn load_from(w: &Weights, slices: &[Weights], spec: &TransformerSpec) -> Result<Self> {
        let d = spec.d_model;
        if spec.num_heads == 0
            || !d.is_multiple_of(spec.num_heads)
            || !(d / spec.num_heads).is_multiple_of(2)
        {
            return Err(Error::config(
                w.path(),
                format!(
                    "d_model {d} is not a multiple of num_heads {} with an even head size",
                    spec.num_heads
                ),
            ));
        }
        if !matches!(
            spec.norm.as_str(),
            "layer_norm" | "layer_norm_f32" | "rms_norm" | "rms_norm_f32"
        ) {
            return Err(Error::config(
                w.path(),
                format!("unsupported norm `{}`", spec.norm),
            ));
        }
        if !matches!(spec.gating.as_str(), "none" | "silu" | "gelu") {
            return Err(Error::config(
                w.path(),
                format!("unsupported gating `{}`", spec.gating),
            ));
        }
        if !matches!(
            spec.positional_embedding.as_str(),
            "rope" | "sin" | "sin_rope" | "none"
        ) {
            return Err(Error::config(
                w.path(),
                format!(
                    "unsupported positional_embedding `{}`",
                    spec.positional_embedding
                ),
            ));
        }
        if let Some(sched) = &spec.weights_schedule {
            if sched.len() != spec.weights_per_step {
                return Err(Error::config(
                    w.path(),
                    format!(
                        "a weights-per-step schedule of {} steps for {} steps",
                        sched.len(),
                        spec.weights_per_step
                    ),
                ));
            }
        }
        if spec.context.is_none() && spec.weights_per_step == 0 {
            return Err(Error::config(
                w.path(),
                "a streaming transformer needs a bounded context",
            ));
        }
        let layers = (0..spec.num_layers)
            .map(|i| {
                if slices.is_empty() {
                    Layer::load(&w.pp(format!("layers.{i}")), spec)
                } else {
                    Layer::load_slices(slices, i, spec)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let sin_embedding = matches!(spec.positional_embedding.as_str(), "sin" | "sin_rope")
            .then_some(spec.positional_scale as f32);
        let mut t = Self {
            dims: Dims {
                d_model: d,
                num_heads: spec.num_heads,
                head_dim: d / spec.num_heads,
                context: spec.context,
                rope: matches!(spec.positional_embedding.as_str(), "rope" | "sin_rope"),
                max_period: spec.max_period as f32,
                weights_per_step: spec.weights_per_step,
                schedule: spec.weights_schedule.clone(),
            },
            sin_embedding,
            cross: vec![None; layers.len()],
            layers,
            rings: vec![],
            offset: 0,
        };
        t.set_window(false, 1);
        Ok(t)
    }

    /// The layers and shared facts, for other backends to upload.
    pub(crate) fn parts(&self) -> (&Dims, Option<f32>, &[Layer]) {
        (&self.dims, self.sin_embedding, &self.layers)
    }

    pub fn d_model(&self) -> usize {
        self.dims.d_model
    }

    /// Sizes the rings for `max_steps_per_call` steps per call. With `exact`, every step
    /// sees its whole `context` window (the reference's offline semantics, rings of
    /// `context + max_steps_per_call - 1`); otherwise rings hold `context` steps (the
    /// reference's streaming semantics; `weights_per_step` steps when the context is
    /// unbounded). Resets the streaming state.
    pub fn set_window(&mut self, exact: bool, max_steps_per_call: usize) {
        let base = self
            .dims
            .context
            .unwrap_or(self.dims.weights_per_step)
            .max(1);
        let capacity = if exact && self.dims.context.is_some() {
            base + max_steps_per_call.max(1) - 1
        } else {
            base
        };
        let (heads, hd) = (self.dims.num_heads, self.dims.head_dim);
        self.rings = (0..self.layers.len())
            .map(|_| RingKv::new(capacity, heads, hd))
            .collect();
        self.offset = 0;
    }

    /// Runs `t` steps (`rows`: `t` rows of `d_model`), continuing the stream. Returns `t`
    /// rows of `d_model`.
    pub fn step(&mut self, rows: &[f32], t: usize) -> Result<Vec<f32>> {
        self.step_part(rows, t, 0)
    }

    /// [`Self::step`] on the first `t` steps of a call of `t + ahead`: they see what they
    /// would in the whole call (the ring entries its later steps overwrite are hidden from
    /// them), so a call split in parts computes what it computes whole, the reference's
    /// streaming semantics included (Mimi's encoder starts a frame's first step early).
    pub fn step_part(&mut self, rows: &[f32], t: usize, ahead: usize) -> Result<Vec<f32>> {
        let dims = &self.dims;
        let d = dims.d_model;
        if rows.len() != t * d {
            return Err(Error::InvalidInput(format!(
                "transformer input of {} values for {t} steps of {d}",
                rows.len()
            )));
        }
        if dims.weights_per_step > 0 && self.offset + t > dims.weights_per_step {
            return Err(Error::InvalidInput(format!(
                "step {} of a transformer with weights for {} steps",
                self.offset + t,
                dims.weights_per_step
            )));
        }
        let mut x = rows.to_vec();
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
        // The oldest position still in the rings once the whole call has written its steps.
        let visible_from = |kv: &RingKv| (self.offset + t + ahead) as i64 - kv.capacity as i64;
        for ((layer, kv), cross) in self
            .layers
            .iter()
            .zip(self.rings.iter_mut())
            .zip(&self.cross)
        {
            let from = visible_from(kv);
            if layer.cross.is_some() && cross.is_none() {
                return Err(Error::InvalidInput(
                    "a cross-attention transformer stepped without its conditioning \
                     (set_cross_source)"
                        .into(),
                ));
            }
            let cross = cross.as_ref();
            if dims.weights_per_step > 0 {
                // Each step has its own weights: one step at a time.
                for i in 0..t {
                    let row = &mut x[i * d..(i + 1) * d];
                    let rope_i = if dims.rope {
                        &rope[i..i + 1]
                    } else {
                        &rope[..]
                    };
                    layer_step(
                        layer,
                        dims.weight_set(self.offset + i),
                        rope_i,
                        kv,
                        cross,
                        row,
                        1,
                        self.offset + i,
                        from,
                        dims,
                    )?;
                }
            } else {
                layer_step(
                    layer,
                    0,
                    &rope,
                    kv,
                    cross,
                    &mut x,
                    t,
                    self.offset,
                    from,
                    dims,
                )?;
            }
        }
        self.offset += t;
        Ok(x)
    }

    /// Sets the conditioning every cross-attention layer attends to (`n` rows of
    /// `d_model`), computing its keys and values once; it holds until set again (a reset
    /// keeps it).
    pub fn set_cross_source(&mut self, src: &[f32], n: usize) -> Result<()> {
        let d = self.dims.d_model;
        if n == 0 || src.len() != n * d {
            return Err(Error::InvalidInput(format!(
                "a cross-attention source of {} values for {n} rows of {d}",
                src.len()
            )));
        }
        let (heads, hd) = (self.dims.num_heads, self.dims.head_dim);
        for (layer, slot) in self.layers.iter().zip(self.cross.iter_mut()) {
            let Some(c) = &layer.cross else { continue };
            let kv = c.kv_proj.matmul_t(src, n)?;
            let mut k = vec![0f32; n * d];
            let mut v = vec![0f32; n * d];
            for (j, row) in kv.chunks_exact(2 * d).enumerate() {
                for h in 0..heads {
                    let dst = (h * n + j) * hd;
                    k[dst..dst + hd].copy_from_slice(&row[h * hd..(h + 1) * hd]);
                    v[dst..dst + hd].copy_from_slice(&row[d + h * hd..d + (h + 1) * hd]);
                }
            }
            let (mut k, mut v) = (KvStore::F32(k), KvStore::F32(v));
            if c.kv_proj.is_quantized() {
                k.make_bf16();
                v.make_bf16();
            }
            *slot = Some(CrossKv { k, v, n });
        }
        Ok(())
    }

    /// Whether the layers have cross-attention (and so need [`Self::set_cross_source`]).
    pub fn has_cross_attention(&self) -> bool {
        self.layers.iter().any(|l| l.cross.is_some())
    }

    pub fn set_precision(&mut self, precision: WeightPrecision) -> Result<()> {
        let mut quantized = false;
        for l in &mut self.layers {
            if let Some(c) = &mut l.cross {
                for m in [&mut c.q_proj, &mut c.kv_proj, &mut c.out_proj] {
                    m.set_precision(precision)?;
                    quantized |= m.is_quantized();
                }
            }
            for m in l.in_proj.iter_mut().chain(l.out_proj.iter_mut()) {
                m.set_precision(precision)?;
                quantized |= m.is_quantized();
            }
            for f in &mut l.ff {
                for m in f.matrices_mut() {
                    m.set_precision(precision)?;
                    quantized |= m.is_quantized();
                }
            }
        }
        if quantized {
            for r in &mut self.rings {
                r.k.make_bf16();
                r.v.make_bf16();
            }
        }
        Ok(())
    }

    pub fn reset(&mut self) {
        self.offset = 0;
        self.rings.iter_mut().for_each(RingKv::reset);
    }

    /// Bytes of all weight matrices (per-step ones included: a full pass reads them all).
    pub fn weight_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.in_proj
                    .iter()
                    .chain(&l.out_proj)
                    .chain(
                        l.cross
                            .iter()
                            .flat_map(|c| [&c.q_proj, &c.kv_proj, &c.out_proj]),
                    )
                    .map(Matrix::size_in_bytes)
                    .sum::<usize>()
                    + l.ff.iter().map(FeedForward::size_in_bytes).sum::<usize>()
            })
            .sum()
    }

    /// Bytes of the matrices one step of weight set `set` reads (per-step transformers).
    pub fn weight_set_bytes(&self, set: usize) -> usize {
        self.layers
            .iter()
            .map(|l| {
                let pick = |n: usize| set.min(n.saturating_sub(1));
                l.in_proj[pick(l.in_proj.len())].size_in_bytes()
                    + l.out_proj[pick(l.out_proj.len())].size_in_bytes()
                    + l.ff[pick(l.ff.len())].size_in_bytes()
            })
            .sum()
    }

    pub fn state_bytes(&self) -> usize {
        self.rings
            .iter()
            .map(|r| r.k.bytes() + r.v.bytes() + r.pos.len() * 8)
            .sum::<usize>()
            + self
                .cross
                .iter()
                .flatten()
                .map(|c| c.k.bytes() + c.v.bytes())
                .sum::<usize>()
    }
}

pub(crate) fn add_sin_embedding(
    x: &mut [f32],
    d: usize,
    offset: usize,
    max_period: f32,
    scale: f32,
) {
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
pub(crate) fn rope_table(pos: usize, head_dim: usize, max_period: f32) -> Vec<(f32, f32)> {
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

#[allow(clippy::too_many_arguments)]
fn layer_step(
    layer: &Layer,
    weights_index: usize,
    rope: &[Vec<(f32, f32)>],
    kv: &mut RingKv,
    cross: Option<&CrossKv>,
    x: &mut [f32],
    t: usize,
    offset: usize,
    visible_from: i64,
    dims: &Dims,
) -> Result<()> {
    let d = dims.d_model;
    let hd = dims.head_dim;
    let widx = weights_index.min(layer.in_proj.len() - 1);
    // Self-attention block.
    let h = span(|| "layer: norm".into(), || layer.norm1.forward(x, d));
    let mut qkv = span(
        || "layer: in-projection".into(),
        || layer.in_proj[widx].matmul_t(&h, t),
    )?;
    let rope_t0 = profile::start();
    if dims.rope {
        for (row, table) in qkv.chunks_exact_mut(3 * d).zip(rope) {
            let (q, rest) = row.split_at_mut(d);
            apply_rope(q, table);
            apply_rope(&mut rest[..d], table);
        }
    }
    for (i, row) in qkv.chunks_exact(3 * d).enumerate() {
        kv.push(&row[d..2 * d], &row[2 * d..], (offset + i) as i64);
    }
    let q = queries_by_head(&qkv, 3 * d, t, dims);
    profile::stop(rope_t0, "layer: rope, cache, queries");
    let attention_t0 = profile::start();
    // Only the filled slots: an empty one would score minus infinity anyway.
    let cap = kv.filled();
    let context = dims.context.map_or(i64::MAX, |c| c as i64);
    // Heads in parallel (each reads its own keys and values: a sixth of a quantized
    // model's step at full context), `[heads][t][head_dim]`, then into `[t][d]`.
    let kv = &*kv;
    let mut per_head = vec![0f32; t * d];
    team::chunks_mut(&mut per_head, t * hd, |h, out| {
        let mut scores = vec![0f32; cap * t];
        let mut probs = vec![0f32; cap];
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
            for (j, p) in probs.iter_mut().enumerate() {
                let pk = kv.pos[j];
                let delta = pos_q - pk;
                *p = if pk >= visible_from.max(0) && delta >= 0 && delta < context {
                    scores[j * t + i]
                } else {
                    f32::NEG_INFINITY
                };
            }
            softmax_masked(&mut probs);
            weighted_sum_rows(
                kv.head_values(h),
                hd,
                &probs,
                &mut out[i * hd..(i + 1) * hd],
            );
        }
    });
    let attn = heads_to_rows(&per_head, t, dims);
    profile::stop(attention_t0, "layer: attention");
    let update = span(
        || "layer: out-projection".into(),
        || layer.out_proj[widx].matmul_t(&attn, t),
    )?;
    residual_add(x, &update, layer.scale1.as_deref(), d);
    if let (Some(c), Some(src)) = (&layer.cross, cross) {
        cross_block(c, src, x, t, dims)?;
    }
    // Feed-forward block.
    let h = span(|| "layer: norm".into(), || layer.norm2.forward(x, d));
    let update = layer.ff[weights_index.min(layer.ff.len() - 1)].forward(&h, t)?;
    residual_add(x, &update, layer.scale2.as_deref(), d);
    Ok(())
}

/// The cross-attention block on `t` rows of `x`, in place. Heads run in parallel, each
/// with the SIMD kernels of self-attention over its keys and values.
fn cross_block(
    c: &CrossAttention,
    src: &CrossKv,
    x: &mut [f32],
    t: usize,
    dims: &Dims,
) -> Result<()> {
    let (d, hd, n) = (dims.d_model, dims.head_dim, src.n);
    let h = c.norm.forward(x, d);
    let qh = queries_by_head(&c.q_proj.matmul_t(&h, t)?, d, t, dims);
    let mut per_head = vec![0f32; t * d];
    team::chunks_mut(&mut per_head, t * hd, |head, out| {
        let keys = src.k.rows(head * n * hd, n * hd);
        let values = src.v.rows(head * n * hd, n * hd);
        // scores[j * t + i]: key j against query i.
        let mut scores = vec![0f32; n * t];
        dot_rows(
            keys,
            hd,
            &qh[head * t * hd..(head + 1) * t * hd],
            t,
            &mut scores,
        );
        let mut probs = vec![0f32; n];
        for i in 0..t {
            for (j, p) in probs.iter_mut().enumerate() {
                *p = scores[j * t + i];
            }
            softmax_masked(&mut probs);
            weighted_sum_rows(values, hd, &probs, &mut out[i * hd..(i + 1) * hd]);
        }
    });
    let update = c.out_proj.matmul_t(&heads_to_rows(&per_head, t, dims), t)?;
    residual_add(x, &update, c.scale.as_deref(), d);
    Ok(())
}

/// The queries of `t` rows (the first `d_model` values of each row of `stride`), head by
/// head, `[heads][t][head_dim]`, scaled by 1/sqrt(head_dim).
fn queries_by_head(rows: &[f32], stride: usize, t: usize, dims: &Dims) -> Vec<f32> {
    let (d, hd) = (dims.d_model, dims.head_dim);
    let inv_sqrt = 1.0 / (hd as f32).sqrt();
    let mut q = vec![0f32; t * d];
    for (i, row) in rows.chunks_exact(stride).take(t).enumerate() {
        for h in 0..dims.num_heads {
            let dst = &mut q[(h * t + i) * hd..(h * t + i + 1) * hd];
            dst.iter_mut()
                .zip(&row[h * hd..(h + 1) * hd])
                .for_each(|(o, v)| *o = v * inv_sqrt);
        }
    }
    q
}

/// `[heads][t][head_dim]` back to `t` rows of `d_model`.
fn heads_to_rows(per_head: &[f32], t: usize, dims: &Dims) -> Vec<f32> {
    let (d, hd) = (dims.d_model, dims.head_dim);
    let mut rows = vec![0f32; t * d];
    for h in 0..dims.num_heads {
        for i in 0..t {
            rows[i * d + h * hd..i * d + (h + 1) * hd]
                .copy_from_slice(&per_head[(h * t + i) * hd..(h * t + i + 1) * hd]);
        }
    }
    rows
}

/// Softmax in place; entries of -inf (masked) get 0.
fn softmax_masked(probs: &mut [f32]) {
    let max = probs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for p in probs.iter_mut() {
        *p = if p.is_finite() { (*p - max).exp() } else { 0.0 };
        sum += *p;
    }
    let inv = 1.0 / sum;
    probs.iter_mut().for_each(|p| *p *= inv);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cross: bool) -> TransformerSpec {
        TransformerSpec {
            d_model: 16,
            num_heads: 2,
            num_layers: 2,
            dim_feedforward: 32,
            norm: "rms_norm_f32".into(),
            gating: "silu".into(),
            layer_scale: false,
            positional_embedding: "rope".into(),
            positional_scale: 1.0,
            max_period: 10_000.0,
            context: Some(4),
            weights_per_step: 0,
            weights_schedule: None,
            cross_attention: cross,
        }
    }

    fn rows(seed: u32, n: usize, d: usize) -> Vec<f32> {
        (0..n * d)
            .map(|i| {
                (((i as u32 + 1).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    /// Calls of three steps through a ring of four (the window wraps every call), each
    /// also split as 1 + 2 and 2 + 1 with `step_part`: the same outputs, where plain
    /// shorter calls see more of the past (the reference's streaming semantics differ by
    /// call size once the ring has wrapped).
    #[test]
    fn a_call_split_in_parts_computes_what_it_computes_whole() {
        let d = 16;
        let w = Weights::random(3);
        let mut whole = StreamingTransformer::load(&w, &spec(false)).expect("load");
        let mut split = whole.clone();
        let mut plain = whole.clone();
        let max_diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max)
        };
        let mut plain_differs = false;
        for call in 0..5 {
            let x = rows(10 + call, 3, d);
            let a = whole.step(&x, 3).expect("whole");
            let first = 1 + call as usize % 2;
            let mut b = split
                .step_part(&x[..first * d], first, 3 - first)
                .expect("first part");
            b.extend(split.step(&x[first * d..], 3 - first).expect("rest"));
            assert!(max_diff(&a, &b) < 1e-6, "call {call}: {}", max_diff(&a, &b));
            let mut c = plain.step(&x[..first * d], first).expect("plain");
            c.extend(plain.step(&x[first * d..], 3 - first).expect("plain"));
            plain_differs |= max_diff(&a, &c) > 1e-4;
        }
        assert!(
            plain_differs,
            "the ring never hid anything: the test proves nothing"
        );
    }

    /// Cross-attention attends over the whole conditioning with no position and no mask:
    /// the order of its rows does not matter, its content does, and a transformer with
    /// it refuses to run without one.
    #[test]
    fn cross_attention_sees_the_conditioning_as_a_set() {
        let d = 16;
        let w = Weights::random(7);
        let mut t = StreamingTransformer::load(&w, &spec(true)).expect("load");
        assert!(t.has_cross_attention());
        let x = rows(1, 3, d);
        let err = t.step(&x, 3).expect_err("no conditioning");
        assert!(err.to_string().contains("set_cross_source"), "{err}");
        let src = rows(2, 5, d);
        let mut reversed: Vec<f32> = src.chunks(d).rev().flatten().copied().collect();
        t.set_cross_source(&src, 5).expect("source");
        t.reset();
        let a = t.step(&x, 3).expect("step");
        t.set_cross_source(&reversed, 5).expect("source");
        t.reset();
        let b = t.step(&x, 3).expect("step");
        let diff = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "row order changed the output by {diff}");
        reversed[0] += 1.0;
        t.set_cross_source(&reversed, 5).expect("source");
        t.reset();
        let c = t.step(&x, 3).expect("step");
        let diff = a
            .iter()
            .zip(&c)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(diff > 1e-3, "the conditioning did not matter ({diff})");
        assert!(t.set_cross_source(&src[..7], 1).is_err());
        // Without cross-attention the same weights give another result: the block runs.
        let mut plain =
            StreamingTransformer::load(&Weights::random(7), &spec(false)).expect("load");
        let p = plain.step(&x, 3).expect("step");
        let diff = a
            .iter()
            .zip(&p)
            .map(|(u, v)| (u - v).abs())
            .fold(0f32, f32::max);
        assert!(diff > 1e-3, "cross-attention changed nothing ({diff})");
    }

    /// A conditioning of one row: each head's attention is that row's value, so the block
    /// adds `out_proj(v)` whatever the query.
    #[test]
    fn cross_attention_over_one_row_adds_its_value() {
        let d = 16;
        let layer_spec = TransformerSpec {
            num_layers: 1,
            ..spec(true)
        };
        let mut t = StreamingTransformer::load(&Weights::random(3), &layer_spec).expect("load");
        let src = rows(5, 1, d);
        t.set_cross_source(&src, 1).expect("source");
        let c = t.layers[0].cross.clone().expect("cross");
        let kv = c.kv_proj.matmul_t(&src, 1).expect("kv");
        let want = c.out_proj.matmul_t(&kv[d..], 1).expect("out");
        let dims = t.dims.clone();
        let src_kv = t.cross[0].clone().expect("kv");
        for seed in [11, 12] {
            let mut x = rows(seed, 1, d);
            let before = x.clone();
            cross_block(&c, &src_kv, &mut x, 1, &dims).expect("block");
            for i in 0..d {
                assert!((x[i] - before[i] - want[i]).abs() < 1e-5, "{i}");
            }
        }
    }

    /// A schedule gives several steps one weight set: steps that share a set compute
    /// what the set computes, and the sets are `max + 1`.
    #[test]
    fn a_weights_schedule_shares_sets_between_steps() {
        let d = 16;
        let sched = TransformerSpec {
            context: None,
            positional_embedding: "none".into(),
            weights_per_step: 4,
            weights_schedule: Some(vec![0, 1, 1, 1]),
            ..spec(false)
        };
        assert_eq!(sched.weight_sets(), 2);
        let t = StreamingTransformer::load(&Weights::random(9), &sched).expect("load");
        assert!(t
            .layers
            .iter()
            .all(|l| l.in_proj.len() == 2 && l.ff.len() == 2));
        assert_eq!(t.dims.weight_set(0), 0);
        assert_eq!(t.dims.weight_set(3), 1);
        // The same transformer with the sets written out per step and no schedule
        // computes the same at every step.
        let mut expanded = t.clone();
        for l in &mut expanded.layers {
            l.in_proj = [0, 1, 1, 1].iter().map(|&k| l.in_proj[k].clone()).collect();
            l.out_proj = [0, 1, 1, 1]
                .iter()
                .map(|&k| l.out_proj[k].clone())
                .collect();
            l.ff = [0, 1, 1, 1].iter().map(|&k| l.ff[k].clone()).collect();
        }
        expanded.dims.schedule = None;
        let mut t = t;
        for k in 0..4 {
            let x = rows(4 + k as u32, 1, d);
            let a = t.step(&x, 1).expect("step");
            let b = expanded.step(&x, 1).expect("step");
            assert_eq!(a, b, "step {k}");
        }
        // Sets differ: set 0 and set 1 give different outputs for the same history.
        let mut only0 = expanded.clone();
        only0.reset();
        for l in &mut only0.layers {
            l.in_proj[1] = l.in_proj[0].clone();
        }
        t.reset();
        let x = rows(4, 1, d);
        t.step(&x, 1).expect("step");
        only0.step(&x, 1).expect("step");
        let a = t.step(&x, 1).expect("step");
        let b = only0.step(&x, 1).expect("step");
        let diff = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(diff > 1e-4, "set 1 is set 0 ({diff})");
        let bad = TransformerSpec {
            weights_schedule: Some(vec![0, 1]),
            ..sched
        };
        assert!(StreamingTransformer::load(&Weights::random(9), &bad).is_err());
    }
}
