//! Kyutai's delayed-streams language model (the reference's `LMModel`): one temporal
//! transformer over the sum of a text embedding and one embedding per audio codebook, a
//! text head, and, when the model speaks, a depformer that produces its audio codebooks
//! one after the other within each step. [`generator::LmGen`] runs it frame by frame with
//! the per-stream delays.

pub mod config;
pub mod generator;
pub mod gpu;

use std::path::Path;

pub use config::LmConfig;

use crate::compute::cpu::{Matrix, WeightPrecision};
use crate::models::transformer::{Norm, StreamingTransformer, TransformerSpec};
use crate::models::weights::Weights;
use crate::{Error, Result};

/// Token id meaning "no input here": its embedding is zero (the reference's `zero_idx`).
pub const ZERO_TOKEN: i64 = -1;

/// An embedding table (the reference's `ScaledEmbedding`): row `i` is token `i`'s vector,
/// optionally of a lower rank raised by a linear map, optionally demultiplexing two text
/// streams from one id.
#[derive(Debug, Clone)]
struct Embedding {
    table: Matrix,
    /// `[dim, rank]`: applied after the lookup (`low_rank`; not with `demux`).
    low_rank: Option<Matrix>,
    /// The TTS's two text streams in one id, `(second + 1) * rows + first`: `out1` maps
    /// the first's row, `out2` the second's (none when `second` is -1).
    demux: Option<(Matrix, Matrix)>,
}

impl Embedding {
    fn load(w: &Weights, rows: usize, dim: usize) -> Result<Self> {
        Self::load_with(w, rows, dim, None, false)
    }

    /// `low_rank`: the table's width when lower than `dim`; `demux`: two streams per id.
    fn load_with(
        w: &Weights,
        rows: usize,
        dim: usize,
        low_rank: Option<usize>,
        demux: bool,
    ) -> Result<Self> {
        // Tables are read a row at a time: bf16 at most, never quantized.
        let precision = match w.precision() {
            WeightPrecision::F32 => WeightPrecision::F32,
            _ => WeightPrecision::Bf16,
        };
        let width = low_rank.unwrap_or(dim);
        let table = Matrix::with_precision(&w.get("weight", &[rows, width])?, precision)?;
        let linear = |name: &str| -> Result<Matrix> {
            Matrix::with_precision(&w.get(name, &[dim, width])?, precision)
        };
        let (low_rank, demux) = match (low_rank.is_some(), demux) {
            (_, true) => {
                // The reference builds `low_rank` here too but never applies it.
                if low_rank.is_some() {
                    w.skip("low_rank.weight");
                }
                (None, Some((linear("out1.weight")?, linear("out2.weight")?)))
            }
            (true, false) => (Some(linear("low_rank.weight")?), None),
            (false, false) => (None, None),
        };
        Ok(Self {
            table,
            low_rank,
            demux,
        })
    }

    fn check(&self, id: i64, limit: usize) -> Result<usize> {
        if id < 0 || id as usize >= limit {
            return Err(Error::InvalidInput(format!(
                "token {id} is outside this embedding's 0..{limit}"
            )));
        }
        Ok(id as usize)
    }

    /// The table's row `i` (its own width).
    fn row(&self, i: usize) -> Result<Vec<f32>> {
        let mut r = vec![0f32; self.table.cols()];
        self.table.add_row_to(i, &mut r)?;
        Ok(r)
    }

    /// Adds token `id`'s vector to `out` (nothing for [`ZERO_TOKEN`]).
    fn add_to(&self, id: i64, out: &mut [f32]) -> Result<()> {
        if id == ZERO_TOKEN {
            return Ok(());
        }
        let rows = self.table.rows();
        let add = |m: &Matrix, row: &[f32], out: &mut [f32]| -> Result<()> {
            let y = m.matmul_t(row, 1)?;
            out.iter_mut().zip(&y).for_each(|(o, y)| *o += y);
            Ok(())
        };
        match (&self.demux, &self.low_rank) {
            (Some((out1, out2)), _) => {
                let id = self.check(id, rows * (rows + 1))?;
                add(out1, &self.row(id % rows)?, out)?;
                if let Some(second) = (id / rows).checked_sub(1) {
                    add(out2, &self.row(second)?, out)?;
                }
                Ok(())
            }
            (None, Some(low)) => add(low, &self.row(self.check(id, rows)?)?, out),
            (None, None) => self.table.add_row_to(self.check(id, rows)?, out),
        }
    }
}

/// A linear layer with an optional bias.
#[derive(Debug, Clone)]
struct Linear {
    weight: Matrix,
    bias: Option<Vec<f32>>,
}

impl Linear {
    fn load(w: &Weights, out_dim: usize, in_dim: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: w.matrix("weight", &[out_dim, in_dim])?,
            bias: if bias {
                Some(w.get("bias", &[out_dim])?.to_vec1()?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut y = self.weight.matmul_t(x, 1)?;
        if let Some(b) = &self.bias {
            y.iter_mut().zip(b).for_each(|(y, b)| *y += b);
        }
        Ok(y)
    }
}

#[derive(Debug, Clone)]
struct Depformer {
    /// One input projection per generated codebook (multi-linear; per weight set under a
    /// schedule), or one shared.
    inputs: Vec<Matrix>,
    /// Which input projection (and transformer weight set) each codebook uses.
    schedule: Option<Vec<usize>>,
    /// Embeddings of the previous token: text for codebook 0, then codebooks 0..dep_q-1.
    text_emb: Embedding,
    emb: Vec<Embedding>,
    transformer: StreamingTransformer,
    heads: Vec<Linear>,
}

/// What one step of the temporal transformer gives.
#[derive(Debug, Clone)]
pub struct TemporalOutput {
    /// The transformer's output after the output norm (`dim` values).
    pub hidden: Vec<f32>,
    pub text_logits: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct LmModel {
    cfg: LmConfig,
    text_emb: Embedding,
    emb: Vec<Embedding>,
    transformer: StreamingTransformer,
    out_norm: Norm,
    text_linear: Linear,
    extra_heads: Vec<Matrix>,
    depformer: Option<Depformer>,
    /// Added to every step's input (the TTS's summed conditions).
    input_bias: Option<Vec<f32>>,
}

impl LmModel {
    /// Loads a checkpoint (published PyTorch parameter names) for `cfg`.
    pub fn load(weights: &Path, cfg: LmConfig) -> Result<Self> {
        cfg.validate().map_err(|r| Error::config(weights, r))?;
        Self::from_weights(&Weights::load(weights)?, cfg)
    }

    /// Builds the model from loaded tensors; fails on any missing, misshapen or unused one.
    pub fn from_weights(w: &Weights, cfg: LmConfig) -> Result<Self> {
        let d = cfg.dim;
        let text_out = cfg.text_card_out.unwrap_or(cfg.text_card);
        let depformer = if cfg.dep_q > 0 {
            let dd = cfg.depformer_dim;
            let spec: TransformerSpec = cfg.depformer_spec();
            if w.contains("depformer.0.linear_in.weight") {
                // The `-candle` repositories: one slice per generated codebook.
                let slices: Vec<Weights> = (0..cfg.dep_q)
                    .map(|k| w.pp(format!("depformer.{k}")))
                    .collect();
                let vocab = |k: usize| {
                    if k == 0 {
                        cfg.text_card + 1
                    } else {
                        cfg.card + 1
                    }
                };
                Some(Depformer {
                    inputs: slices
                        .iter()
                        .map(|s| s.matrix("linear_in.weight", &[dd, d]))
                        .collect::<Result<_>>()?,
                    schedule: None,
                    text_emb: Embedding::load(&slices[0].pp("emb"), vocab(0), dd)?,
                    emb: (1..cfg.dep_q)
                        .map(|k| Embedding::load(&slices[k].pp("emb"), vocab(k), dd))
                        .collect::<Result<_>>()?,
                    transformer: StreamingTransformer::load_slices(
                        &slices
                            .iter()
                            .map(|s| s.pp("transformer"))
                            .collect::<Vec<_>>(),
                        &spec,
                    )?,
                    heads: slices
                        .iter()
                        .map(|s| Linear::load(&s.pp("linear_out"), cfg.card, dd, cfg.bias_proj))
                        .collect::<Result<_>>()?,
                })
            } else {
                let n_in = if cfg.depformer_multi_linear {
                    // The reference: one per codebook, or one per weight set under a schedule.
                    match &spec.weights_schedule {
                        Some(_) => spec.weight_sets(),
                        None => cfg.dep_q,
                    }
                } else {
                    1
                };
                let low = cfg.depformer_low_rank_embeddings;
                Some(Depformer {
                    inputs: (0..n_in)
                        .map(|k| w.matrix(&format!("depformer_in.{k}.weight"), &[dd, d]))
                        .collect::<Result<_>>()?,
                    text_emb: Embedding::load_with(
                        &w.pp("depformer_text_emb"),
                        cfg.text_card + 1,
                        dd,
                        low,
                        cfg.demux_second_text_stream,
                    )?,
                    emb: (0..cfg.dep_q - 1)
                        .map(|k| {
                            Embedding::load_with(
                                &w.pp(format!("depformer_emb.{k}")),
                                cfg.card + 1,
                                dd,
                                low,
                                false,
                            )
                        })
                        .collect::<Result<_>>()?,
                    schedule: spec.weights_schedule.clone(),
                    transformer: StreamingTransformer::load(&w.pp("depformer"), &spec)?,
                    heads: (0..cfg.dep_q)
                        .map(|k| {
                            Linear::load(&w.pp(format!("linears.{k}")), cfg.card, dd, cfg.bias_proj)
                        })
                        .collect::<Result<_>>()?,
                })
            }
        } else {
            // The reference builds this projection even without a depformer; it is unused.
            w.skip("depformer_in.0.weight");
            None
        };
        let model = Self {
            text_emb: Embedding::load_with(
                &w.pp("text_emb"),
                cfg.text_card + 1,
                d,
                None,
                cfg.demux_second_text_stream,
            )?,
            emb: (0..cfg.n_q)
                .map(|k| Embedding::load(&w.pp(format!("emb.{k}")), cfg.card + 1, d))
                .collect::<Result<_>>()?,
            transformer: StreamingTransformer::load(&w.pp("transformer"), &cfg.transformer_spec())?,
            out_norm: Norm::load(&w.pp("out_norm"), &cfg.norm, d)?,
            text_linear: Linear::load(&w.pp("text_linear"), text_out, d, cfg.bias_proj)?,
            extra_heads: (0..cfg.extra_heads_num_heads)
                .map(|k| {
                    w.matrix(
                        &format!("extra_heads.{k}.weight"),
                        &[cfg.extra_heads_dim, d],
                    )
                })
                .collect::<Result<_>>()?,
            depformer,
            input_bias: None,
            cfg,
        };
        w.finish()?;
        Ok(model)
    }

    pub fn config(&self) -> &LmConfig {
        &self.cfg
    }

    /// Adds `bias` (`dim` values) to every step's input, or nothing (the TTS's summed
    /// conditions: the `sum` fuser).
    pub fn set_input_bias(&mut self, bias: Option<Vec<f32>>) -> Result<()> {
        if bias.as_ref().is_some_and(|b| b.len() != self.cfg.dim) {
            return Err(Error::InvalidInput(format!(
                "an input bias of {} values for a model of dim {}",
                bias.map_or(0, |b| b.len()),
                self.cfg.dim
            )));
        }
        self.input_bias = bias;
        Ok(())
    }

    /// The conditioning the temporal transformer's cross-attention reads (`n` rows of
    /// `dim`), its keys and values computed once.
    pub fn set_cross_source(&mut self, src: &[f32], n: usize) -> Result<()> {
        self.transformer.set_cross_source(src, n)
    }

    /// One step of the temporal transformer. `tokens`: the text token then one token per
    /// audio codebook (`n_q + 1` ids; [`ZERO_TOKEN`] for none).
    pub fn temporal_step(&mut self, tokens: &[i64]) -> Result<TemporalOutput> {
        if tokens.len() != self.cfg.num_codebooks() {
            return Err(Error::InvalidInput(format!(
                "{} tokens for a model of {} streams",
                tokens.len(),
                self.cfg.num_codebooks()
            )));
        }
        let mut x = vec![0f32; self.cfg.dim];
        for (emb, &tok) in self.emb.iter().zip(&tokens[1..]) {
            emb.add_to(tok, &mut x)?;
        }
        self.text_emb.add_to(tokens[0], &mut x)?;
        if let Some(b) = &self.input_bias {
            x.iter_mut().zip(b).for_each(|(x, b)| *x += b);
        }
        let y = self.transformer.step(&x, 1)?;
        let hidden = self.out_norm.forward(&y, self.cfg.dim);
        let text_logits = self.text_linear.forward(&hidden)?;
        Ok(TemporalOutput {
            hidden,
            text_logits,
        })
    }

    /// The extra heads' probabilities (softmax over `extra_heads_dim`) for `hidden`.
    pub fn extra_heads(&self, hidden: &[f32]) -> Result<Vec<Vec<f32>>> {
        self.extra_heads
            .iter()
            .map(|h| Ok(softmax(&h.matmul_t(hidden, 1)?)))
            .collect()
    }

    /// Runs the depformer for one step: `choose(codebook, logits)` picks each audio token
    /// from its logits, in order, each conditioning the next. Returns `dep_q` tokens.
    pub fn depformer_step(
        &mut self,
        text_token: i64,
        hidden: &[f32],
        choose: impl FnMut(usize, &[f32]) -> u32,
    ) -> Result<Vec<u32>> {
        self.depformer_step_first(usize::MAX, text_token, hidden, choose)
    }

    /// The depformer's embedding of text token `token` (what its first step adds to its
    /// input).
    pub fn depformer_text_embedding(&self, token: i64) -> Result<Vec<f32>> {
        let dep = self
            .depformer
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("this model has no depformer".into()))?;
        let mut x = vec![0f32; dep.transformer.d_model()];
        dep.text_emb.add_to(token, &mut x)?;
        Ok(x)
    }

    /// Like [`Self::depformer_step`], for the first `n` codebooks only (a TTS asked for
    /// fewer codebooks, as Kyutai's own server runs it with 24 of 32).
    pub fn depformer_step_first(
        &mut self,
        n: usize,
        text_token: i64,
        hidden: &[f32],
        mut choose: impl FnMut(usize, &[f32]) -> u32,
    ) -> Result<Vec<u32>> {
        let dep = self
            .depformer
            .as_mut()
            .ok_or_else(|| Error::InvalidInput("this model has no depformer".into()))?;
        dep.transformer.reset();
        let mut prev = text_token;
        let n = n.min(dep.heads.len());
        let mut out = Vec::with_capacity(n);
        for k in 0..n {
            let which = dep.schedule.as_ref().map_or(k, |s| s[k]);
            let input = &dep.inputs[which.min(dep.inputs.len() - 1)];
            let mut x = input.matmul_t(hidden, 1)?;
            if k == 0 {
                dep.text_emb.add_to(prev, &mut x)?;
            } else {
                dep.emb[k - 1].add_to(prev, &mut x)?;
            }
            let y = dep.transformer.step(&x, 1)?;
            let logits = dep.heads[k].forward(&y)?;
            let tok = choose(k, &logits);
            out.push(tok);
            prev = tok as i64;
        }
        Ok(out)
    }

    /// Bytes of weights one generation step reads: the temporal transformer, the text
    /// head and the extra heads, and every depformer step (embedding rows aside).
    pub fn weight_bytes_per_step(&self) -> usize {
        let mut n = self.temporal_weight_bytes();
        if let Some(d) = &self.depformer {
            n += d.transformer.weight_bytes();
            n += d.inputs.iter().map(Matrix::size_in_bytes).sum::<usize>();
            n += d
                .heads
                .iter()
                .map(|h| h.weight.size_in_bytes())
                .sum::<usize>();
        }
        n
    }

    /// Bytes of weights one frame reads when the depformer generates `codebooks`: the
    /// temporal transformer and heads once, and for each codebook the depformer weight
    /// set, input projection and head its step uses (a set shared by several steps under
    /// a schedule is read by each of them).
    pub fn weight_bytes_per_frame(&self, codebooks: usize) -> usize {
        let mut n = self.temporal_weight_bytes();
        if let Some(d) = &self.depformer {
            for k in 0..codebooks.min(d.heads.len()) {
                let set = d.schedule.as_ref().map_or(k, |s| s[k]);
                n += d.transformer.weight_set_bytes(set)
                    + d.inputs[set.min(d.inputs.len() - 1)].size_in_bytes()
                    + d.heads[k].weight.size_in_bytes();
            }
        }
        n
    }

    /// The temporal transformer's, the text head's and the extra heads' bytes.
    fn temporal_weight_bytes(&self) -> usize {
        self.transformer.weight_bytes()
            + self.text_linear.weight.size_in_bytes()
            + self
                .extra_heads
                .iter()
                .map(Matrix::size_in_bytes)
                .sum::<usize>()
    }

    /// Clears the streaming state (attention rings and positions).
    pub fn reset(&mut self) {
        self.transformer.reset();
        if let Some(d) = &mut self.depformer {
            d.transformer.reset();
        }
    }

    /// Bytes of streaming state; fixed whatever the session's length.
    pub fn state_bytes(&self) -> usize {
        self.transformer.state_bytes()
            + self
                .depformer
                .as_ref()
                .map_or(0, |d| d.transformer.state_bytes())
    }

    /// Holds the large weight matrices in `precision` (see [`WeightPrecision`]).
    pub fn set_weight_precision(&mut self, precision: WeightPrecision) -> Result<()> {
        self.transformer.set_precision(precision)?;
        self.text_linear.weight.set_precision(precision)?;
        if let Some(d) = &mut self.depformer {
            d.transformer.set_precision(precision)?;
            for m in d.inputs.iter_mut() {
                m.set_precision(precision)?;
            }
        }
        Ok(())
    }
}

pub(crate) fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vec_of(e: &Embedding, id: i64, dim: usize) -> Vec<f32> {
        let mut v = vec![0f32; dim];
        e.add_to(id, &mut v).expect("embed");
        v
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
    }

    /// The TTS's two text streams in one id: `out1` of the first's row plus `out2` of the
    /// second's, nothing from a second of -1; ids beyond both streams are refused.
    #[test]
    fn a_demuxed_embedding_adds_both_streams() {
        let (rows, dim, rank) = (5, 6, 3);
        for low in [None, Some(rank)] {
            let w = Weights::random(3);
            let e = Embedding::load_with(&w.pp("t"), rows, dim, low, true).expect("load");
            let (out1, out2) = e.demux.clone().expect("demux");
            let part = |m: &Matrix, i: usize| m.matmul_t(&e.row(i).expect("row"), 1).expect("mm");
            // first 2, no second
            assert!(close(&vec_of(&e, 2, dim), &part(&out1, 2)));
            // first 4, second 1: id (1 + 1) * 5 + 4
            let both: Vec<f32> = part(&out1, 4)
                .iter()
                .zip(part(&out2, 1))
                .map(|(a, b)| a + b)
                .collect();
            assert!(close(&vec_of(&e, 14, dim), &both));
            assert!(vec_of(&e, ZERO_TOKEN, dim).iter().all(|&v| v == 0.0));
            let mut out = vec![0f32; dim];
            assert!(e.add_to(30, &mut out).is_err());
            assert!(e.add_to(-2, &mut out).is_err());
        }
    }

    /// A low-rank table is raised to the model's width by its linear map.
    #[test]
    fn a_low_rank_embedding_is_raised_by_its_map() {
        let (rows, dim, rank) = (7, 8, 2);
        let w = Weights::random(4);
        let e = Embedding::load_with(&w.pp("e"), rows, dim, Some(rank), false).expect("load");
        assert_eq!(e.table.cols(), rank);
        let low = e.low_rank.clone().expect("low rank");
        let want = low.matmul_t(&e.row(3).expect("row"), 1).expect("mm");
        assert!(close(&vec_of(&e, 3, dim), &want));
        let mut out = vec![0f32; dim];
        assert!(e.add_to(7, &mut out).is_err());
    }
}
