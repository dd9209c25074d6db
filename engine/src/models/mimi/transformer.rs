//! Mimi's encoder and decoder transformers (the reference's `ProjectedTransformer`): the
//! shared [`StreamingTransformer`] (LayerNorm, RoPE, GELU MLP, layer scale, a causal
//! context window) between optional input and output projections, over time-major rows.

use super::config::TransformerConfig;
use super::conv::Seq;
use crate::compute::cpu::{Matrix, WeightPrecision};
use crate::models::transformer::{StreamingTransformer, TransformerSpec};
use crate::models::weights::Weights;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct ProjectedTransformer {
    input_proj: Option<Matrix>,
    output_proj: Option<Matrix>,
    transformer: StreamingTransformer,
}

impl ProjectedTransformer {
    /// Loads `{prefix}.transformer.layers.{i}.…` and the optional projections.
    pub fn load(w: &Weights, cfg: &TransformerConfig) -> Result<Self> {
        let d = cfg.d_model;
        if cfg.context.is_none() {
            return Err(Error::config(
                w.path(),
                "transformer.context must be set: streaming needs a bounded attention window",
            ));
        }
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
        let spec = TransformerSpec {
            d_model: d,
            num_heads: cfg.num_heads,
            num_layers: cfg.num_layers,
            dim_feedforward: cfg.dim_feedforward,
            norm: cfg.norm.clone(),
            gating: cfg.gating.clone(),
            layer_scale: cfg.layer_scale.is_some(),
            positional_embedding: cfg.positional_embedding.clone(),
            positional_scale: cfg.positional_scale,
            max_period: cfg.max_period,
            context: cfg.context,
            weights_per_step: 0,
            weights_schedule: None,
            cross_attention: false,
        };
        Ok(Self {
            input_proj,
            output_proj,
            transformer: StreamingTransformer::load(&w.pp("transformer"), &spec)?,
        })
    }

    /// Streaming step over `x.t()` steps; returns as many rows of the output dimension.
    pub fn step(&mut self, x: &Seq) -> Result<Seq> {
        self.step_part(x, 0)
    }

    /// [`Self::step`] on the first part of a call with `ahead` steps still to come
    /// ([`StreamingTransformer::step_part`]).
    pub fn step_part(&mut self, x: &Seq, ahead: usize) -> Result<Seq> {
        let t = x.t();
        let rows = match &self.input_proj {
            Some(w) => w.matmul_t(&x.data, t)?,
            None => x.data.clone(),
        };
        let y = self.transformer.step_part(&rows, t, ahead)?;
        Ok(match &self.output_proj {
            Some(w) => Seq::new(w.rows(), w.matmul_t(&y, t)?),
            None => Seq::new(self.transformer.d_model(), y),
        })
    }

    /// The transformer, where it has no input or output projection (Mimi's published
    /// configuration; the GPU codec runs only that).
    pub(super) fn unprojected(&self) -> Option<&StreamingTransformer> {
        (self.input_proj.is_none() && self.output_proj.is_none()).then_some(&self.transformer)
    }

    /// See [`StreamingTransformer::set_window`].
    pub fn set_window(&mut self, exact: bool, max_steps_per_call: usize) {
        self.transformer.set_window(exact, max_steps_per_call);
    }

    pub fn set_precision(&mut self, precision: WeightPrecision) -> Result<()> {
        for m in [&mut self.input_proj, &mut self.output_proj]
            .into_iter()
            .flatten()
        {
            m.set_precision(precision)?;
        }
        self.transformer.set_precision(precision)
    }

    pub fn reset(&mut self) {
        self.transformer.reset();
    }

    pub fn state_bytes(&self) -> usize {
        self.transformer.state_bytes()
    }
}
