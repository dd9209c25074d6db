//! The delayed-streams LM on the GPU: the whole generation step (embeddings, temporal
//! transformer, text head and sampling, extra heads, and every depformer step with its
//! sampling) recorded as one compute pass, one command encoder and one submit, reading
//! back only the sampled tokens and the extra heads' few probabilities.
//!
//! Built from a loaded [`LmModel`] (so every checkpoint layout the CPU path reads works
//! here too), whose weights are uploaded once in a [`GpuFormat`]. Embedding rows of the
//! temporal step are gathered by buffer copies (their token ids are known on the CPU);
//! the depformer's come from tokens sampled on the GPU within the same submit and are
//! added by a kernel. RoPE tables are computed on the CPU exactly as the CPU path does
//! and passed in the per-step block.

use std::collections::HashMap;
use std::sync::Arc;

use super::generator::Sampling;
use super::{Embedding, LmConfig, LmModel, ZERO_TOKEN};
use crate::compute::cpu::Matrix;
use crate::compute::gpu::{
    Epilogue, Gpu, GpuFormat, GpuWeight, MatvecInput, Plan, Program, Res, StepBlock, MAX_DRAWS,
    MAX_ROPE_PAIRS, STEP_BLOCK_BYTES,
};
use crate::models::transformer::{
    add_sin_embedding, rope_table, FeedForward, Norm, StreamingTransformer,
};
use crate::{Error, Result};

/// How the model is put on the GPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuLmOptions {
    /// The format of the weight matrices (embedding tables: f32 with `F32`, else bf16).
    pub format: GpuFormat,
    /// Splits tensors into chunks of at most this many bytes (default: the largest
    /// binding the device allows). Tests set it low to exercise the split.
    pub max_binding_bytes: Option<u64>,
    /// Also reads the text logits back every step (for parity tests).
    pub read_logits: bool,
    /// Depformer steps (codebooks drawn) per step; None: all of them. The TTS runs
    /// fewer on request.
    pub depformer_steps: Option<usize>,
    /// Rows of the cross-attention conditioning (the TTS's voices), fixed for as long as
    /// the model is on the GPU; 0 for a model without cross-attention.
    pub cross_rows: usize,
    /// The TTS's way of stepping: the depformer's text embedding is one of two the CPU's
    /// text state machine prepares (picked on the GPU by the text prediction), and a
    /// temporal-only and a depformer-only program exist beside the whole step for the
    /// steps that must wait for words.
    pub tts: bool,
}

/// Token slots on the GPU: the text prediction, one per codebook, and (last) the TTS's
/// candidate pick.
const TOKEN_SLOTS: usize = 64;
const PICK_SLOT: u32 = TOKEN_SLOTS as u32 - 1;

/// What one GPU step gives.
#[derive(Debug, Clone)]
pub struct GpuStep {
    pub text_token: u32,
    pub audio: Vec<u32>,
    pub extra_heads: Vec<Vec<f32>>,
    pub text_logits: Option<Vec<f32>>,
}

/// How the temporal step's text embedding reaches `x`.
#[derive(Debug)]
enum TextRow {
    /// A row of a full-width table, summed with the audio rows.
    Gathered,
    /// Rows of a narrow table (`low` gets the first stream's row, `second` the second
    /// stream's or zeros), projected by matrix products into `x`.
    Projected {
        table: GpuWeight,
        demux: bool,
        low: wgpu::Buffer,
        second: wgpu::Buffer,
    },
}

/// Which of a model's programs a submit runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Which {
    Whole,
    Temporal,
    Depformer,
}

#[derive(Debug)]
pub struct GpuLm {
    gpu: Arc<Gpu>,
    cfg: LmConfig,
    format: GpuFormat,
    program: Program,
    /// The TTS's split programs: the temporal step with the text prediction, and the
    /// depformer alone.
    temporal_only: Option<Program>,
    depformer_only: Option<Program>,
    /// The audio embedding tables in the order rows are summed, then the text table when
    /// it is gathered (the CPU path's order).
    tables: Vec<GpuWeight>,
    text_row: TextRow,
    zero_row: wgpu::Buffer,
    gathered: wgpu::Buffer,
    row_bytes: u64,
    tokens: wgpu::Buffer,
    probs: wgpu::Buffer,
    logits: wgpu::Buffer,
    read: wgpu::Buffer,
    read_logits: bool,
    /// What every step's input gets added (the TTS's summed conditions), when planned.
    bias: Option<wgpu::Buffer>,
    /// The TTS's two candidate text embeddings of the depformer, `[2][depformer dim]`.
    candidates: Option<wgpu::Buffer>,
    /// The cross-attention conditioning and the program that makes its keys and values.
    cross: Option<(wgpu::Buffer, Program, usize)>,
    cross_ready: bool,
    /// Depformer steps each step runs.
    dep_steps: usize,
    /// Position of the next temporal step.
    offset: usize,
    head_dim: usize,
    rope: bool,
    max_period: f32,
    weight_bytes: usize,
    state_bytes: usize,
}

/// Activation buffers of one transformer.
pub(crate) struct Scratch {
    h: wgpu::Buffer,
    qkv: wgpu::Buffer,
    attn: wgpu::Buffer,
    ff: wgpu::Buffer,
    gate: wgpu::Buffer,
    scores: wgpu::Buffer,
}

/// The state of one transformer on the GPU: its self-attention rings and, with
/// cross-attention, each layer's conditioning keys and values (`[rows][2 d]`).
pub(crate) struct Rings {
    kv: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    cross: Vec<Option<wgpu::Buffer>>,
    cross_rows: usize,
}

/// Plans programs: weights uploaded once by label, the bytes a step reads counted. Mimi's
/// GPU codec plans its transformers with it too.
pub(crate) struct Builder<'a> {
    gpu: &'a Gpu,
    pub(crate) plan: Plan,
    format: GpuFormat,
    limit: u64,
    /// Weights uploaded so far, by label: programs that share a weight share its buffer.
    uploaded: HashMap<String, GpuWeight>,
    /// Weight bytes the matrix products planned so far read.
    bytes: usize,
    state_bytes: usize,
}

impl<'a> Builder<'a> {
    pub(crate) fn new(gpu: &'a Gpu, plan: Plan, format: GpuFormat) -> Self {
        Self {
            gpu,
            plan,
            format,
            limit: gpu.max_binding_bytes(),
            uploaded: HashMap::new(),
            bytes: 0,
            state_bytes: 0,
        }
    }

    /// Whether attention caches hold f16: under every reduced format (the f32 format is
    /// the parity reference and keeps f32 caches).
    fn kv_f16(&self) -> bool {
        self.format != GpuFormat::F32
    }

    /// Uploads `m` once (by `label`) and counts its bytes as read by one more product.
    pub(crate) fn upload(&mut self, label: &str, m: &Matrix) -> Result<GpuWeight> {
        self.upload_as(label, m, self.format)
    }

    pub(crate) fn upload_as(
        &mut self,
        label: &str,
        m: &Matrix,
        format: GpuFormat,
    ) -> Result<GpuWeight> {
        let g = match self.uploaded.get(label) {
            Some(g) => g.clone(),
            None => {
                let w: Vec<f32> = m.to_f32()?.flatten_all()?.to_vec1()?;
                let g =
                    GpuWeight::upload(self.gpu, label, &w, m.rows(), m.cols(), format, self.limit)?;
                self.uploaded.insert(label.to_string(), g.clone());
                g
            }
        };
        self.bytes += g.size_in_bytes();
        Ok(g)
    }

    /// An embedding table: f32 with `F32` weights or when its rows are projected (the
    /// products read f32), else bf16.
    fn table(&mut self, label: &str, e: &Embedding) -> Result<GpuWeight> {
        let format = if self.format == GpuFormat::F32 || e.low_rank.is_some() || e.demux.is_some() {
            GpuFormat::F32
        } else {
            GpuFormat::Bf16
        };
        let before = self.bytes;
        let g = self.upload_as(label, &e.table, format)?;
        // A table is read a row at a time, not whole.
        self.bytes = before;
        Ok(g)
    }

    pub(crate) fn matvec(
        &mut self,
        w: &GpuWeight,
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
        epi: &Epilogue,
    ) -> Result<()> {
        self.plan.matvec(self.gpu, w, x, out, 1, epi)
    }

    /// Plans `out (+)= epilogue(norm(x) @ w^T)`: the norm fused into the product where
    /// the wide kernels read `w` and the norm is RMS, else a norm into `h` first.
    #[allow(clippy::too_many_arguments)]
    fn normed_matvec(
        &mut self,
        n: &Norm,
        x: &wgpu::Buffer,
        h: &wgpu::Buffer,
        w: &GpuWeight,
        out: &wgpu::Buffer,
        epi: Epilogue,
    ) -> Result<()> {
        match n {
            Norm::Rms { alpha, eps } if w.is_wide() => self.matvec(
                w,
                x,
                out,
                &Epilogue {
                    input: MatvecInput::RmsNormed {
                        alpha: alpha.clone(),
                        eps: *eps,
                    },
                    ..epi
                },
            ),
            _ => {
                self.norm(n, w.cols, x, h);
                self.matvec(w, h, out, &epi)
            }
        }
    }

    pub(crate) fn norm(&mut self, n: &Norm, dim: usize, x: &wgpu::Buffer, out: &wgpu::Buffer) {
        let (entry, g, eps) = match n {
            Norm::Rms { alpha, eps } => ("rms_norm", alpha.clone(), *eps),
            Norm::Layer { weight, bias, eps } => {
                ("layer_norm", [weight.as_slice(), bias].concat(), *eps)
            }
        };
        let params = self.plan.params(&[dim as u32, eps.to_bits(), 0, 0]);
        let g = self.gpu.upload_f32("norm", &g);
        self.plan.dispatch(
            entry,
            vec![
                (0, Res::Buffer(x.clone())),
                (1, Res::Buffer(out.clone())),
                (2, params),
                (3, Res::Buffer(g)),
            ],
            [1, 1, 1],
        );
    }

    /// Plans `out[k] += table[tokens[slot]][k]` (or `=` with `overwrite`) for a token
    /// sampled on the GPU.
    #[allow(clippy::too_many_arguments)]
    fn embed_add(
        &mut self,
        chunks: &[(wgpu::Buffer, usize, usize)],
        bf16: bool,
        n: usize,
        slot: u32,
        out: &wgpu::Buffer,
        tokens: &wgpu::Buffer,
        overwrite: bool,
    ) {
        for (buf, row0, rows) in chunks {
            let params = self.plan.params(&[
                n as u32,
                *row0 as u32,
                u32::from(bf16),
                slot,
                *rows as u32,
                0,
                u32::from(overwrite),
                0,
            ]);
            self.plan.dispatch(
                "embed_add",
                vec![
                    (0, Res::Buffer(buf.clone())),
                    (1, Res::Buffer(out.clone())),
                    (2, params),
                    (3, Res::Buffer(tokens.clone())),
                ],
                [(n as u32).div_ceil(64), 1, 1],
            );
        }
    }

    /// Plans the transformer's layers on `x` in place, with the weights of step
    /// `step`, at the position given by `pos` (a `Step` block).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layers(
        &mut self,
        label: &str,
        t: &StreamingTransformer,
        rings: &Rings,
        s: &Scratch,
        x: &wgpu::Buffer,
        step: usize,
        pos: &Res,
    ) -> Result<()> {
        let (dims, _, layers) = t.parts();
        let cap = ring_capacity(t);
        // A schedule may give several steps one weight set.
        let widx = dims.weight_set(step);
        for (i, (layer, (kr, vr))) in layers.iter().zip(&rings.kv).enumerate() {
            let w = widx.min(layer.in_proj.len() - 1);
            let in_proj = self.upload(&format!("{label}.{i}.in_proj.{w}"), &layer.in_proj[w])?;
            self.normed_matvec(&layer.norm1, x, &s.h, &in_proj, &s.qkv, Epilogue::default())?;
            let blocks = cap.div_ceil(ATTENTION_SPLIT);
            let params = self.plan.params(&[
                dims.num_heads as u32,
                dims.head_dim as u32,
                cap as u32,
                u32::from(dims.rope),
                u32::from(self.kv_f16()),
                blocks as u32,
                0,
                0,
            ]);
            let pairs = (dims.num_heads * dims.head_dim / 2) as u32;
            self.plan.dispatch(
                "rope_store",
                vec![
                    (0, Res::Buffer(s.qkv.clone())),
                    (1, Res::Buffer(kr.clone())),
                    (2, Res::Buffer(vr.clone())),
                    (3, params.clone()),
                    (4, pos.clone()),
                ],
                [pairs.div_ceil(64), 1, 1],
            );
            self.plan.dispatch(
                "attend_part",
                vec![
                    (0, Res::Buffer(s.qkv.clone())),
                    (1, Res::Buffer(kr.clone())),
                    (2, Res::Buffer(vr.clone())),
                    (3, params.clone()),
                    (4, pos.clone()),
                    (5, Res::Buffer(s.scores.clone())),
                ],
                [dims.num_heads as u32, blocks as u32, 1],
            );
            self.plan.dispatch(
                "attend_combine",
                vec![
                    (3, params),
                    (5, Res::Buffer(s.scores.clone())),
                    (6, Res::Buffer(s.attn.clone())),
                ],
                [dims.num_heads as u32, 1, 1],
            );
            let wo = widx.min(layer.out_proj.len() - 1);
            let out_proj =
                self.upload(&format!("{label}.{i}.out_proj.{wo}"), &layer.out_proj[wo])?;
            self.matvec(
                &out_proj,
                &s.attn,
                x,
                &Epilogue {
                    accumulate: true,
                    scale: layer.scale1.clone(),
                    ..Default::default()
                },
            )?;
            if let (Some(c), Some(kv)) = (&layer.cross, &rings.cross[i]) {
                let q = self.upload(&format!("{label}.{i}.cross.q"), &c.q_proj)?;
                self.normed_matvec(&c.norm, x, &s.h, &q, &s.qkv, Epilogue::default())?;
                let params = self.plan.params(&[
                    dims.num_heads as u32,
                    dims.head_dim as u32,
                    rings.cross_rows as u32,
                    0,
                    0,
                    0,
                    0,
                    0,
                ]);
                self.plan.dispatch(
                    "cross_attend",
                    vec![
                        (0, Res::Buffer(s.qkv.clone())),
                        (1, Res::Buffer(kv.clone())),
                        (3, params),
                        (5, Res::Buffer(s.scores.clone())),
                        (6, Res::Buffer(s.attn.clone())),
                    ],
                    [dims.num_heads as u32, 1, 1],
                );
                let out = self.upload(&format!("{label}.{i}.cross.out"), &c.out_proj)?;
                self.matvec(
                    &out,
                    &s.attn,
                    x,
                    &Epilogue {
                        accumulate: true,
                        scale: c.scale.clone(),
                        ..Default::default()
                    },
                )?;
            }
            let wf = widx.min(layer.ff.len() - 1);
            let (linear_in, linear_out) = match &layer.ff[wf] {
                FeedForward::Gated {
                    linear_in,
                    linear_out,
                    silu: true,
                } => (linear_in, linear_out),
                FeedForward::Mlp { linear1, linear2 } => {
                    // linear2(gelu(linear1(norm(x)))) + x (Mimi's transformers).
                    let l1 = self.upload(&format!("{label}.{i}.linear1.{wf}"), linear1)?;
                    self.normed_matvec(&layer.norm2, x, &s.h, &l1, &s.ff, Epilogue::default())?;
                    let n = linear1.rows() as u32;
                    let params = self.plan.params(&[n, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
                    self.plan.dispatch(
                        "activate",
                        vec![(1, Res::Buffer(s.ff.clone())), (2, params)],
                        [n.div_ceil(64), 1, 1],
                    );
                    let l2 = self.upload(&format!("{label}.{i}.linear2.{wf}"), linear2)?;
                    self.matvec(
                        &l2,
                        &s.ff,
                        x,
                        &Epilogue {
                            accumulate: true,
                            scale: layer.scale2.clone(),
                            ..Default::default()
                        },
                    )?;
                    continue;
                }
                FeedForward::Gated { silu: false, .. } => {
                    return Err(Error::InvalidInput(format!(
                        "{label}: the GPU path runs SiLU-gated or GELU feed-forwards only"
                    )));
                }
            };
            let hidden = linear_out.cols();
            let lin = self.upload(&format!("{label}.{i}.linear_in.{wf}"), linear_in)?;
            self.normed_matvec(&layer.norm2, x, &s.h, &lin, &s.ff, Epilogue::default())?;
            let lout = self.upload(&format!("{label}.{i}.linear_out.{wf}"), linear_out)?;
            let epi = Epilogue {
                accumulate: true,
                scale: layer.scale2.clone(),
                ..Default::default()
            };
            if lout.is_wide() {
                // The gate read by the down-projection itself.
                self.matvec(
                    &lout,
                    &s.ff,
                    x,
                    &Epilogue {
                        input: MatvecInput::Gated,
                        ..epi
                    },
                )?;
            } else {
                let params = self.plan.params(&[hidden as u32, 0, 0, 0, 0, 0, 0, 0]);
                self.plan.dispatch(
                    "gate_silu",
                    vec![
                        (0, Res::Buffer(s.ff.clone())),
                        (1, Res::Buffer(s.gate.clone())),
                        (2, params),
                    ],
                    [(hidden as u32).div_ceil(64), 1, 1],
                );
                self.matvec(&lout, &s.gate, x, &epi)?;
            }
        }
        Ok(())
    }

    pub(crate) fn scratch(
        &self,
        label: &str,
        t: &StreamingTransformer,
        cross_rows: usize,
    ) -> Result<Scratch> {
        let (dims, _, layers) = t.parts();
        let d = dims.d_model;
        let hidden = layers
            .iter()
            .flat_map(|l| &l.ff)
            .map(|f| match f {
                FeedForward::Gated { linear_out, .. } => linear_out.cols(),
                FeedForward::Mlp { linear1, .. } => linear1.rows(),
            })
            .max()
            .unwrap_or(1);
        Ok(Scratch {
            h: self.gpu.activations(&format!("{label}.h"), d),
            qkv: self.gpu.activations(&format!("{label}.qkv"), 3 * d),
            attn: self.gpu.activations(&format!("{label}.attn"), d),
            ff: self.gpu.activations(&format!("{label}.ff"), 2 * hidden),
            gate: self.gpu.activations(&format!("{label}.gate"), hidden),
            // The cross-attention's scores, or the self-attention's blocks.
            scores: self.gpu.activations(
                &format!("{label}.scores"),
                (dims.num_heads * cross_rows).max(
                    dims.num_heads
                        * ring_capacity(t).div_ceil(ATTENTION_SPLIT)
                        * (dims.head_dim + 2),
                ),
            ),
        })
    }

    pub(crate) fn rings(
        &mut self,
        label: &str,
        t: &StreamingTransformer,
        cross_rows: usize,
    ) -> Result<Rings> {
        let (dims, _, layers) = t.parts();
        // Words of a ring: f32 values, or f16 pairs.
        let n = if self.kv_f16() {
            (dims.d_model * ring_capacity(t)).div_ceil(2)
        } else {
            dims.d_model * ring_capacity(t)
        };
        let cross_n = 2 * dims.d_model * cross_rows;
        for (what, values) in [
            ("a KV ring", n),
            ("a conditioning's keys and values", cross_n),
        ] {
            if (values * 4) as u64 > self.gpu.max_binding_bytes() {
                return Err(Error::InvalidInput(format!(
                    "{label}: {what} of {} bytes exceeds this GPU's largest binding ({} bytes)",
                    values * 4,
                    self.gpu.max_binding_bytes()
                )));
            }
        }
        self.state_bytes += layers.len() * 2 * n * 4;
        let cross = layers
            .iter()
            .map(|l| {
                (l.cross.is_some() && cross_rows > 0).then(|| {
                    self.state_bytes += cross_n * 4;
                    self.gpu.activations(&format!("{label}.cross_kv"), cross_n)
                })
            })
            .collect();
        Ok(Rings {
            kv: layers
                .iter()
                .map(|_| {
                    (
                        self.gpu.activations(&format!("{label}.k"), n),
                        self.gpu.activations(&format!("{label}.v"), n),
                    )
                })
                .collect(),
            cross,
            cross_rows,
        })
    }
}

/// Ring slots one workgroup of the split self-attention takes (`SPLIT` in
/// `shaders/attention.wgsl`).
const ATTENTION_SPLIT: usize = 64;

/// Steps a ring holds: the attention context, or the steps of per-step weights (the
/// CPU path's streaming window).
fn ring_capacity(t: &StreamingTransformer) -> usize {
    let (dims, _, _) = t.parts();
    dims.context.unwrap_or(dims.weights_per_step).max(1)
}

pub(crate) fn check_transformer(
    label: &str,
    t: &StreamingTransformer,
    temporal: bool,
) -> Result<()> {
    let (dims, sin, _) = t.parts();
    if dims.head_dim > 2 * MAX_ROPE_PAIRS {
        return Err(Error::InvalidInput(format!(
            "{label}: heads of {} values (the GPU path takes up to {})",
            dims.head_dim,
            2 * MAX_ROPE_PAIRS
        )));
    }
    if temporal && sin.is_some() {
        return Err(Error::InvalidInput(format!(
            "{label}: sinusoidal position embeddings are not on the GPU path"
        )));
    }
    Ok(())
}

/// The depformer's buffers and embedding tables, which its programs share.
struct DepShared {
    x: wgpu::Buffer,
    logits: wgpu::Buffer,
    /// A low-rank embedding row before its projection.
    low: wgpu::Buffer,
    /// The text table (None with the TTS's candidates), then one per codebook.
    text: Option<GpuWeight>,
    emb: Vec<GpuWeight>,
    candidates: Option<wgpu::Buffer>,
    scratch: Scratch,
    rings: Rings,
}

impl DepShared {
    fn new(
        b: &mut Builder,
        dep: &super::Depformer,
        opts: &GpuLmOptions,
        steps: usize,
    ) -> Result<Self> {
        check_transformer("depformer", &dep.transformer, false)?;
        let (ddims, _, _) = dep.transformer.parts();
        let dd = ddims.d_model;
        let plain = |e: &Embedding| e.low_rank.is_none() && e.demux.is_none();
        let text = if opts.tts {
            None
        } else if plain(&dep.text_emb) {
            Some(b.table("depformer_text_emb", &dep.text_emb)?)
        } else {
            return Err(Error::InvalidInput(
                "the depformer's text embedding is projected: on the GPU only the TTS's way \
                 runs it"
                    .into(),
            ));
        };
        let mut emb = vec![];
        let mut low_width = 1;
        for (k, e) in dep.emb.iter().enumerate().take(steps.saturating_sub(1)) {
            if e.demux.is_some() {
                return Err(Error::InvalidInput(format!(
                    "depformer_emb.{k}: a demuxed audio embedding"
                )));
            }
            let t = b.table(&format!("depformer_emb.{k}"), e)?;
            if e.low_rank.is_some() {
                if t.chunk_count() != 1 {
                    return Err(Error::InvalidInput(format!(
                        "depformer_emb.{k}: a low-rank table larger than one binding"
                    )));
                }
                low_width = low_width.max(t.cols);
            }
            emb.push(t);
        }
        Ok(Self {
            x: b.gpu.activations("depformer x", dd),
            logits: b
                .gpu
                .activations("depformer logits", dep.heads[0].weight.rows()),
            low: b.gpu.activations("depformer low-rank row", low_width),
            text,
            emb,
            candidates: opts
                .tts
                .then(|| b.gpu.activations("depformer text candidates", 2 * dd)),
            scratch: b.scratch("depformer", &dep.transformer, 0)?,
            rings: b.rings("depformer", &dep.transformer, 0)?,
        })
    }
}

/// Plans the sampling of `n` logits into token slot `slot`, with draw `slot`.
fn sample(b: &mut Builder, s: &Shared, logits: &wgpu::Buffer, n: usize, class: u32, slot: u32) {
    let params = b.plan.params(&[n as u32, class, slot, slot]);
    b.plan.dispatch(
        "sample",
        vec![
            (0, Res::Buffer(logits.clone())),
            (1, Res::Buffer(s.tokens.clone())),
            (2, params),
            (3, s.step.clone()),
        ],
        [1, 1, 1],
    );
}

/// Buffers the programs of one model share.
struct Shared {
    x: wgpu::Buffer,
    gathered: wgpu::Buffer,
    hidden: wgpu::Buffer,
    logits: wgpu::Buffer,
    tokens: wgpu::Buffer,
    probs: wgpu::Buffer,
    extra_logits: wgpu::Buffer,
    scratch: Scratch,
    rings: Rings,
    step: Res,
}

impl GpuLm {
    /// Uploads `model` and plans its step.
    pub fn new(gpu: &Arc<Gpu>, model: &LmModel, opts: GpuLmOptions) -> Result<Self> {
        let cfg = model.config().clone();
        let limit = opts
            .max_binding_bytes
            .unwrap_or_else(|| gpu.max_binding_bytes())
            .min(gpu.max_binding_bytes());
        check_transformer("transformer", &model.transformer, true)?;
        let dep_steps = model.depformer.as_ref().map_or(0, |d| {
            opts.depformer_steps
                .unwrap_or(usize::MAX)
                .min(d.heads.len())
        });
        if dep_steps + 2 > TOKEN_SLOTS || dep_steps + 1 > MAX_DRAWS {
            return Err(Error::InvalidInput(format!(
                "{dep_steps} depformer codebooks (the GPU path draws up to {})",
                TOKEN_SLOTS - 2
            )));
        }
        if model.transformer.has_cross_attention() && opts.cross_rows == 0 {
            return Err(Error::InvalidInput(
                "a model with cross-attention needs the conditioning's rows (cross_rows)".into(),
            ));
        }
        let mut b = Builder {
            gpu,
            plan: Plan::new(gpu, STEP_BLOCK_BYTES),
            format: opts.format,
            limit,
            uploaded: HashMap::new(),
            bytes: 0,
            state_bytes: 0,
        };
        let d = cfg.dim;

        // Embedding tables: audio rows gathered and summed; the text row too when its
        // table is full width, else projected.
        let mut tables = Vec::new();
        for (k, e) in model.emb.iter().enumerate() {
            if e.low_rank.is_some() || e.demux.is_some() {
                return Err(Error::InvalidInput(format!(
                    "emb.{k}: low-rank audio embeddings are not on the GPU path"
                )));
            }
            tables.push(b.table(&format!("emb.{k}"), e)?);
        }
        let text_table = b.table("text_emb", &model.text_emb)?;
        let text_width = text_table.cols;
        let text_row = if model.text_emb.low_rank.is_none() && model.text_emb.demux.is_none() {
            tables.push(text_table);
            TextRow::Gathered
        } else {
            TextRow::Projected {
                table: text_table,
                demux: model.text_emb.demux.is_some(),
                low: gpu.activations("text row", text_width),
                second: gpu.activations("second text row", text_width),
            }
        };
        let table_format = tables.first().map_or(GpuFormat::F32, |t| t.format);
        let row_bytes = match table_format {
            GpuFormat::F32 => d * 4,
            _ => d * 2,
        } as u64;
        let shared = Shared {
            x: gpu.activations("x", d),
            gathered: gpu.activations(
                "gathered",
                (row_bytes as usize * tables.len().max(1)).div_ceil(4),
            ),
            hidden: gpu.activations("hidden", d),
            logits: gpu.activations("text logits", model.text_linear.weight.rows()),
            tokens: gpu.activations("tokens", TOKEN_SLOTS),
            probs: gpu.activations(
                "extra heads",
                (cfg.extra_heads_dim * model.extra_heads.len()).max(1),
            ),
            extra_logits: gpu.activations("extra logits", cfg.extra_heads_dim.max(1)),
            scratch: b.scratch("transformer", &model.transformer, opts.cross_rows)?,
            rings: b.rings("transformer", &model.transformer, opts.cross_rows)?,
            step: b.plan.step_block(STEP_BLOCK_BYTES),
        };
        let bias = (opts.tts || model.input_bias.is_some()).then(|| {
            gpu.upload_f32(
                "input bias",
                model.input_bias.as_deref().unwrap_or(&vec![0f32; d]),
            )
        });
        let dep = match &model.depformer {
            Some(dep) => Some(DepShared::new(&mut b, dep, &opts, dep_steps)?),
            None => None,
        };

        // The whole step; with the TTS's way, the two halves on their own as well.
        let temporal = |b: &mut Builder| {
            Self::plan_temporal(
                b,
                model,
                &opts,
                &shared,
                tables.len(),
                table_format != GpuFormat::F32,
                &text_row,
                &bias,
            )
        };
        temporal(&mut b)?;
        if let Some(dep) = &dep {
            Self::plan_depformer(&mut b, model, &shared, dep, dep_steps)?;
        }
        let (bytes, state_bytes) = (b.bytes, b.state_bytes);
        let fresh = || Plan::new(gpu, STEP_BLOCK_BYTES);
        let program = std::mem::replace(&mut b.plan, fresh()).build(gpu)?;
        let (temporal_only, depformer_only) = if opts.tts {
            temporal(&mut b)?;
            let t = std::mem::replace(&mut b.plan, fresh()).build(gpu)?;
            let dp = match &dep {
                Some(dep) => {
                    Self::plan_depformer(&mut b, model, &shared, dep, dep_steps)?;
                    Some(std::mem::replace(&mut b.plan, fresh()).build(gpu)?)
                }
                None => None,
            };
            (Some(t), dp)
        } else {
            (None, None)
        };

        // The conditioning's keys and values: one product per layer over all its rows.
        let cross = if model.transformer.has_cross_attention() {
            let src = gpu.activations("conditioning", opts.cross_rows * d);
            let (_, _, layers) = model.transformer.parts();
            for (i, layer) in layers.iter().enumerate() {
                let (Some(c), Some(kv)) = (&layer.cross, &shared.rings.cross[i]) else {
                    continue;
                };
                let w = b.upload(&format!("transformer.{i}.cross.kv"), &c.kv_proj)?;
                b.plan
                    .matvec(gpu, &w, &src, kv, opts.cross_rows, &Epilogue::default())?;
            }
            Some((
                src,
                std::mem::replace(&mut b.plan, fresh()).build(gpu)?,
                opts.cross_rows,
            ))
        } else {
            None
        };

        let vocab = model.text_linear.weight.rows();
        let edim = cfg.extra_heads_dim;
        let read_bytes = 4 * TOKEN_SLOTS as u64 + 4 * (edim * model.extra_heads.len()) as u64;
        let read_bytes = read_bytes
            + if opts.read_logits {
                4 * vocab as u64 + 8
            } else {
                0
            };
        let (tdims, _, _) = model.transformer.parts();
        Ok(Self {
            gpu: gpu.clone(),
            format: opts.format,
            program,
            temporal_only,
            depformer_only,
            tables,
            text_row,
            zero_row: gpu.activations("zero row", d.max(text_width)),
            gathered: shared.gathered,
            row_bytes,
            tokens: shared.tokens,
            probs: shared.probs,
            logits: shared.logits,
            read: gpu.readback_buffer(read_bytes),
            read_logits: opts.read_logits,
            bias,
            candidates: dep.and_then(|d| d.candidates),
            cross,
            cross_ready: false,
            dep_steps,
            offset: 0,
            head_dim: tdims.head_dim,
            rope: tdims.rope,
            max_period: tdims.max_period,
            weight_bytes: bytes,
            state_bytes,
            cfg,
        })
    }

    /// Plans the temporal step: the input embedding, the transformer, the text head and
    /// its sampling (and the TTS's candidate pick), the extra heads.
    #[allow(clippy::too_many_arguments)]
    fn plan_temporal(
        b: &mut Builder,
        model: &LmModel,
        opts: &GpuLmOptions,
        s: &Shared,
        gathered_rows: usize,
        bf16_rows: bool,
        text_row: &TextRow,
        bias: &Option<wgpu::Buffer>,
    ) -> Result<()> {
        let d = model.cfg.dim;
        let params = b.plan.params(&[
            d as u32,
            gathered_rows as u32,
            u32::from(bf16_rows),
            0,
            0,
            0,
            0,
            0,
        ]);
        b.plan.dispatch(
            "embed_sum",
            vec![
                (0, Res::Buffer(s.gathered.clone())),
                (1, Res::Buffer(s.x.clone())),
                (2, params),
            ],
            [(d as u32).div_ceil(64), 1, 1],
        );
        if let TextRow::Projected {
            demux, low, second, ..
        } = text_row
        {
            let e = &model.text_emb;
            let acc = Epilogue {
                accumulate: true,
                ..Default::default()
            };
            if let Some((out1, out2)) = &e.demux {
                let w1 = b.upload("text_emb.out1", out1)?;
                b.matvec(&w1, low, &s.x, &acc)?;
                let w2 = b.upload("text_emb.out2", out2)?;
                b.matvec(&w2, second, &s.x, &acc)?;
            } else if let Some(lr) = &e.low_rank {
                let w = b.upload("text_emb.low_rank", lr)?;
                b.matvec(&w, low, &s.x, &acc)?;
            }
            debug_assert_eq!(*demux, e.demux.is_some());
        }
        if let Some(bias) = bias {
            let params = b.plan.params(&[d as u32, 0, 0, 0, 0, 0, 0, 0]);
            b.plan.dispatch(
                "add_vec",
                vec![
                    (0, Res::Buffer(bias.clone())),
                    (1, Res::Buffer(s.x.clone())),
                    (2, params),
                ],
                [(d as u32).div_ceil(64), 1, 1],
            );
        }
        b.layers(
            "transformer",
            &model.transformer,
            &s.rings,
            &s.scratch,
            &s.x,
            0,
            &s.step,
        )?;
        b.norm(&model.out_norm, d, &s.x, &s.hidden);

        // Text head and its sampling.
        let text_linear = b.upload("text_linear", &model.text_linear.weight)?;
        let vocab = text_linear.rows;
        b.matvec(
            &text_linear,
            &s.hidden,
            &s.logits,
            &Epilogue {
                bias: model.text_linear.bias.clone(),
                ..Default::default()
            },
        )?;
        sample(b, s, &s.logits, vocab, 0, 0);
        if opts.tts {
            let params = b.plan.params(&[0, 0, PICK_SLOT, 0]);
            b.plan.dispatch(
                "tts_feed",
                vec![(1, Res::Buffer(s.tokens.clone())), (2, params)],
                [1, 1, 1],
            );
        }

        // Extra heads: softmax of each into `probs`.
        let edim = model.cfg.extra_heads_dim;
        for (k, m) in model.extra_heads.iter().enumerate() {
            let w = b.upload(&format!("extra_heads.{k}"), m)?;
            b.matvec(&w, &s.hidden, &s.extra_logits, &Epilogue::default())?;
            let params = b
                .plan
                .params(&[edim as u32, 0, 0, 0, 0, (k * edim) as u32, 0, 0]);
            b.plan.dispatch(
                "softmax_small",
                vec![
                    (0, Res::Buffer(s.extra_logits.clone())),
                    (1, Res::Buffer(s.probs.clone())),
                    (2, params),
                ],
                [1, 1, 1],
            );
        }
        Ok(())
    }

    /// Plans the depformer: one step per codebook, each conditioned on the token before.
    fn plan_depformer(
        b: &mut Builder,
        model: &LmModel,
        s: &Shared,
        ds: &DepShared,
        steps: usize,
    ) -> Result<()> {
        let Some(dep) = &model.depformer else {
            return Ok(());
        };
        let (ddims, sin, _) = dep.transformer.parts();
        let dd = ddims.d_model;
        for k in 0..steps {
            // A sinusoidal position embedding is a constant per depformer step: it goes
            // in as the input projection's bias.
            let bias = sin.map(|scale| {
                let mut c = vec![0f32; dd];
                add_sin_embedding(&mut c, dd, k, ddims.max_period, scale);
                c
            });
            let which = dep.schedule.as_ref().map_or(k, |sc| sc[k]);
            let which = which.min(dep.inputs.len() - 1);
            let input = b.upload(&format!("depformer_in.{which}"), &dep.inputs[which])?;
            b.matvec(
                &input,
                &s.hidden,
                &ds.x,
                &Epilogue {
                    bias,
                    ..Default::default()
                },
            )?;
            if k == 0 {
                match &ds.candidates {
                    // The TTS: the text embedding the CPU prepared for the text fed.
                    Some(c) => b.embed_add(
                        &[(c.clone(), 0, 2)],
                        false,
                        dd,
                        PICK_SLOT,
                        &ds.x,
                        &s.tokens,
                        false,
                    ),
                    None => {
                        let t = ds.text.as_ref().ok_or_else(|| {
                            Error::InvalidInput(
                                "the depformer's text embedding is projected: on the GPU \
                                 only the TTS's way runs it"
                                    .into(),
                            )
                        })?;
                        let chunks: Vec<_> =
                            t.chunks().map(|(c, r0, n)| (c.clone(), r0, n)).collect();
                        let bf16 = t.format != GpuFormat::F32;
                        b.embed_add(&chunks, bf16, dd, 0, &ds.x, &s.tokens, false);
                    }
                }
            } else {
                let t = &ds.emb[k - 1];
                let chunks: Vec<_> = t.chunks().map(|(c, r0, n)| (c.clone(), r0, n)).collect();
                let bf16 = t.format != GpuFormat::F32;
                match &dep.emb[k - 1].low_rank {
                    None => b.embed_add(&chunks, bf16, dd, k as u32, &ds.x, &s.tokens, false),
                    Some(lr) => {
                        b.embed_add(&chunks, bf16, t.cols, k as u32, &ds.low, &s.tokens, true);
                        let w = b.upload(&format!("depformer_emb.{}.low_rank", k - 1), lr)?;
                        b.matvec(
                            &w,
                            &ds.low,
                            &ds.x,
                            &Epilogue {
                                accumulate: true,
                                ..Default::default()
                            },
                        )?;
                    }
                }
            }
            let pos = StepBlock {
                pos: k as u32,
                rope: if ddims.rope {
                    rope_table(k, ddims.head_dim, ddims.max_period)
                } else {
                    vec![]
                },
                ..Default::default()
            };
            let pos = b.plan.params(&pos.words());
            b.layers(
                "depformer",
                &dep.transformer,
                &ds.rings,
                &ds.scratch,
                &ds.x,
                k,
                &pos,
            )?;
            let head = b.upload(&format!("linears.{k}"), &dep.heads[k].weight)?;
            b.matvec(
                &head,
                &ds.x,
                &ds.logits,
                &Epilogue {
                    bias: dep.heads[k].bias.clone(),
                    ..Default::default()
                },
            )?;
            sample(b, s, &ds.logits, model.cfg.card, 1, 1 + k as u32);
        }
        Ok(())
    }

    pub fn config(&self) -> &LmConfig {
        &self.cfg
    }

    pub fn format(&self) -> GpuFormat {
        self.format
    }

    /// Bytes of weights one step reads (embedding rows aside).
    pub fn weight_bytes_per_step(&self) -> usize {
        self.weight_bytes
    }

    /// Bytes of streaming state (the KV rings); fixed whatever the session's length.
    pub fn state_bytes(&self) -> usize {
        self.state_bytes
    }

    /// Depformer steps (codebooks drawn) each step runs.
    pub fn depformer_steps(&self) -> usize {
        self.dep_steps
    }

    /// Kernel dispatches in one step.
    pub fn dispatches_per_step(&self) -> usize {
        self.program.dispatch_count()
    }

    pub fn adapter_name(&self) -> &str {
        &self.gpu.info.name
    }

    /// Starts a new stream. The rings need no clearing: a slot is read only if it holds
    /// a position of the current stream.
    pub fn reset(&mut self) {
        self.offset = 0;
    }

    /// One step: `tokens_in` as [`LmModel::temporal_step`] takes them; `draws` one
    /// uniform number in [0, 1) per sampled stream that is not greedy (text, then each
    /// depformer codebook; zeros otherwise).
    pub fn step(
        &mut self,
        tokens_in: &[i64],
        text: Sampling,
        audio: Sampling,
        draws: &[f32],
    ) -> Result<GpuStep> {
        if self.temporal_only.is_some() {
            return Err(Error::InvalidInput(
                "this model was put on the GPU the TTS's way: step it with tts_step".into(),
            ));
        }
        self.run(Which::Whole, Some(tokens_in), text, audio, draws)
    }

    /// The TTS's step. With `candidates` (the depformer's text embedding after a
    /// new-word prediction, and after any other), the whole step in one submit, the GPU
    /// picking the candidate by its own text prediction; without, the temporal step
    /// alone (its `audio` empty), for a step that may have to wait for words or whose
    /// audio is still masked.
    pub fn tts_step(
        &mut self,
        tokens_in: &[i64],
        text: Sampling,
        audio: Sampling,
        draws: &[f32],
        candidates: Option<(&[f32], &[f32])>,
    ) -> Result<GpuStep> {
        let which = match candidates {
            Some((a, b)) => {
                self.write_candidates(a, b)?;
                Which::Whole
            }
            None => Which::Temporal,
        };
        self.run(which, Some(tokens_in), text, audio, draws)
    }

    /// The TTS's depformer alone, after [`Self::tts_step`] without candidates: the
    /// codebooks of the step just taken, given the text embedding of the token fed.
    /// `draws[1..]` are the codebooks' draws.
    pub fn tts_depformer(
        &mut self,
        text_embedding: &[f32],
        audio: Sampling,
        draws: &[f32],
    ) -> Result<Vec<u32>> {
        self.write_candidates(text_embedding, text_embedding)?;
        let text = Sampling {
            temp: 0.0,
            top_k: 0,
        };
        Ok(self.run(Which::Depformer, None, text, audio, draws)?.audio)
    }

    fn write_candidates(&self, a: &[f32], b: &[f32]) -> Result<()> {
        let c = self.candidates.as_ref().ok_or_else(|| {
            Error::InvalidInput("this model was not put on the GPU the TTS's way".into())
        })?;
        let dd = (c.size() / 8) as usize;
        if a.len() != dd || b.len() != dd {
            return Err(Error::InvalidInput(format!(
                "text embeddings of {} and {} values for a depformer of {dd}",
                a.len(),
                b.len()
            )));
        }
        self.gpu
            .queue
            .write_buffer(c, 0, bytemuck::cast_slice(&[a, b].concat()));
        Ok(())
    }

    /// Sets what every step's input gets added (the TTS's summed conditions).
    pub fn set_input_bias(&mut self, bias: &[f32]) -> Result<()> {
        let b = self.bias.as_ref().ok_or_else(|| {
            Error::InvalidInput("this model was put on the GPU without an input bias".into())
        })?;
        if bias.len() != self.cfg.dim {
            return Err(Error::InvalidInput(format!(
                "an input bias of {} values for a model of dim {}",
                bias.len(),
                self.cfg.dim
            )));
        }
        self.gpu
            .queue
            .write_buffer(b, 0, bytemuck::cast_slice(bias));
        Ok(())
    }

    /// Sets the conditioning the cross-attention reads (`n` rows of `dim`, `n` as given
    /// when the model was put on the GPU) and computes its keys and values there, once.
    pub fn set_cross_source(&mut self, src: &[f32], n: usize) -> Result<()> {
        let (buf, program, rows) = self
            .cross
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("this model has no cross-attention".into()))?;
        if n != *rows || src.len() != n * self.cfg.dim {
            return Err(Error::InvalidInput(format!(
                "a conditioning of {} values in {n} rows; this model on the GPU takes {rows} \
                 rows of {}",
                src.len(),
                self.cfg.dim
            )));
        }
        let gpu = self.gpu.clone();
        gpu.queue.write_buffer(buf, 0, bytemuck::cast_slice(src));
        let mut enc = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("conditioning"),
            });
        program.record(&mut enc);
        gpu.submit_and_read(enc, &[], &self.read)?;
        self.cross_ready = true;
        Ok(())
    }

    fn run(
        &mut self,
        which: Which,
        tokens_in: Option<&[i64]>,
        text: Sampling,
        audio: Sampling,
        draws: &[f32],
    ) -> Result<GpuStep> {
        if self.cross.is_some() && !self.cross_ready {
            return Err(Error::InvalidInput(
                "a cross-attention model stepped without its conditioning (set_cross_source)"
                    .into(),
            ));
        }
        let gpu = self.gpu.clone();
        let mut enc = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("lm step"),
            });
        if let Some(tokens_in) = tokens_in {
            self.gather(&mut enc, tokens_in)?;
        }
        // The depformer alone runs after the temporal step it completes.
        let pos = if which == Which::Depformer {
            self.offset.saturating_sub(1)
        } else {
            self.offset
        };
        let mut block = StepBlock {
            pos: pos as u32,
            text_top_k: text.top_k as u32,
            audio_top_k: audio.top_k as u32,
            text_temp: text.temp,
            audio_temp: audio.temp,
            rope: if self.rope {
                rope_table(pos, self.head_dim, self.max_period)
            } else {
                vec![]
            },
            ..Default::default()
        };
        for (d, v) in block.draws.iter_mut().zip(draws) {
            *d = *v;
        }
        let program = match which {
            Which::Whole => &self.program,
            Which::Temporal => self.temporal_only.as_ref().unwrap_or(&self.program),
            Which::Depformer => self.depformer_only.as_ref().ok_or_else(|| {
                Error::InvalidInput("this model was not put on the GPU the TTS's way".into())
            })?,
        };
        program.write_step_block(&gpu, &block.words());
        program.record(&mut enc);
        let n_audio = if which == Which::Temporal {
            0
        } else {
            self.dep_steps
        };
        let mut regions = vec![
            (&self.tokens, 0, 4 * (1 + self.dep_steps) as u64),
            (&self.probs, 0, self.probs.size()),
        ];
        if self.read_logits && which != Which::Depformer {
            regions.push((&self.logits, 0, self.logits.size()));
        }
        let out = gpu.submit_and_read(enc, &regions, &self.read)?;
        if which != Which::Depformer {
            self.offset += 1;
        }
        let toks: Vec<u32> = bytemuck::pod_collect_to_vec(&out[0]);
        let probs: Vec<f32> = bytemuck::pod_collect_to_vec(&out[1]);
        let edim = self.cfg.extra_heads_dim;
        let n_extra = probs.len();
        let extra_heads = if edim == 0 || self.cfg.extra_heads_num_heads == 0 {
            vec![]
        } else {
            probs[..n_extra.min(edim * self.cfg.extra_heads_num_heads)]
                .chunks(edim)
                .map(<[f32]>::to_vec)
                .collect()
        };
        Ok(GpuStep {
            text_token: toks[0],
            audio: toks[1..1 + n_audio].to_vec(),
            extra_heads,
            text_logits: out.get(2).map(|b| bytemuck::pod_collect_to_vec(b)),
        })
    }

    /// Records the copies of this step's embedding rows.
    fn gather(&self, enc: &mut wgpu::CommandEncoder, tokens_in: &[i64]) -> Result<()> {
        let n_audio = self.cfg.n_q;
        if tokens_in.len() != n_audio + 1 {
            return Err(Error::InvalidInput(format!(
                "{} tokens for a model of {} streams",
                tokens_in.len(),
                n_audio + 1
            )));
        }
        let copy_row = |enc: &mut wgpu::CommandEncoder,
                        table: &GpuWeight,
                        tok: i64,
                        dst: &wgpu::Buffer,
                        at: u64,
                        bytes: u64|
         -> Result<()> {
            if tok == ZERO_TOKEN {
                enc.copy_buffer_to_buffer(&self.zero_row, 0, dst, at, bytes);
                return Ok(());
            }
            if tok < 0 || tok as usize >= table.rows {
                return Err(Error::InvalidInput(format!(
                    "token {tok} is outside this embedding's 0..{}",
                    table.rows
                )));
            }
            let t = tok as usize;
            let (buf, row0, _) = table
                .chunks()
                .find(|&(_, row0, rows)| t >= row0 && t < row0 + rows)
                .ok_or_else(|| Error::InvalidInput(format!("token {tok} in no table chunk")))?;
            enc.copy_buffer_to_buffer(buf, (t - row0) as u64 * bytes, dst, at, bytes);
            Ok(())
        };
        // Rows are summed audio streams first, then text: tokens_in[1..], then [0].
        for (slot, (table, &tok)) in self.tables.iter().zip(&tokens_in[1..]).enumerate() {
            copy_row(
                enc,
                table,
                tok,
                &self.gathered,
                slot as u64 * self.row_bytes,
                self.row_bytes,
            )?;
        }
        match &self.text_row {
            TextRow::Gathered => copy_row(
                enc,
                &self.tables[n_audio],
                tokens_in[0],
                &self.gathered,
                n_audio as u64 * self.row_bytes,
                self.row_bytes,
            )?,
            TextRow::Projected {
                table,
                demux,
                low,
                second,
            } => {
                let bytes = 4 * table.cols as u64;
                let tok = tokens_in[0];
                let (first, next) = match (*demux, tok) {
                    (_, ZERO_TOKEN) => (ZERO_TOKEN, ZERO_TOKEN),
                    (true, t) if t >= 0 => {
                        let rows = table.rows as i64;
                        if t >= rows * (rows + 1) {
                            return Err(Error::InvalidInput(format!(
                                "token {t} is outside this embedding's 0..{}",
                                rows * (rows + 1)
                            )));
                        }
                        let s = t / rows - 1;
                        (t % rows, if s < 0 { ZERO_TOKEN } else { s })
                    }
                    (_, t) => (t, ZERO_TOKEN),
                };
                copy_row(enc, table, first, low, 0, bytes)?;
                copy_row(enc, table, next, second, 0, bytes)?;
            }
        }
        Ok(())
    }
}
