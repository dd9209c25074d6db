//! Frame-by-frame generation with per-stream delays (the reference's `LMGen`).
//!
//! Each call takes one frame of the user's audio codes and returns that frame's output:
//! the model's text token and, for models that speak, its audio tokens, once the delays
//! allow (nothing during the first `max(delays)` steps, as the reference). Stream `k` at
//! step `t` feeds the token of step `t - delays[k]`; tokens are kept in a ring of
//! `max(delays) + 2` steps, so memory stays constant.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::gpu::{GpuLm, GpuLmOptions};
use super::{LmConfig, LmModel, TemporalOutput};
use crate::compute::cpu::WeightPrecision;
use crate::compute::gpu::{Backend, GpuFormat};
use crate::compute::Dtype;
use crate::{Error, Result};

/// Token id of a stream position not generated yet (the reference's -2).
const UNGENERATED: i64 = -2;

/// How tokens are chosen from logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 (or less): greedy.
    pub temp: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling {
        temp: 0.0,
        top_k: 0,
    };

    /// Picks a token from `logits`.
    pub fn choose(&self, logits: &[f32], rng: &mut StdRng) -> u32 {
        if self.temp <= 0.0 {
            // The first maximum, as torch.argmax.
            let mut best = 0;
            for (i, &v) in logits.iter().enumerate() {
                if v > logits[best] {
                    best = i;
                }
            }
            return best as u32;
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        if self.top_k > 0 && self.top_k < logits.len() {
            idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            idx.truncate(self.top_k);
        }
        let max = idx
            .iter()
            .map(|&i| logits[i])
            .fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i] - max) / self.temp) as f64).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut r = rng.random::<f64>() * total;
        for (&i, w) in idx.iter().zip(&weights) {
            if r < *w {
                return i as u32;
            }
            r -= w;
        }
        idx[idx.len() - 1] as u32
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenConfig {
    pub text: Sampling,
    pub audio: Sampling,
    pub seed: u64,
}

impl Default for GenConfig {
    fn default() -> Self {
        Self {
            text: Sampling::GREEDY,
            audio: Sampling::GREEDY,
            seed: 0,
        }
    }
}

/// One step's output.
#[derive(Debug, Clone)]
pub struct GenStep {
    /// The model's streams (text, then its `dep_q` audio codebooks) aligned in time, once
    /// the delays allow; None during the first `max(delays)` steps.
    pub tokens: Option<Vec<i64>>,
    /// This step's text token, before any delay is undone.
    pub text_token: u32,
    /// This step's text logits: always on the CPU; on the GPU only when it was built to
    /// read them back.
    pub text_logits: Option<Vec<f32>>,
    /// This step's extra-head probabilities (end-of-turn heads), one vector per head.
    pub extra_heads: Vec<Vec<f32>>,
}

/// Where the model runs.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // One per generator; the CPU model is not moved around.
pub enum LmBackend {
    Cpu(LmModel),
    Gpu(Box<GpuLm>),
}

impl LmBackend {
    /// Loads the model for `device` in `dtype`. `load` reads the checkpoint with the CPU
    /// matrices in the precision given (for the GPU: f32 for f32 and f16 weights, else
    /// bf16, halving the host memory the upload needs). `params`, the checkpoint's weight
    /// count where known, lets `--precision auto` on the CPU pick a format that fits in
    /// the memory available. Returns the backend and a line saying which format runs.
    pub fn open(
        device: &Backend,
        dtype: Dtype,
        params: Option<u64>,
        load: impl FnOnce(WeightPrecision) -> Result<LmModel>,
    ) -> Result<(Self, String)> {
        match device {
            Backend::Cpu => {
                let (precision, line) = match (dtype, params) {
                    (Dtype::Auto, Some(n)) => {
                        let available = crate::compute::cpu::available_memory_bytes();
                        // A quarter-gigabyte probe (a tenth of a second or so) on the
                        // threads the model will use.
                        let read_gbs = crate::compute::cpu::measure_read_bandwidth_gbs(1 << 28);
                        let (p, why) = WeightPrecision::auto_for(n, available, Some(read_gbs));
                        (p, format!("weights: {p} (--precision auto: {why})"))
                    }
                    _ => {
                        let p = dtype.cpu()?;
                        (p, format!("weights: {p} (--precision {dtype})"))
                    }
                };
                let mut m = load(precision)?;
                m.set_weight_precision(precision)?;
                Ok((Self::Cpu(m), line))
            }
            Backend::Gpu(gpu) => {
                let format = dtype.gpu()?;
                let host = match format {
                    GpuFormat::F32 | GpuFormat::F16 => WeightPrecision::F32,
                    _ => WeightPrecision::Bf16,
                };
                let m = load(host)?;
                let opts = GpuLmOptions {
                    format,
                    ..Default::default()
                };
                let line = format!("weights: {format:?} on the GPU (--precision {dtype})");
                Ok((Self::Gpu(Box::new(GpuLm::new(gpu, &m, opts)?)), line))
            }
        }
    }

    pub fn config(&self) -> &LmConfig {
        match self {
            Self::Cpu(m) => m.config(),
            Self::Gpu(g) => g.config(),
        }
    }

    /// Bytes of streaming state; fixed whatever the session's length.
    pub fn state_bytes(&self) -> usize {
        match self {
            Self::Cpu(m) => m.state_bytes(),
            Self::Gpu(g) => g.state_bytes(),
        }
    }

    /// Bytes of weights one step reads.
    pub fn weight_bytes_per_step(&self) -> usize {
        match self {
            Self::Cpu(m) => m.weight_bytes_per_step(),
            Self::Gpu(g) => g.weight_bytes_per_step(),
        }
    }
}

#[derive(Debug)]
pub struct LmGen {
    model: LmBackend,
    cfg: GenConfig,
    rng: StdRng,
    /// `[streams][max_delay + 2]`.
    cache: Vec<Vec<i64>>,
    offset: usize,
    max_delay: usize,
    /// The stream facts a step needs, from the model's config (fixed for its life).
    streams: Streams,
}

#[derive(Debug, Clone)]
struct Streams {
    delays: Vec<usize>,
    dep_q: usize,
    card: usize,
    text_card: usize,
}

impl LmGen {
    pub fn new(model: LmModel, cfg: GenConfig) -> Self {
        Self::with_backend(LmBackend::Cpu(model), cfg)
    }

    pub fn with_backend(model: LmBackend, cfg: GenConfig) -> Self {
        let c = model.config();
        let k = c.num_codebooks();
        let max_delay = c.delays.iter().copied().max().unwrap_or(0);
        let streams = Streams {
            delays: c.delays.clone(),
            dep_q: c.dep_q,
            card: c.card,
            text_card: c.text_card,
        };
        Self {
            streams,
            model,
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            cache: vec![vec![UNGENERATED; max_delay + 2]; k],
            offset: 0,
            max_delay,
        }
    }

    pub fn backend(&self) -> &LmBackend {
        &self.model
    }

    pub fn config(&self) -> &LmConfig {
        self.model.config()
    }

    /// Steps with no output at the start of a stream.
    pub fn max_delay(&self) -> usize {
        self.max_delay
    }

    /// Input codebooks the model needs per step (the user's audio stream).
    pub fn input_codebooks(&self) -> usize {
        let c = self.model.config();
        c.num_codebooks() - c.dep_q - 1
    }

    /// Starts a new stream.
    pub fn reset(&mut self) {
        match &mut self.model {
            LmBackend::Cpu(m) => m.reset(),
            LmBackend::Gpu(g) => g.reset(),
        }
        self.cache.iter_mut().for_each(|c| c.fill(UNGENERATED));
        self.offset = 0;
        self.rng = StdRng::seed_from_u64(self.cfg.seed);
    }

    /// One step: `input` holds at least [`Self::input_codebooks`] codes of the user's audio
    /// for this frame (extra ones are ignored, as the reference does).
    pub fn step(&mut self, input: &[u32]) -> Result<GenStep> {
        let cfg = &self.streams;
        let needed = self.input_codebooks();
        if input.len() < needed {
            return Err(Error::InvalidInput(format!(
                "{} input codes for a model that reads {needed} per step",
                input.len()
            )));
        }
        if let Some(bad) = input[..needed].iter().find(|&&c| c as usize >= cfg.card) {
            return Err(Error::InvalidInput(format!(
                "audio code {bad} is outside 0..{}",
                cfg.card
            )));
        }
        let ct = self.max_delay + 2;
        let k_total = cfg.delays.len();
        for k in cfg.dep_q + 1..k_total {
            self.cache[k][(self.offset + cfg.delays[k]) % ct] = input[k - cfg.dep_q - 1] as i64;
        }
        let tokens_in: Vec<i64> = (0..k_total)
            .map(|k| {
                if self.offset <= cfg.delays[k] {
                    if k == 0 {
                        cfg.text_card as i64
                    } else {
                        cfg.card as i64
                    }
                } else {
                    self.cache[k][self.offset % ct]
                }
            })
            .collect();
        let (text_token, audio, text_logits, extra_heads) = match &mut self.model {
            LmBackend::Cpu(model) => {
                let (gen_cfg, rng) = (&self.cfg, &mut self.rng);
                crate::compute::cpu::on_pool(|| -> Result<_> {
                    let TemporalOutput {
                        hidden,
                        text_logits,
                    } = model.temporal_step(&tokens_in)?;
                    let text_token = gen_cfg.text.choose(&text_logits, rng);
                    let audio = if cfg.dep_q > 0 {
                        let sampling = gen_cfg.audio;
                        model.depformer_step(text_token as i64, &hidden, |_, logits| {
                            sampling.choose(logits, rng)
                        })?
                    } else {
                        vec![]
                    };
                    let extra_heads = model.extra_heads(&hidden)?;
                    Ok((text_token, audio, Some(text_logits), extra_heads))
                })?
            }
            LmBackend::Gpu(g) => {
                // One uniform draw per stream that samples, in the CPU path's order.
                let mut draws = vec![0f32; 1 + cfg.dep_q];
                if self.cfg.text.temp > 0.0 {
                    draws[0] = (self.rng.random::<f64>() as f32).min(0.999_999_9);
                }
                if self.cfg.audio.temp > 0.0 {
                    for d in &mut draws[1..] {
                        *d = (self.rng.random::<f64>() as f32).min(0.999_999_9);
                    }
                }
                let out = g.step(&tokens_in, self.cfg.text, self.cfg.audio, &draws)?;
                (out.text_token, out.audio, out.text_logits, out.extra_heads)
            }
        };
        self.offset += 1;
        let pos = self.offset % ct;
        self.cache[0][pos] = text_token as i64;
        for (k, &a) in audio.iter().enumerate() {
            self.cache[k + 1][pos] = a as i64;
        }
        let tokens = (self.offset > self.max_delay).then(|| {
            (0..=cfg.dep_q)
                .map(|k| self.cache[k][(self.offset - self.max_delay + cfg.delays[k]) % ct])
                .collect()
        });
        Ok(GenStep {
            tokens,
            text_token,
            text_logits,
            extra_heads,
        })
    }
}
