//! Mimi's configuration, in the JSON form the official loader (`moshi.models.loaders.get_mimi`)
//! accepts as `mimi_config`: `{sample_rate, channels, frame_rate, seanet: {..},
//! quantizer: {..}, transformer: {..}}`, each section holding the keyword arguments of the
//! reference's `SEANetEncoder`, `SplitResidualVectorQuantizer` and `ProjectedTransformer`.
//!
//! A key left out takes the reference constructor's default (not Mimi's value), exactly as
//! the official loader would. [`MimiConfig::default`] is the published Mimi
//! (`loaders._mimi_config`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MimiConfig {
    pub sample_rate: u32,
    pub channels: usize,
    /// Frames per second of the codes (12.5 Hz).
    pub frame_rate: f64,
    pub seanet: SeanetConfig,
    pub quantizer: QuantizerConfig,
    pub transformer: TransformerConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SeanetConfig {
    pub channels: usize,
    /// Latent dimension between the SEANet and the transformer.
    pub dimension: usize,
    pub n_filters: usize,
    pub n_residual_layers: usize,
    /// Decoder order; the encoder uses them reversed.
    pub ratios: Vec<usize>,
    pub activation: String,
    pub activation_params: ActivationParams,
    pub final_activation: Option<String>,
    pub norm: String,
    pub kernel_size: usize,
    pub last_kernel_size: usize,
    pub residual_kernel_size: usize,
    pub dilation_base: usize,
    pub causal: bool,
    pub pad_mode: String,
    pub true_skip: bool,
    pub compress: usize,
    pub disable_norm_outer_blocks: usize,
    pub trim_right_ratio: f64,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ActivationParams {
    pub alpha: f64,
}

impl Default for ActivationParams {
    fn default() -> Self {
        Self { alpha: 1.0 }
    }
}

impl Default for SeanetConfig {
    /// The reference constructor's defaults (`SEANetEncoder.__init__`).
    fn default() -> Self {
        Self {
            channels: 1,
            dimension: 128,
            n_filters: 32,
            n_residual_layers: 3,
            ratios: vec![8, 5, 4, 2],
            activation: "ELU".into(),
            activation_params: ActivationParams::default(),
            final_activation: None,
            norm: "none".into(),
            kernel_size: 7,
            last_kernel_size: 7,
            residual_kernel_size: 3,
            dilation_base: 2,
            causal: false,
            pad_mode: "reflect".into(),
            true_skip: true,
            compress: 2,
            disable_norm_outer_blocks: 0,
            trim_right_ratio: 1.0,
            unknown: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct QuantizerConfig {
    /// Codebook dimension.
    pub dimension: usize,
    /// Total number of codebooks in the checkpoint (semantic + acoustic).
    pub n_q: usize,
    pub n_q_semantic: usize,
    /// Entries per codebook.
    pub bins: usize,
    pub input_dimension: Option<usize>,
    pub output_dimension: Option<usize>,
    // Training-only arguments, accepted and unused at inference.
    pub q_dropout: Option<bool>,
    pub no_quantization_rate: Option<f64>,
    pub decay: Option<f64>,
    pub threshold_usage_ratio: Option<f64>,
    pub replaced_usage_ratio: Option<f64>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

impl Default for QuantizerConfig {
    fn default() -> Self {
        Self {
            dimension: 128,
            n_q: 8,
            n_q_semantic: 1,
            bins: 1024,
            input_dimension: None,
            output_dimension: None,
            q_dropout: None,
            no_quantization_rate: None,
            decay: None,
            threshold_usage_ratio: None,
            replaced_usage_ratio: None,
            unknown: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct TransformerConfig {
    pub d_model: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub dim_feedforward: usize,
    pub causal: bool,
    /// Attention span in steps of the transformer's own rate (25 Hz for Mimi).
    pub context: Option<usize>,
    pub positional_embedding: String,
    pub max_period: f64,
    pub positional_scale: f64,
    pub norm: String,
    pub layer_scale: Option<f64>,
    pub gating: String,
    pub kv_repeat: usize,
    pub conv_layout: bool,
    pub input_dimension: usize,
    pub output_dimensions: Vec<usize>,
    // Training-only arguments, accepted and unused at inference.
    pub checkpointing: Option<bool>,
    pub quantize: Option<bool>,
    pub betas: Option<serde_json::Value>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        Self {
            d_model: 0,
            num_heads: 0,
            num_layers: 0,
            dim_feedforward: 2048,
            causal: false,
            context: None,
            positional_embedding: "sin".into(),
            max_period: 10_000.0,
            positional_scale: 1.0,
            norm: "layer_norm".into(),
            layer_scale: None,
            gating: "none".into(),
            kv_repeat: 1,
            conv_layout: false,
            input_dimension: 0,
            output_dimensions: vec![],
            checkpointing: None,
            quantize: None,
            betas: None,
            unknown: BTreeMap::new(),
        }
    }
}

impl Default for MimiConfig {
    /// The published Mimi (`kyutai/mimi`, `tokenizer-e351c8d8-checkpoint125.safetensors`).
    fn default() -> Self {
        Self {
            sample_rate: 24_000,
            channels: 1,
            frame_rate: 12.5,
            seanet: SeanetConfig {
                dimension: 512,
                n_filters: 64,
                n_residual_layers: 1,
                ratios: vec![8, 6, 5, 4],
                last_kernel_size: 3,
                causal: true,
                pad_mode: "constant".into(),
                ..SeanetConfig::default()
            },
            quantizer: QuantizerConfig {
                dimension: 256,
                n_q: 32,
                bins: 2048,
                input_dimension: Some(512),
                output_dimension: Some(512),
                ..QuantizerConfig::default()
            },
            transformer: TransformerConfig {
                d_model: 512,
                num_heads: 8,
                num_layers: 8,
                causal: true,
                layer_scale: Some(0.01),
                context: Some(250),
                conv_layout: true,
                positional_embedding: "rope".into(),
                dim_feedforward: 2048,
                input_dimension: 512,
                output_dimensions: vec![512],
                ..TransformerConfig::default()
            },
        }
    }
}

impl MimiConfig {
    /// Reads and validates a Mimi config JSON.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let cfg: Self = crate::models::read_json_config(path)?;
        cfg.validate()
            .map_err(|reason| Error::config(path, reason))?;
        Ok(cfg)
    }

    /// Samples per code frame (1920 for Mimi).
    pub fn frame_size(&self) -> usize {
        (self.sample_rate as f64 / self.frame_rate) as usize
    }

    /// Samples per SEANet latent step (960 for Mimi).
    pub fn hop_length(&self) -> usize {
        self.seanet.ratios.iter().product()
    }

    /// Latent steps per code frame (2 for Mimi: 25 Hz -> 12.5 Hz).
    pub fn downsample_stride(&self) -> usize {
        self.frame_size() / self.hop_length()
    }

    /// Every size and rate within sense before anything is computed or allocated from it
    /// (a product of `ratios` that overflows, a context of 2^40 steps, a NaN rotary
    /// period): an error naming the field. The bounds are far above Kyutai's Mimi
    /// (24 kHz, 12.5 Hz, ratios [8, 6, 5, 4], 64 filters, dimension 512, 32 codebooks of
    /// 2048, 8 layers of d_model 512, context 250, max_period 10000).
    fn check_ranges(&self) -> std::result::Result<(), String> {
        let (s, q, t) = (&self.seanet, &self.quantizer, &self.transformer);
        let within = |name: &str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} is {v}; expected {lo} to {hi}"))
            }
        };
        within("sample_rate", self.sample_rate as usize, 1000, 384_000)?;
        if !(self.frame_rate.is_finite() && self.frame_rate >= 1.0 && self.frame_rate <= 1000.0) {
            return Err(format!(
                "frame_rate is {}; expected 1 to 1000 (Hz)",
                self.frame_rate
            ));
        }
        within("seanet.ratios' length", s.ratios.len(), 1, 16)?;
        for &r in &s.ratios {
            within("a seanet.ratios entry", r, 1, 64)?;
        }
        let hop = s
            .ratios
            .iter()
            .try_fold(1usize, |p, &r| p.checked_mul(r).filter(|&p| p <= 1 << 20));
        if hop.is_none() {
            return Err("seanet.ratios multiply to more than 2^20 samples".into());
        }
        within("seanet.dimension", s.dimension, 1, 8192)?;
        within("seanet.n_filters", s.n_filters, 1, 8192)?;
        within("seanet.n_residual_layers", s.n_residual_layers, 0, 16)?;
        within("seanet.compress", s.compress, 1, 16)?;
        within("seanet.dilation_base", s.dilation_base, 1, 16)?;
        within("seanet.kernel_size", s.kernel_size, 1, 64)?;
        within("seanet.last_kernel_size", s.last_kernel_size, 1, 64)?;
        within("seanet.residual_kernel_size", s.residual_kernel_size, 1, 64)?;
        // The widest residual convolution's history, (k - 1) x dilation_base^(layers - 1)
        // steps: what each of its streaming buffers holds (weights do not depend on it).
        let reach = s
            .dilation_base
            .checked_pow(s.n_residual_layers.saturating_sub(1) as u32)
            .and_then(|d| d.checked_mul(s.residual_kernel_size - 1))
            .filter(|&r| r <= 1 << 16);
        if reach.is_none() {
            return Err(format!(
                "seanet.dilation_base {} over {} residual layers with kernel {} reaches back more than 65536 steps",
                s.dilation_base, s.n_residual_layers, s.residual_kernel_size
            ));
        }
        // The widest convolution: n_filters doubled at each of the ratios' stages.
        if s.ratios.len() as u32 >= usize::BITS
            || s.n_filters
                .checked_shl(s.ratios.len() as u32)
                .is_none_or(|c| c > 1 << 16)
        {
            return Err(format!(
                "seanet.n_filters {} doubled over {} stages passes 65536 channels",
                s.n_filters,
                s.ratios.len()
            ));
        }
        within("quantizer.n_q", q.n_q, 1, 64)?;
        within("quantizer.n_q_semantic", q.n_q_semantic, 0, 64)?;
        within("quantizer.bins", q.bins, 1, 1 << 16)?;
        within("quantizer.dimension", q.dimension, 1, 8192)?;
        within("transformer.d_model", t.d_model, 1, 8192)?;
        within("transformer.num_heads", t.num_heads, 1, t.d_model)?;
        within("transformer.num_layers", t.num_layers, 0, 64)?;
        within("transformer.dim_feedforward", t.dim_feedforward, 1, 1 << 16)?;
        if let Some(c) = t.context {
            within("transformer.context", c, 1, 100_000)?;
        }
        if !(t.max_period.is_finite() && t.max_period > 1.0 && t.max_period <= 1e9) {
            return Err(format!(
                "transformer.max_period is {}; expected above 1 and at most 1e9",
                t.max_period
            ));
        }
        if !(t.positional_scale.is_finite()) {
            return Err("transformer.positional_scale must be a finite number".into());
        }
        if t.layer_scale.is_some_and(|l| !l.is_finite()) {
            return Err("transformer.layer_scale must be a finite number".into());
        }
        Ok(())
    }

    /// Checks that this is a model the engine can run, naming the first thing that is not.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let s = &self.seanet;
        let q = &self.quantizer;
        let t = &self.transformer;
        for (section, unknown) in [
            ("seanet", &s.unknown),
            ("quantizer", &q.unknown),
            ("transformer", &t.unknown),
        ] {
            if let Some(key) = unknown.keys().next() {
                return Err(format!("unsupported key `{section}.{key}`"));
            }
        }
        self.check_ranges()?;
        let check = |ok: bool, msg: &str| if ok { Ok(()) } else { Err(msg.to_string()) };
        check(
            self.channels == 1 && s.channels == 1,
            "only mono models (channels = 1) are supported",
        )?;
        check(
            s.causal,
            "seanet.causal must be true (streaming needs causal convolutions)",
        )?;
        check(
            s.pad_mode == "constant",
            "seanet.pad_mode must be \"constant\" (the reference asserts constant or replicate; Mimi uses constant)",
        )?;
        check(
            s.activation == "ELU",
            "seanet.activation: only \"ELU\" is supported",
        )?;
        check(
            s.final_activation.is_none(),
            "seanet.final_activation is not supported",
        )?;
        check(
            s.norm == "none",
            "seanet.norm must be \"none\" (published checkpoints have weight norm folded in)",
        )?;
        check(
            s.trim_right_ratio == 1.0,
            "seanet.trim_right_ratio must be 1.0",
        )?;
        check(
            !s.ratios.is_empty() && s.ratios.iter().all(|&r| r > 0),
            "seanet.ratios must be non-empty and positive",
        )?;
        check(
            s.n_filters > 0 && s.dimension > 0 && s.compress > 0,
            "seanet sizes must be positive",
        )?;
        check(
            s.kernel_size > 0 && s.last_kernel_size > 0 && s.residual_kernel_size > 0,
            "seanet kernel sizes must be positive",
        )?;
        let frame = self.sample_rate as f64 / self.frame_rate;
        check(
            frame.fract() == 0.0,
            "sample_rate / frame_rate must be a whole number of samples",
        )?;
        check(
            self.frame_size().is_multiple_of(self.hop_length()),
            "the frame size must be a multiple of the product of seanet.ratios",
        )?;
        check(
            q.n_q > q.n_q_semantic && q.n_q_semantic >= 1,
            "quantizer.n_q must exceed quantizer.n_q_semantic >= 1",
        )?;
        check(
            q.bins > 0 && q.dimension > 0,
            "quantizer sizes must be positive",
        )?;
        check(
            q.input_dimension.unwrap_or(q.dimension) == s.dimension
                && q.output_dimension.unwrap_or(q.dimension) == s.dimension,
            "quantizer input/output dimension must equal seanet.dimension",
        )?;
        check(t.causal, "transformer.causal must be true")?;
        check(
            t.d_model > 0 && t.num_heads > 0 && t.d_model.is_multiple_of(t.num_heads),
            "transformer.d_model must be a positive multiple of num_heads",
        )?;
        check(
            (t.d_model / t.num_heads).is_multiple_of(2),
            "transformer head dimension must be even",
        )?;
        check(
            t.input_dimension == s.dimension && t.output_dimensions == [s.dimension],
            "transformer input_dimension and output_dimensions must be [seanet.dimension]",
        )?;
        check(t.conv_layout, "transformer.conv_layout must be true")?;
        check(
            matches!(
                t.positional_embedding.as_str(),
                "rope" | "none" | "sin" | "sin_rope"
            ),
            "transformer.positional_embedding must be one of rope, sin, sin_rope, none",
        )?;
        check(
            matches!(
                t.norm.as_str(),
                "layer_norm" | "layer_norm_f32" | "rms_norm" | "rms_norm_f32"
            ),
            "transformer.norm must be one of layer_norm, layer_norm_f32, rms_norm, rms_norm_f32",
        )?;
        check(
            t.gating == "none",
            "transformer.gating: only \"none\" (GELU MLP) is supported in Mimi",
        )?;
        check(t.kv_repeat == 1, "transformer.kv_repeat must be 1")?;
        check(
            t.context.is_none_or(|c| c > 0),
            "transformer.context must be positive",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_published_mimi() {
        let c = MimiConfig::default();
        c.validate().expect("valid");
        assert_eq!(c.frame_size(), 1920);
        assert_eq!(c.hop_length(), 960);
        assert_eq!(c.downsample_stride(), 2);
    }

    #[test]
    fn json_with_missing_keys_takes_constructor_defaults() {
        let json = r#"{"sample_rate": 24000, "channels": 1, "frame_rate": 12.5,
            "seanet": {"causal": true, "pad_mode": "constant", "dimension": 64, "ratios": [8,6,5,4]},
            "quantizer": {"dimension": 16, "n_q": 4, "bins": 32, "input_dimension": 64, "output_dimension": 64},
            "transformer": {"d_model": 64, "num_heads": 2, "num_layers": 1, "causal": true,
                "conv_layout": true, "input_dimension": 64, "output_dimensions": [64], "positional_embedding": "rope"}}"#;
        let c: MimiConfig = serde_json::from_str(json).expect("parse");
        c.validate().expect("valid");
        assert_eq!(c.seanet.n_filters, 32);
        assert_eq!(c.seanet.n_residual_layers, 3);
        assert_eq!(c.transformer.dim_feedforward, 2048);
        assert_eq!(c.transformer.context, None);
    }

    #[test]
    fn unsupported_values_are_named() {
        let mut c = MimiConfig::default();
        c.seanet.unknown.insert("lstm".into(), serde_json::json!(2));
        assert!(c.validate().expect_err("unknown").contains("seanet.lstm"));
        let mut c = MimiConfig::default();
        c.transformer.causal = false;
        assert!(c
            .validate()
            .expect_err("causal")
            .contains("transformer.causal"));
    }

    /// Sizes out of sense are named before anything is computed from them (the published
    /// Mimi passes).
    #[test]
    fn sizes_out_of_sense_are_named() {
        MimiConfig::default()
            .validate()
            .expect("the published Mimi");
        type Change = fn(&mut MimiConfig);
        let cases: [(&str, Change); 4] = [
            ("ratios", |c| c.seanet.ratios = vec![64; 8]),
            ("max_period", |c| c.transformer.max_period = 0.0),
            ("reaches back", |c| {
                c.seanet.dilation_base = 16;
                c.seanet.n_residual_layers = 16;
            }),
            ("transformer.context", |c| {
                c.transformer.context = Some(1 << 40)
            }),
        ];
        for (what, change) in cases {
            let mut c = MimiConfig::default();
            change(&mut c);
            let err = c.validate().expect_err(what);
            assert!(err.contains(what), "{what}: {err}");
        }
    }
}
