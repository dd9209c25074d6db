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

use std::sync::Arc;

use super::generator::Sampling;
use super::{Embedding, LmConfig, LmModel, ZERO_TOKEN};
use crate::compute::cpu::Matrix;
use crate::compute::gpu::{
    Epilogue, Gpu, GpuFormat, GpuWeight, Plan, Program, Res, StepBlock, MAX_ROPE_PAIRS,
    STEP_BLOCK_BYTES,
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
}

/// What one GPU step gives.
#[derive(Debug, Clone)]
pub struct GpuStep {
    pub text_token: u32,
    pub audio: Vec<u32>,
    pub extra_heads: Vec<Vec<f32>>,
    pub text_logits: Option<Vec<f32>>,
}

#[derive(Debug)]
pub struct GpuLm {
    gpu: Arc<Gpu>,
    cfg: LmConfig,
    format: GpuFormat,
    program: Program,
    /// The temporal embedding tables in the order rows are summed: audio streams, then
    /// text (the CPU path's order).
    tables: Vec<GpuWeight>,
    zero_row: wgpu::Buffer,
    gathered: wgpu::Buffer,
    row_bytes: u64,
    tokens: wgpu::Buffer,
    probs: wgpu::Buffer,
    logits: wgpu::Buffer,
    read: wgpu::Buffer,
    read_logits: bool,
    /// Position of the next temporal step.
    offset: usize,
    head_dim: usize,
    rope: bool,
    max_period: f32,
    weight_bytes: usize,
    state_bytes: usize,
}

/// Activation buffers of one transformer.
struct Scratch {
    h: wgpu::Buffer,
    qkv: wgpu::Buffer,
    attn: wgpu::Buffer,
    ff: wgpu::Buffer,
    gate: wgpu::Buffer,
    scores: wgpu::Buffer,
}

struct Builder<'a> {
    gpu: &'a Gpu,
    plan: Plan,
    format: GpuFormat,
    limit: u64,
    bytes: usize,
    state_bytes: usize,
}

impl Builder<'_> {
    fn upload(&mut self, label: &str, m: &Matrix) -> Result<GpuWeight> {
        let w: Vec<f32> = m.to_f32()?.flatten_all()?.to_vec1()?;
        let g = GpuWeight::upload(
            self.gpu,
            label,
            &w,
            m.rows(),
            m.cols(),
            self.format,
            self.limit,
        )?;
        self.bytes += g.size_in_bytes();
        Ok(g)
    }

    fn table(&mut self, label: &str, e: &Embedding) -> Result<GpuWeight> {
        let m = &e.table;
        let w: Vec<f32> = m.to_f32()?.flatten_all()?.to_vec1()?;
        let format = if self.format == GpuFormat::F32 {
            GpuFormat::F32
        } else {
            GpuFormat::Bf16
        };
        GpuWeight::upload(self.gpu, label, &w, m.rows(), m.cols(), format, self.limit)
    }

    fn matvec(
        &mut self,
        w: &GpuWeight,
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
        epi: &Epilogue,
    ) -> Result<()> {
        self.plan.matvec(self.gpu, w, x, out, 1, epi)
    }

    fn norm(&mut self, n: &Norm, dim: usize, x: &wgpu::Buffer, out: &wgpu::Buffer) {
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

    /// Plans the transformer's layers on `x` in place, with the weights of step
    /// `widx`, at the position given by `pos` (a `Step` block).
    #[allow(clippy::too_many_arguments)]
    fn layers(
        &mut self,
        label: &str,
        t: &StreamingTransformer,
        rings: &[(wgpu::Buffer, wgpu::Buffer)],
        s: &Scratch,
        x: &wgpu::Buffer,
        widx: usize,
        pos: &Res,
    ) -> Result<()> {
        let (dims, _, layers) = t.parts();
        if t.has_cross_attention() {
            return Err(crate::Error::InvalidInput(
                "cross-attention (the TTS) does not run on the GPU yet: use --device cpu".into(),
            ));
        }
        let d = dims.d_model;
        let cap = ring_capacity(t);
        // `widx` is a step; a schedule may give several steps one weight set.
        let widx = dims.weight_set(widx);
        for (i, (layer, (kr, vr))) in layers.iter().zip(rings).enumerate() {
            let w = widx.min(layer.in_proj.len() - 1);
            self.norm(&layer.norm1, d, x, &s.h);
            let in_proj = self.upload(&format!("{label}.{i}.in_proj"), &layer.in_proj[w])?;
            self.matvec(&in_proj, &s.h, &s.qkv, &Epilogue::default())?;
            let params = self.plan.params(&[
                dims.num_heads as u32,
                dims.head_dim as u32,
                cap as u32,
                u32::from(dims.rope),
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
                "attend",
                vec![
                    (0, Res::Buffer(s.qkv.clone())),
                    (1, Res::Buffer(kr.clone())),
                    (2, Res::Buffer(vr.clone())),
                    (3, params),
                    (4, pos.clone()),
                    (5, Res::Buffer(s.scores.clone())),
                    (6, Res::Buffer(s.attn.clone())),
                ],
                [dims.num_heads as u32, 1, 1],
            );
            let out_proj = self.upload(&format!("{label}.{i}.out_proj"), &layer.out_proj[w])?;
            self.matvec(
                &out_proj,
                &s.attn,
                x,
                &Epilogue {
                    accumulate: true,
                    bias: None,
                    scale: layer.scale1.clone(),
                },
            )?;
            self.norm(&layer.norm2, d, x, &s.h);
            let FeedForward::Gated {
                linear_in,
                linear_out,
                silu: true,
            } = &layer.ff[widx.min(layer.ff.len() - 1)]
            else {
                return Err(Error::InvalidInput(format!(
                    "{label}: the GPU path runs SiLU-gated feed-forwards only"
                )));
            };
            let hidden = linear_out.cols();
            let lin = self.upload(&format!("{label}.{i}.linear_in"), linear_in)?;
            self.matvec(&lin, &s.h, &s.ff, &Epilogue::default())?;
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
            let lout = self.upload(&format!("{label}.{i}.linear_out"), linear_out)?;
            self.matvec(
                &lout,
                &s.gate,
                x,
                &Epilogue {
                    accumulate: true,
                    bias: None,
                    scale: layer.scale2.clone(),
                },
            )?;
        }
        Ok(())
    }

    fn scratch(&self, label: &str, t: &StreamingTransformer) -> Result<Scratch> {
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
            scores: self.gpu.activations(
                &format!("{label}.scores"),
                dims.num_heads * ring_capacity(t),
            ),
        })
    }

    fn rings(
        &mut self,
        label: &str,
        t: &StreamingTransformer,
    ) -> Result<Vec<(wgpu::Buffer, wgpu::Buffer)>> {
        let (dims, _, layers) = t.parts();
        let n = dims.d_model * ring_capacity(t);
        if (n * 4) as u64 > self.gpu.max_binding_bytes() {
            return Err(Error::InvalidInput(format!(
                "{label}: a KV ring of {} bytes exceeds this GPU's largest binding ({} bytes)",
                n * 4,
                self.gpu.max_binding_bytes()
            )));
        }
        self.state_bytes += layers.len() * 2 * n * 4;
        Ok(layers
            .iter()
            .map(|_| {
                (
                    self.gpu.activations(&format!("{label}.k"), n),
                    self.gpu.activations(&format!("{label}.v"), n),
                )
            })
            .collect())
    }
}

/// Steps a ring holds: the attention context, or the steps of per-step weights (the
/// CPU path's streaming window).
fn ring_capacity(t: &StreamingTransformer) -> usize {
    let (dims, _, _) = t.parts();
    dims.context.unwrap_or(dims.weights_per_step).max(1)
}

fn check_transformer(label: &str, t: &StreamingTransformer, temporal: bool) -> Result<()> {
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

impl GpuLm {
    /// Uploads `model` and plans its step.
    pub fn new(gpu: &Arc<Gpu>, model: &LmModel, opts: GpuLmOptions) -> Result<Self> {
        let cfg = model.config().clone();
        let limit = opts
            .max_binding_bytes
            .unwrap_or_else(|| gpu.max_binding_bytes())
            .min(gpu.max_binding_bytes());
        check_transformer("transformer", &model.transformer, true)?;
        if cfg.dep_q + 1 > 32 {
            return Err(Error::InvalidInput(format!(
                "{} depformer codebooks (the GPU path draws up to 31)",
                cfg.dep_q
            )));
        }
        let mut b = Builder {
            gpu,
            plan: Plan::new(gpu, STEP_BLOCK_BYTES),
            format: opts.format,
            limit,
            bytes: 0,
            state_bytes: 0,
        };
        let d = cfg.dim;
        let step = b.plan.step_block(STEP_BLOCK_BYTES);

        // Embeddings: gathered rows summed into x.
        let mut tables = model
            .emb
            .iter()
            .enumerate()
            .map(|(k, e)| b.table(&format!("emb.{k}"), e))
            .collect::<Result<Vec<_>>>()?;
        tables.push(b.table("text_emb", &model.text_emb)?);
        let table_format = tables[0].format;
        let row_bytes = match table_format {
            GpuFormat::F32 => d * 4,
            _ => d * 2,
        } as u64;
        let gathered = gpu.activations("gathered", (row_bytes as usize * tables.len()).div_ceil(4));
        let zero_row = gpu.activations("zero row", d);
        let x = gpu.activations("x", d);
        let params = b.plan.params(&[
            d as u32,
            tables.len() as u32,
            u32::from(table_format != GpuFormat::F32),
            0,
            0,
            0,
            0,
            0,
        ]);
        b.plan.dispatch(
            "embed_sum",
            vec![
                (0, Res::Buffer(gathered.clone())),
                (1, Res::Buffer(x.clone())),
                (2, params),
            ],
            [(d as u32).div_ceil(64), 1, 1],
        );

        // The temporal transformer.
        let scratch = b.scratch("transformer", &model.transformer)?;
        let rings = b.rings("transformer", &model.transformer)?;
        b.layers(
            "transformer",
            &model.transformer,
            &rings,
            &scratch,
            &x,
            0,
            &step,
        )?;
        let hidden = gpu.activations("hidden", d);
        b.norm(&model.out_norm, d, &x, &hidden);

        // Text head and its sampling.
        let text_linear = b.upload("text_linear", &model.text_linear.weight)?;
        let vocab = text_linear.rows;
        let logits = gpu.activations("text logits", vocab);
        b.matvec(
            &text_linear,
            &hidden,
            &logits,
            &Epilogue {
                bias: model.text_linear.bias.clone(),
                ..Default::default()
            },
        )?;
        let tokens = gpu.activations("tokens", 32);
        let sample = |b: &mut Builder, logits: &wgpu::Buffer, n: usize, class: u32, slot: u32| {
            let params = b.plan.params(&[n as u32, class, slot, slot]);
            b.plan.dispatch(
                "sample",
                vec![
                    (0, Res::Buffer(logits.clone())),
                    (1, Res::Buffer(tokens.clone())),
                    (2, params),
                    (3, step.clone()),
                ],
                [1, 1, 1],
            );
        };
        sample(&mut b, &logits, vocab, 0, 0);

        // Extra heads: softmax of each into `probs`.
        let edim = cfg.extra_heads_dim;
        let probs = gpu.activations("extra heads", (edim * model.extra_heads.len()).max(1));
        let extra_logits = gpu.activations("extra logits", edim.max(1));
        for (k, m) in model.extra_heads.iter().enumerate() {
            let w = b.upload(&format!("extra_heads.{k}"), m)?;
            b.matvec(&w, &hidden, &extra_logits, &Epilogue::default())?;
            let params = b
                .plan
                .params(&[edim as u32, 0, 0, 0, 0, (k * edim) as u32, 0, 0]);
            b.plan.dispatch(
                "softmax_small",
                vec![
                    (0, Res::Buffer(extra_logits.clone())),
                    (1, Res::Buffer(probs.clone())),
                    (2, params),
                ],
                [1, 1, 1],
            );
        }

        // The depformer: one step per codebook, each conditioned on the token before.
        if let Some(dep) = &model.depformer {
            check_transformer("depformer", &dep.transformer, false)?;
            let (ddims, sin, _) = dep.transformer.parts();
            let dd = ddims.d_model;
            let dscratch = b.scratch("depformer", &dep.transformer)?;
            let drings = b.rings("depformer", &dep.transformer)?;
            let dx = gpu.activations("depformer x", dd);
            let dlogits = gpu.activations("depformer logits", cfg.card);
            let inputs = dep
                .inputs
                .iter()
                .enumerate()
                .map(|(k, m)| b.upload(&format!("depformer_in.{k}"), m))
                .collect::<Result<Vec<_>>>()?;
            let mut dtables = vec![b.table("depformer_text_emb", &dep.text_emb)?];
            for (k, e) in dep.emb.iter().enumerate() {
                dtables.push(b.table(&format!("depformer_emb.{k}"), e)?);
            }
            for k in 0..dep.heads.len() {
                // A sinusoidal position embedding is a constant per depformer step: it
                // goes in as the input projection's bias.
                let bias = sin.map(|scale| {
                    let mut c = vec![0f32; dd];
                    add_sin_embedding(&mut c, dd, k, ddims.max_period, scale);
                    c
                });
                b.matvec(
                    &inputs[k.min(inputs.len() - 1)],
                    &hidden,
                    &dx,
                    &Epilogue {
                        bias,
                        ..Default::default()
                    },
                )?;
                let table = &dtables[k];
                let tformat = u32::from(table.format != GpuFormat::F32);
                for (buf, row0, rows) in table.chunks() {
                    let params = b.plan.params(&[
                        dd as u32,
                        row0 as u32,
                        tformat,
                        k as u32,
                        rows as u32,
                        0,
                        0,
                        0,
                    ]);
                    b.plan.dispatch(
                        "embed_add",
                        vec![
                            (0, Res::Buffer(buf.clone())),
                            (1, Res::Buffer(dx.clone())),
                            (2, params),
                            (3, Res::Buffer(tokens.clone())),
                        ],
                        [(dd as u32).div_ceil(64), 1, 1],
                    );
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
                    &drings,
                    &dscratch,
                    &dx,
                    k,
                    &pos,
                )?;
                let head = b.upload(&format!("linears.{k}"), &dep.heads[k].weight)?;
                b.matvec(
                    &head,
                    &dx,
                    &dlogits,
                    &Epilogue {
                        bias: dep.heads[k].bias.clone(),
                        ..Default::default()
                    },
                )?;
                sample(&mut b, &dlogits, cfg.card, 1, 1 + k as u32);
            }
        }

        let (bytes, state_bytes) = (b.bytes, b.state_bytes);
        let program = b.plan.build(gpu)?;
        let read_bytes = 128 + 4 * (edim * model.extra_heads.len()) as u64;
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
            tables,
            zero_row,
            gathered,
            row_bytes,
            tokens,
            probs,
            logits,
            read: gpu.readback_buffer(read_bytes),
            read_logits: opts.read_logits,
            offset: 0,
            head_dim: tdims.head_dim,
            rope: tdims.rope,
            max_period: tdims.max_period,
            weight_bytes: bytes,
            state_bytes,
            cfg,
        })
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
        let n = self.tables.len();
        if tokens_in.len() != n {
            return Err(Error::InvalidInput(format!(
                "{} tokens for a model of {n} streams",
                tokens_in.len()
            )));
        }
        let gpu = self.gpu.clone();
        let mut enc = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("lm step"),
            });
        // Rows are summed audio streams first, then text: tokens_in[1..], then [0].
        for (slot, (table, &tok)) in self.tables[..n - 1]
            .iter()
            .zip(&tokens_in[1..])
            .chain(std::iter::once((&self.tables[n - 1], &tokens_in[0])))
            .enumerate()
        {
            let dst = slot as u64 * self.row_bytes;
            if tok == ZERO_TOKEN {
                enc.copy_buffer_to_buffer(&self.zero_row, 0, &self.gathered, dst, self.row_bytes);
                continue;
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
            enc.copy_buffer_to_buffer(
                buf,
                (t - row0) as u64 * self.row_bytes,
                &self.gathered,
                dst,
                self.row_bytes,
            );
        }
        let mut block = StepBlock {
            pos: self.offset as u32,
            text_top_k: text.top_k as u32,
            audio_top_k: audio.top_k as u32,
            text_temp: text.temp,
            audio_temp: audio.temp,
            rope: if self.rope {
                rope_table(self.offset, self.head_dim, self.max_period)
            } else {
                vec![]
            },
            ..Default::default()
        };
        for (d, v) in block.draws.iter_mut().zip(draws) {
            *d = *v;
        }
        self.program.write_step_block(&gpu, &block.words());
        self.program.record(&mut enc);
        let dep_q = self.cfg.dep_q;
        let n_extra = (self.probs.size() / 4) as usize;
        let mut regions = vec![
            (&self.tokens, 0, 4 * (1 + dep_q) as u64),
            (&self.probs, 0, self.probs.size()),
        ];
        if self.read_logits {
            regions.push((&self.logits, 0, self.logits.size()));
        }
        let out = gpu.submit_and_read(enc, &regions, &self.read)?;
        self.offset += 1;
        let toks: Vec<u32> = bytemuck::pod_collect_to_vec(&out[0]);
        let probs: Vec<f32> = bytemuck::pod_collect_to_vec(&out[1]);
        let edim = self.cfg.extra_heads_dim;
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
            audio: toks[1..].to_vec(),
            extra_heads,
            text_logits: out.get(2).map(|b| bytemuck::pod_collect_to_vec(b)),
        })
    }
}
