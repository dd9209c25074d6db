//! The language model's part of a Kyutai `config.json`: the keyword arguments of the
//! reference's `LMModel` (`moshi.models.lm`). A key left out takes that constructor's
//! default; keys for the depformer are prefixed `depformer_` and otherwise inherit the
//! main transformer's.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::models::transformer::TransformerSpec;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct LmConfig {
    /// Delay of each stream in steps: text first, then the audio codebooks.
    pub delays: Vec<usize>,
    /// Audio codebooks in the model's input (its own plus the user's).
    pub n_q: usize,
    /// Audio codebooks it generates with the depformer (0: speech-to-text).
    pub dep_q: usize,
    /// Entries per audio codebook.
    pub card: usize,
    pub text_card: usize,
    pub text_card_out: Option<usize>,
    /// Published as `demux_second_stream` (the TTS); the reference renames it on load.
    #[serde(alias = "demux_second_stream")]
    pub demux_second_text_stream: bool,
    pub dim: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub hidden_scale: f64,
    pub norm: String,
    pub norm_emb: bool,
    pub bias_proj: bool,
    pub existing_text_padding_id: u32,
    pub existing_text_end_padding_id: u32,
    pub extra_heads_num_heads: usize,
    pub extra_heads_dim: usize,
    pub context: Option<usize>,
    pub causal: bool,
    pub layer_scale: Option<f64>,
    pub gating: String,
    pub positional_embedding: String,
    pub max_period: f64,
    pub kv_repeat: usize,
    pub cross_attention: bool,
    pub depformer_dim: usize,
    pub depformer_dim_feedforward: Option<usize>,
    pub depformer_num_heads: Option<usize>,
    pub depformer_num_layers: Option<usize>,
    pub depformer_multi_linear: bool,
    pub depformer_weights_per_step: bool,
    pub depformer_weights_per_step_schedule: Option<Vec<usize>>,
    pub depformer_low_rank_embeddings: Option<usize>,
    pub depformer_pos_emb: String,
    pub depformer_norm: Option<String>,
    pub depformer_layer_scale: Option<f64>,
    pub depformer_gating: Option<String>,
    pub depformer_max_period: Option<f64>,
    pub conditioners: Option<serde_json::Value>,
    pub fuser: Option<serde_json::Value>,
    /// Every other key of config.json: the file names and per-use sections that
    /// `ModelDir` reads, and whatever [`Self::validate`] must judge.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Upper bounds on a config's sizes (see `LmConfig::check_ranges`).
const MAX_DIM: usize = 1 << 16;
const MAX_LAYERS: usize = 1024;
const MAX_CODEBOOKS: usize = 256;
const MAX_VOCAB: usize = 1 << 20;
/// Steps of attention context: about 3.6 hours at 12.5 Hz.
const MAX_CONTEXT: usize = 1 << 17;
/// Stream delays: 10 minutes at 12.5 Hz.
const MAX_DELAY_STEPS: usize = 7500;

/// Keys of config.json that name files or describe how the model is used; the reference's
/// `CheckpointInfo` takes them out before building the model, and so does Parley.
const METADATA_KEYS: &[&str] = &[
    "moshi_name",
    "mimi_name",
    "mimi_config_name",
    "tokenizer_name",
    "lora_name",
    "model_type",
    "model_id",
    "lm_gen_config",
    "stt_config",
    "tts_config",
    "text_padding_token_id",
];

/// Reference arguments that never change what inference computes: training switches and
/// deprecated keys (`depformer_causal` is dropped by the loader, `depformer_context` is
/// overridden by it).
const HARMLESS_KEYS: &[&str] = &[
    "gradient_checkpointing",
    "depformer_causal",
    "depformer_context",
    "betas",
    "depformer_betas",
    "lora_rank",
    "lora_scaling",
];

/// Reference arguments that change the architecture and that Parley does not implement:
/// accepted at the value that leaves it unchanged, an error otherwise.
fn neutral_value(key: &str) -> Option<Value> {
    Some(match key.strip_prefix("depformer_").unwrap_or(key) {
        "quantize" | "lora" | "skip_self_attn" => Value::Bool(false),
        "positional_scale" => Value::from(1.0),
        "kv_repeat" => Value::from(1),
        _ => return None,
    })
}

impl Default for LmConfig {
    /// The reference constructor's defaults (`LMModel.__init__`).
    fn default() -> Self {
        Self {
            delays: vec![0],
            n_q: 8,
            dep_q: 8,
            card: 1024,
            text_card: 32000,
            text_card_out: None,
            demux_second_text_stream: false,
            dim: 128,
            num_heads: 8,
            num_layers: 0,
            hidden_scale: 4.0,
            norm: "layer_norm".into(),
            norm_emb: false,
            bias_proj: false,
            existing_text_padding_id: 3,
            existing_text_end_padding_id: 0,
            extra_heads_num_heads: 0,
            extra_heads_dim: 6,
            context: None,
            causal: true,
            layer_scale: None,
            gating: "none".into(),
            positional_embedding: "sin".into(),
            max_period: 10_000.0,
            kv_repeat: 1,
            cross_attention: false,
            depformer_dim: 256,
            depformer_dim_feedforward: None,
            depformer_num_heads: None,
            depformer_num_layers: None,
            depformer_multi_linear: false,
            depformer_weights_per_step: false,
            depformer_weights_per_step_schedule: None,
            depformer_low_rank_embeddings: None,
            depformer_pos_emb: "sin".into(),
            depformer_norm: None,
            depformer_layer_scale: None,
            depformer_gating: None,
            depformer_max_period: None,
            conditioners: None,
            fuser: None,
            other: BTreeMap::new(),
        }
    }
}

/// Published models whose architecture Parley knows without their config.json (for
/// benchmarks with random weights).
pub const PRESETS: &[&str] = &["stt-1b-en_fr", "stt-2.6b-en", "moshi-7b", "tts-1.6b-en_fr"];

impl LmConfig {
    /// The architecture of a published model, as its config.json gives it:
    /// `stt-1b-en_fr` (kyutai/stt-1b-en_fr-candle: the extra heads included),
    /// `stt-2.6b-en` (kyutai/stt-2.6b-en) or `moshi-7b` (kyutai/moshiko, the reference
    /// loader's default `_lm_kwargs`). `tests/published_layouts.rs` holds each to the
    /// published config and tensor layout.
    pub fn preset(name: &str) -> Option<Self> {
        let base = Self {
            norm: "rms_norm_f32".into(),
            gating: "silu".into(),
            positional_embedding: "rope".into(),
            card: 2048,
            existing_text_padding_id: 3,
            ..Self::default()
        };
        match name {
            // hidden_scale 4.125: a gated width of 2 * 4.125 * 2048 / 3 = 5632 (the
            // reference's rule, see `gated_hidden`).
            "stt-1b-en_fr" => Some(Self {
                dim: 2048,
                num_heads: 16,
                num_layers: 16,
                hidden_scale: 4.125,
                context: Some(750),
                max_period: 100_000.0,
                text_card: 8000,
                n_q: 32,
                dep_q: 0,
                delays: vec![0; 33],
                extra_heads_num_heads: 4,
                extra_heads_dim: 6,
                ..base
            }),
            "stt-2.6b-en" => Some(Self {
                dim: 2048,
                num_heads: 32,
                num_layers: 48,
                hidden_scale: 4.125,
                context: Some(375),
                max_period: 100_000.0,
                text_card: 4000,
                n_q: 32,
                dep_q: 0,
                delays: vec![0; 33],
                ..base
            }),
            "moshi-7b" => Some(Self {
                dim: 4096,
                num_heads: 32,
                num_layers: 32,
                hidden_scale: 4.125,
                context: Some(3000),
                max_period: 10_000.0,
                text_card: 32000,
                n_q: 16,
                dep_q: 8,
                delays: vec![0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
                depformer_dim: 1024,
                depformer_dim_feedforward: Some(4224),
                depformer_num_heads: Some(16),
                depformer_num_layers: Some(6),
                depformer_multi_linear: true,
                depformer_weights_per_step: true,
                depformer_pos_emb: "none".into(),
                depformer_gating: Some("silu".into()),
                ..base
            }),
            // kyutai/tts-1.6b-en_fr's config.json.
            "tts-1.6b-en_fr" => {
                let mut other = BTreeMap::new();
                other.insert("model_type".into(), Value::from("tts"));
                other.insert(
                    "tts_config".into(),
                    serde_json::json!({"audio_delay": 1.28, "second_stream_ahead": 2}),
                );
                Some(Self {
                    dim: 2048,
                    num_heads: 16,
                    num_layers: 16,
                    hidden_scale: 4.125,
                    context: Some(500),
                    max_period: 10_000.0,
                    text_card: 8000,
                    n_q: 32,
                    dep_q: 32,
                    delays: std::iter::once(0)
                        .chain(std::iter::once(0))
                        .chain([2; 31])
                        .collect(),
                    depformer_dim: 1024,
                    depformer_dim_feedforward: Some(3072),
                    depformer_num_heads: Some(16),
                    depformer_num_layers: Some(4),
                    depformer_multi_linear: true,
                    depformer_weights_per_step: true,
                    depformer_weights_per_step_schedule: Some(
                        (0..8).chain([8; 8]).chain([9; 8]).chain([10; 8]).collect(),
                    ),
                    depformer_low_rank_embeddings: Some(128),
                    depformer_pos_emb: "none".into(),
                    demux_second_text_stream: true,
                    cross_attention: true,
                    conditioners: Some(serde_json::json!({
                        "speaker_wavs": {"type": "tensor", "tensor": {"dim": 512}},
                        "cfg": {"type": "lut", "lut": {"n_bins": 7, "dim": 16, "tokenizer": "noop",
                            "possible_values": ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"]}},
                        "control": {"type": "lut", "lut": {"dim": 2048, "n_bins": 1, "tokenizer": "noop",
                            "possible_values": ["ok"]}}
                    })),
                    fuser: Some(serde_json::json!({
                        "cross_attention_pos_emb": true, "cross_attention_pos_emb_scale": 1,
                        "sum": ["control", "cfg"], "prepend": [], "cross": ["speaker_wavs"]
                    })),
                    other,
                    ..base
                })
            }
            _ => None,
        }
    }

    /// Reads the LM part of a model's `config.json` and checks that it can run here.
    /// A text-to-speech model's config is checked as one (`validate_tts`) when its
    /// `model_type` says `tts`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let cfg: Self = crate::models::read_json_config(path)?;
        if cfg.is_tts() {
            cfg.validate_tts()
        } else {
            cfg.validate()
        }
        .map_err(|r| Error::config(path, r))?;
        Ok(cfg)
    }

    /// `model_type: "tts"` (what Kyutai's TTS config.json says).
    pub fn is_tts(&self) -> bool {
        self.other.get("model_type").and_then(Value::as_str) == Some("tts")
    }

    /// Streams in total: the text stream and `n_q` audio codebooks.
    pub fn num_codebooks(&self) -> usize {
        self.n_q + 1
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        self.validate_as(false)
    }

    /// Like [`Self::validate`], for a text-to-speech model: cross-attention and the
    /// conditioners are then expected ([`crate::models::tts`] reads them).
    pub fn validate_tts(&self) -> std::result::Result<(), String> {
        if !self.cross_attention || self.conditioners.is_none() || self.dep_q == 0 {
            return Err(
                "not a text-to-speech model (it needs cross_attention, conditioners and a \
                 depformer)"
                    .into(),
            );
        }
        self.validate_as(true)
    }

    fn validate_as(&self, tts: bool) -> std::result::Result<(), String> {
        let check = |ok: bool, msg: &str| if ok { Ok(()) } else { Err(msg.to_string()) };
        check(
            self.num_layers > 0,
            "num_layers is 0 or missing; expected at least 1 (a config.json without it describes no language model)",
        )?;
        check(
            self.delays.len() == self.num_codebooks(),
            &format!(
                "delays has {} entries; n_q + 1 = {} expected",
                self.delays.len(),
                self.num_codebooks()
            ),
        )?;
        check(self.dep_q <= self.n_q, "dep_q must not exceed n_q")?;
        self.check_ranges()?;
        check(self.causal, "causal must be true")?;
        check(
            self.kv_repeat == 1,
            "kv_repeat other than 1 is not supported yet",
        )?;
        check(
            tts || !self.cross_attention,
            "cross-attention models (TTS) are not supported here: use `parley tts`",
        )?;
        check(
            tts || (self
                .conditioners
                .as_ref()
                .is_none_or(|c| c.as_object().is_none_or(|o| o.is_empty()))
                && self.fuser.is_none()),
            "conditioned models (TTS) are not supported here: use `parley tts`",
        )?;
        check(!self.norm_emb, "norm_emb is not supported")?;
        check(
            self.context.is_some(),
            "context must be set: streaming needs a bounded attention window",
        )?;
        // Without a depformer (dep_q 0, the STT models) the reference builds none, so
        // its keys describe nothing and are not judged.
        if self.dep_q > 0 {
            if let Some(s) = &self.depformer_weights_per_step_schedule {
                check(
                    self.depformer_weights_per_step
                        && s.len() == self.dep_q
                        && s.iter().all(|&k| k < self.dep_q),
                    "depformer_weights_per_step_schedule needs depformer_weights_per_step and \
                     one weight set below dep_q for each of the dep_q steps",
                )?;
            }
            check(
                self.depformer_low_rank_embeddings
                    .is_none_or(|r| (1..=MAX_DIM).contains(&r)),
                "depformer_low_rank_embeddings must be between 1 and 65536",
            )?;
            check(
                self.depformer_norm.is_none(),
                "depformer_norm is not supported yet",
            )?;
            check(
                self.depformer_num_heads.is_some(),
                "depformer_num_heads must be set when dep_q > 0",
            )?;
        }
        self.check_other_keys()
    }

    /// Sizes within sense before anything is allocated from them: a config that claims a
    /// context of 2^40 steps or a million layers is an error naming the field, not an
    /// allocation failure. The bounds are far above every published model (the largest:
    /// Moshi 7B, dim 4096, 32 layers, context 3000, text_card 32000, delays of 2).
    fn check_ranges(&self) -> std::result::Result<(), String> {
        let within = |name: &str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} is {v}; expected {lo} to {hi}"))
            }
        };
        within("dim", self.dim, 1, MAX_DIM)?;
        within("num_heads", self.num_heads, 1, self.dim)?;
        if !self.dim.is_multiple_of(self.num_heads) {
            return Err(format!(
                "dim {} is not a multiple of num_heads {}",
                self.dim, self.num_heads
            ));
        }
        within("num_layers", self.num_layers, 1, MAX_LAYERS)?;
        within("n_q", self.n_q, 0, MAX_CODEBOOKS)?;
        within("card", self.card, 1, MAX_VOCAB)?;
        within("text_card", self.text_card, 1, MAX_VOCAB)?;
        within("context", self.context.unwrap_or(1), 1, MAX_CONTEXT)?;
        within(
            "existing_text_padding_id",
            self.existing_text_padding_id as usize,
            0,
            self.text_card - 1,
        )?;
        for (k, &d) in self.delays.iter().enumerate() {
            within(&format!("delays[{k}]"), d, 0, MAX_DELAY_STEPS)?;
        }
        if !(self.hidden_scale.is_finite() && self.hidden_scale > 0.0 && self.hidden_scale <= 64.0)
        {
            return Err(format!(
                "hidden_scale is {}; expected a number above 0 and at most 64",
                self.hidden_scale
            ));
        }
        if !(self.max_period.is_finite() && self.max_period >= 1.0) {
            return Err(format!(
                "max_period is {}; expected a number of at least 1",
                self.max_period
            ));
        }
        if self.dep_q > 0 {
            within("depformer_dim", self.depformer_dim, 1, MAX_DIM)?;
            within(
                "depformer_num_layers",
                self.depformer_num_layers.unwrap_or(self.num_layers),
                1,
                MAX_LAYERS,
            )?;
        }
        Ok(())
    }

    /// Keys that are not fields: metadata and training switches pass; a reference
    /// argument Parley does not implement passes only at its neutral value; anything else
    /// is an error naming it, as the reference (which hands unknown keys to its
    /// transformer's constructor) would fail on it too.
    fn check_other_keys(&self) -> std::result::Result<(), String> {
        for (key, value) in &self.other {
            if METADATA_KEYS.contains(&key.as_str()) || HARMLESS_KEYS.contains(&key.as_str()) {
                continue;
            }
            if self.dep_q == 0 && key.starts_with("depformer_") {
                continue;
            }
            match neutral_value(key) {
                Some(neutral) if numbers_equal(value, &neutral) || value.is_null() => {}
                Some(neutral) => {
                    return Err(format!(
                        "`{key}`: {value} changes the architecture in a way Parley does not \
                         implement (supported: {neutral})"
                    ))
                }
                None => {
                    return Err(format!(
                        "unknown key `{key}` (value {value}): not an argument of the \
                         reference's LMModel that Parley knows, so it may change the \
                         architecture"
                    ))
                }
            }
        }
        Ok(())
    }

    /// The main (temporal) transformer.
    pub fn transformer_spec(&self) -> TransformerSpec {
        TransformerSpec {
            d_model: self.dim,
            num_heads: self.num_heads,
            num_layers: self.num_layers,
            dim_feedforward: (self.hidden_scale * self.dim as f64) as usize,
            norm: self.norm.clone(),
            gating: self.gating.clone(),
            layer_scale: self.layer_scale.is_some(),
            positional_embedding: self.positional_embedding.clone(),
            positional_scale: 1.0,
            max_period: self.max_period,
            context: self.context,
            weights_per_step: 0,
            weights_schedule: None,
            cross_attention: self.cross_attention,
        }
    }

    /// The depformer: the main transformer's settings overridden by `depformer_*`.
    pub fn depformer_spec(&self) -> TransformerSpec {
        TransformerSpec {
            d_model: self.depformer_dim,
            num_heads: self.depformer_num_heads.unwrap_or(self.num_heads),
            num_layers: self.depformer_num_layers.unwrap_or(self.num_layers),
            dim_feedforward: self
                .depformer_dim_feedforward
                .unwrap_or((self.hidden_scale * self.depformer_dim as f64) as usize),
            norm: self.norm.clone(),
            gating: self
                .depformer_gating
                .clone()
                .unwrap_or_else(|| self.gating.clone()),
            layer_scale: self.depformer_layer_scale.or(self.layer_scale).is_some(),
            positional_embedding: self.depformer_pos_emb.clone(),
            positional_scale: 1.0,
            max_period: self.depformer_max_period.unwrap_or(self.max_period),
            context: None,
            weights_per_step: if self.depformer_weights_per_step {
                self.dep_q
            } else {
                0
            },
            weights_schedule: self.depformer_weights_per_step_schedule.clone(),
            cross_attention: false,
        }
    }
}

/// JSON values equal as numbers where both are numbers (`1` and `1.0`), else equal.
fn numbers_equal(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> std::result::Result<LmConfig, String> {
        let cfg: LmConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    const BASE: &str = r#""num_layers": 1, "n_q": 1, "dep_q": 0, "delays": [0, 0], "context": 4"#;

    #[test]
    fn published_key_names_and_unknown_keys() {
        // The TTS's published name for the second text stream is read; the TTS itself
        // (cross-attention) is refused by name.
        let cfg = parse(&format!(r#"{{{BASE}, "demux_second_stream": true}}"#)).expect("demux");
        assert!(cfg.demux_second_text_stream);
        let err = parse(&format!(r#"{{{BASE}, "cross_attention": true}}"#)).expect_err("tts");
        assert!(err.contains("cross-attention"), "{err}");
        // Metadata, training switches and neutral values pass.
        let cfg = parse(&format!(
            r#"{{{BASE}, "model_id": {{"sig": "x"}}, "mimi_name": "m", "gradient_checkpointing": true,
                "quantize": false, "positional_scale": 1, "stt_config": {{}}}}"#
        ))
        .expect("harmless keys");
        assert_eq!(cfg.num_layers, 1);
        // An architecture change Parley lacks, and an unknown key, are named.
        let err = parse(&format!(r#"{{{BASE}, "skip_self_attn": true}}"#)).expect_err("skip");
        assert!(err.contains("skip_self_attn"), "{err}");
        let err = parse(&format!(r#"{{{BASE}, "qk_norm": true}}"#)).expect_err("unknown");
        assert!(err.contains("unknown key `qk_norm`"), "{err}");
    }

    #[test]
    fn sizes_out_of_sense_are_named_before_anything_is_allocated() {
        for (key, value) in [
            ("context", "1099511627776"),
            ("context", "0"),
            ("num_layers", "1000000"),
            ("max_period", "0"),
            ("hidden_scale", "-1"),
            ("dim", "0"),
        ] {
            let mut json: serde_json::Value =
                serde_json::from_str(&format!("{{{BASE}}}")).expect("base");
            json[key] = serde_json::from_str(value).expect("value");
            let err = match serde_json::from_value::<LmConfig>(json) {
                Ok(cfg) => cfg.validate().expect_err(key),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(key), "{key} = {value}: {err}");
        }
        let err = parse(
            r#"{"num_layers": 1, "n_q": 1, "dep_q": 0, "delays": [0, 100000], "context": 4}"#,
        )
        .expect_err("delay");
        assert!(err.contains("delays[1]"), "{err}");
    }

    #[test]
    fn depformer_keys_are_ignored_without_a_depformer() {
        let with = |dep_q: usize| {
            let delays = ["0"; 3].join(", ");
            parse(&format!(
                r#"{{"num_layers": 1, "n_q": 2, "dep_q": {dep_q}, "delays": [{delays}], "context": 4,
                    "depformer_num_heads": 2, "depformer_low_rank_embeddings": 8,
                    "depformer_weights_per_step_schedule": [0, 0], "depformer_new_thing": 3}}"#
            ))
        };
        with(0).expect("no depformer: its keys describe nothing");
        let err = with(1).expect_err("depformer");
        assert!(err.contains("depformer_"), "{err}");
    }
}
