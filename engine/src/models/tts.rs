//! Kyutai's delayed-streams text-to-speech model (`kyutai/tts-1.6b-en_fr`; the reference's
//! `moshi.models.tts` and `moshi.conditioners`): the delayed-streams LM run the other way,
//! conditioned on a voice through cross-attention and on `cfg` and `control` values summed
//! into every step's input.
//!
//! This module holds the model and its conditioning. What is here so far: the voice files
//! ([`Voice`]), the conditioners ([`Conditioners`]: the voice latents projected, unused
//! speaker slots filled with the learnt padding, a sinusoidal position embedding added;
//! the `cfg` and `control` lookup tables projected and summed) and the model
//! ([`TtsModel`]) whose steps match the reference's (`tests/tts_reference.rs`). The text
//! state machine, streaming input, the voices registry and `parley tts` are issue 13's
//! remaining work.

use std::path::Path;

use serde_json::Value;

use crate::compute::cpu::{Matrix, WeightPrecision};
use crate::models::lm::{LmConfig, LmModel};
use crate::models::transformer::add_sin_embedding;
use crate::models::weights::Weights;
use crate::{Error, Result};

/// Speaker slots of the cross-attention conditioning (the reference's `max_speakers`).
pub const MAX_SPEAKERS: usize = 5;
/// A voice's latent: channels and frames (10 s at 12.5 Hz), as `kyutai/tts-voices` has it.
pub const VOICE_DIM: usize = 512;
pub const VOICE_FRAMES: usize = 125;
/// The position embedding of the conditioning (the fuser's `cross_attention_pos_emb`).
const POS_MAX_PERIOD: f32 = 10_000.0;

/// A voice: `speaker_wavs` f32 `[1, 512, 125]` from a `kyutai/tts-voices` file.
#[derive(Debug, Clone, PartialEq)]
pub struct Voice {
    /// `[VOICE_FRAMES][VOICE_DIM]`: one row per frame (the file's transpose).
    rows: Vec<f32>,
}

impl Voice {
    pub fn load(path: &Path) -> Result<Self> {
        let w = Weights::load(path)?;
        let t = w
            .get("speaker_wavs", &[1, VOICE_DIM, VOICE_FRAMES])
            .map_err(|e| {
                Error::InvalidInput(format!(
                    "{}: not a voice (a `speaker_wavs` tensor of [1, {VOICE_DIM}, \
                     {VOICE_FRAMES}] from kyutai/tts-voices expected): {e}",
                    path.display()
                ))
            })?;
        let rows: Vec<f32> = t.squeeze(0)?.t()?.contiguous()?.flatten_all()?.to_vec1()?;
        if rows.iter().any(|v| !v.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "{}: the voice has values that are not finite numbers",
                path.display()
            )));
        }
        Ok(Self { rows })
    }
}

/// A lookup-table conditioner (`cfg`, `control`): one of its `possible_values`, embedded
/// and projected to the model's width.
#[derive(Debug, Clone)]
struct Lut {
    values: Vec<String>,
    embed: Matrix,
    output_proj: Matrix,
}

impl Lut {
    fn load(w: &Weights, spec: &Value, dim: usize) -> Result<Self> {
        let lut = &spec["lut"];
        let n_bins = lut["n_bins"].as_u64().unwrap_or(0) as usize;
        let width = lut["dim"].as_u64().unwrap_or(0) as usize;
        let values: Vec<String> = lut["possible_values"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if n_bins == 0 || width == 0 || values.len() != n_bins {
            return Err(Error::config(
                w.path(),
                format!("a lookup-table conditioner needs n_bins, dim and n_bins possible_values: {spec}"),
            ));
        }
        // The padding of a missing condition: every condition is given here.
        w.skip("learnt_padding");
        Ok(Self {
            values,
            // One row per value and one for "none".
            embed: Matrix::with_precision(
                &w.get("embed.weight", &[n_bins + 1, width])?,
                WeightPrecision::F32,
            )?,
            output_proj: Matrix::with_precision(
                &w.get("output_proj.weight", &[dim, width])?,
                WeightPrecision::F32,
            )?,
        })
    }

    /// `value`'s projected embedding.
    fn forward(&self, value: &str, what: &str) -> Result<Vec<f32>> {
        let i = self.values.iter().position(|v| v == value).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{what} `{value}` is not one of {}",
                self.values.join(", ")
            ))
        })?;
        let mut row = vec![0f32; self.embed.cols()];
        self.embed.add_row_to(i, &mut row)?;
        self.output_proj.matmul_t(&row, 1)
    }
}

/// The TTS's conditioners and their fuser (`condition_provider` in the checkpoint).
#[derive(Debug, Clone)]
pub struct Conditioners {
    dim: usize,
    /// `[dim, VOICE_DIM]`.
    speaker_proj: Matrix,
    speaker_padding: Vec<f32>,
    cfg: Lut,
    control: Lut,
    pos_scale: f32,
}

impl Conditioners {
    /// `w`: the checkpoint at `condition_provider.conditioners`; `cfg`: the model's config.
    pub fn load(w: &Weights, cfg: &LmConfig) -> Result<Self> {
        let dim = cfg.dim;
        let conds = cfg.conditioners.clone().unwrap_or(Value::Null);
        let fuser = cfg.fuser.clone().unwrap_or(Value::Null);
        let names = |key: &str| -> Vec<String> {
            fuser[key]
                .as_array()
                .map(|v| {
                    v.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let (mut sum, cross) = (names("sum"), names("cross"));
        sum.sort();
        if sum != ["cfg", "control"]
            || cross != ["speaker_wavs"]
            || !names("prepend").is_empty()
            || conds["speaker_wavs"]["tensor"]["dim"].as_u64() != Some(VOICE_DIM as u64)
        {
            return Err(Error::config(
                w.path(),
                format!(
                    "conditioners Parley knows are `cfg` and `control` summed and \
                     `speaker_wavs` ({VOICE_DIM} channels) by cross-attention; this model \
                     has {conds} fused as {fuser}"
                ),
            ));
        }
        let pos_scale = if fuser["cross_attention_pos_emb"].as_bool() == Some(true) {
            fuser["cross_attention_pos_emb_scale"]
                .as_f64()
                .unwrap_or(1.0) as f32
        } else {
            0.0
        };
        let sp = w.pp("speaker_wavs");
        Ok(Self {
            dim,
            speaker_proj: Matrix::with_precision(
                &sp.get("output_proj.weight", &[dim, VOICE_DIM])?,
                WeightPrecision::F32,
            )?,
            speaker_padding: sp
                .get("learnt_padding", &[1, 1, dim])?
                .flatten_all()?
                .to_vec1()?,
            cfg: Lut::load(&w.pp("cfg"), &conds["cfg"], dim)?,
            control: Lut::load(&w.pp("control"), &conds["control"], dim)?,
            pos_scale,
        })
    }

    /// What the `sum` fuser adds to every step's input: `cfg` (for example "2.0", the
    /// distilled guidance value) and `control` ("ok").
    pub fn condition_sum(&self, cfg: &str, control: &str) -> Result<Vec<f32>> {
        let a = self.cfg.forward(cfg, "cfg")?;
        let b = self.control.forward(control, "control")?;
        Ok(a.iter().zip(&b).map(|(x, y)| x + y).collect())
    }

    /// The cross-attention conditioning of `voices` (1 to [`MAX_SPEAKERS`]):
    /// `MAX_SPEAKERS * VOICE_FRAMES` rows of `dim`, each voice's frames projected, the
    /// unused slots the learnt padding, plus the sinusoidal position embedding.
    pub fn cross_source(&self, voices: &[&Voice]) -> Result<(Vec<f32>, usize)> {
        if voices.is_empty() || voices.len() > MAX_SPEAKERS {
            return Err(Error::InvalidInput(format!(
                "{} voices: the model takes 1 to {MAX_SPEAKERS}",
                voices.len()
            )));
        }
        let d = self.dim;
        let n = MAX_SPEAKERS * VOICE_FRAMES;
        let mut out = Vec::with_capacity(n * d);
        for slot in 0..MAX_SPEAKERS {
            match voices.get(slot) {
                Some(v) => out.extend(self.speaker_proj.matmul_t(&v.rows, VOICE_FRAMES)?),
                None => {
                    for _ in 0..VOICE_FRAMES {
                        out.extend_from_slice(&self.speaker_padding);
                    }
                }
            }
        }
        if self.pos_scale != 0.0 {
            add_sin_embedding(&mut out, d, 0, POS_MAX_PERIOD, self.pos_scale);
        }
        Ok((out, n))
    }
}

/// The TTS's own settings (`tts_config` in config.json).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TtsConfig {
    /// Seconds the audio comes after its text (1.28: 16 steps).
    pub audio_delay: f64,
    /// How many words ahead the second text stream runs (2).
    pub second_stream_ahead: usize,
}

/// The model with its conditioners.
#[derive(Debug, Clone)]
pub struct TtsModel {
    pub lm: LmModel,
    pub conditioners: Conditioners,
    pub tts: TtsConfig,
}

impl TtsModel {
    /// Loads a checkpoint laid out as `kyutai/tts-1.6b-en_fr` is (`cfg` from its
    /// config.json), the large matrices in `precision`; the conditioners stay f32.
    pub fn load(weights: &Path, cfg: LmConfig, precision: WeightPrecision) -> Result<Self> {
        cfg.validate_tts().map_err(|r| Error::config(weights, r))?;
        let tts_json = cfg.other.get("tts_config").cloned().unwrap_or(Value::Null);
        let tts = TtsConfig {
            audio_delay: tts_json["audio_delay"].as_f64().unwrap_or(1.28),
            second_stream_ahead: tts_json["second_stream_ahead"].as_u64().unwrap_or(2) as usize,
        };
        if !(0.0..=60.0).contains(&tts.audio_delay) || tts.second_stream_ahead > 64 {
            return Err(Error::config(
                weights,
                format!("tts_config out of range: {tts_json}"),
            ));
        }
        let w = Weights::load(weights)?.with_precision(precision);
        // The conditioners first: the LM's loader checks that every tensor was used.
        let conditioners = Conditioners::load(&w.pp("condition_provider.conditioners"), &cfg)?;
        let lm = LmModel::from_weights(&w, cfg)?;
        Ok(Self {
            lm,
            conditioners,
            tts,
        })
    }

    /// Conditions the model on `voices` with guidance `cfg` (and `control` "ok") for the
    /// next utterance.
    pub fn condition(&mut self, voices: &[&Voice], cfg: &str) -> Result<()> {
        let (src, n) = self.conditioners.cross_source(voices)?;
        self.lm.set_cross_source(&src, n)?;
        self.lm
            .set_input_bias(Some(self.conditioners.condition_sum(cfg, "ok")?))
    }
}
