//! The language model's part of a Kyutai `config.json`: the keyword arguments of the
//! reference's `LMModel` (`moshi.models.lm`). A key left out takes that constructor's
//! default; keys for the depformer are prefixed `depformer_` and otherwise inherit the
//! main transformer's.

use std::path::Path;

use serde::Deserialize;

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
        }
    }
}

/// Published models whose architecture Parley knows without their config.json (for
/// benchmarks with random weights).
pub const PRESETS: &[&str] = &["stt-1b-en_fr", "moshi-7b"];

impl LmConfig {
    /// The architecture of a published model: `stt-1b-en_fr` (kyutai/stt-1b-en_fr, sizes
    /// as in Kyutai's published server config) or `moshi-7b` (kyutai/moshiko, the
    /// reference loader's default `_lm_kwargs`).
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
            "stt-1b-en_fr" => Some(Self {
                dim: 2048,
                num_heads: 16,
                num_layers: 16,
                hidden_scale: 4.0,
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
            _ => None,
        }
    }

    /// Reads the LM part of a model's `config.json` and checks that it can run here.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| Error::config(path, e))?;
        cfg.validate().map_err(|r| Error::config(path, r))?;
        Ok(cfg)
    }

    /// Streams in total: the text stream and `n_q` audio codebooks.
    pub fn num_codebooks(&self) -> usize {
        self.n_q + 1
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let check = |ok: bool, msg: &str| if ok { Ok(()) } else { Err(msg.to_string()) };
        check(self.num_layers > 0, "num_layers must be set")?;
        check(
            self.delays.len() == self.num_codebooks(),
            &format!(
                "delays has {} entries; n_q + 1 = {} expected",
                self.delays.len(),
                self.num_codebooks()
            ),
        )?;
        check(self.dep_q <= self.n_q, "dep_q must not exceed n_q")?;
        check(self.causal, "causal must be true")?;
        check(
            self.kv_repeat == 1,
            "kv_repeat other than 1 is not supported yet",
        )?;
        check(
            !self.cross_attention,
            "cross-attention models (TTS) are not supported yet",
        )?;
        check(
            self.conditioners
                .as_ref()
                .is_none_or(|c| c.as_object().is_none_or(|o| o.is_empty()))
                && self.fuser.is_none(),
            "conditioned models (TTS) are not supported yet",
        )?;
        check(
            !self.demux_second_text_stream,
            "demux_second_text_stream is not supported yet",
        )?;
        check(!self.norm_emb, "norm_emb is not supported")?;
        check(
            self.depformer_weights_per_step_schedule.is_none(),
            "depformer_weights_per_step_schedule is not supported yet",
        )?;
        check(
            self.depformer_low_rank_embeddings.is_none(),
            "depformer_low_rank_embeddings is not supported yet",
        )?;
        check(
            self.depformer_norm.is_none(),
            "depformer_norm is not supported yet",
        )?;
        check(
            self.context.is_some(),
            "context must be set: streaming needs a bounded attention window",
        )?;
        check(
            self.dep_q == 0 || self.depformer_num_heads.is_some(),
            "depformer_num_heads must be set when dep_q > 0",
        )?;
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
        }
    }
}
