//! The `-candle` repositories' names for a Moshi checkpoint: the depformer as one slice
//! per generated codebook (`depformer.{k}.…`), its stacked per-step attention split into
//! the slices, its norms copied into each. Kyutai's Rust crate reads these names; their
//! q8 GGUF files use them too.

use std::collections::HashMap;

use candle_core::Tensor;

/// Renames a checkpoint with the reference's (PyTorch) names to the `-candle` layout.
pub fn to_candle_names(orig: HashMap<String, Tensor>, dep_q: usize) -> HashMap<String, Tensor> {
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in orig {
        let parts: Vec<&str> = name.split('.').collect();
        match parts.as_slice() {
            ["depformer_in", k, "weight"] => {
                out.insert(format!("depformer.{k}.linear_in.weight"), t);
            }
            ["depformer_text_emb", "weight"] => {
                out.insert("depformer.0.emb.weight".into(), t);
            }
            ["depformer_emb", k, "weight"] => {
                let k: usize = k.parse().expect("k");
                out.insert(format!("depformer.{}.emb.weight", k + 1), t);
            }
            ["linears", k, "weight"] => {
                out.insert(format!("depformer.{k}.linear_out.weight"), t);
            }
            ["depformer", "layers", i, "self_attn", rest @ ..] => {
                let rows = t.dim(0).expect("rows") / dep_q;
                for k in 0..dep_q {
                    let part = t
                        .narrow(0, k * rows, rows)
                        .and_then(|p| p.force_contiguous())
                        .expect("narrow");
                    out.insert(
                        format!(
                            "depformer.{k}.transformer.layers.{i}.self_attn.{}",
                            rest.join(".")
                        ),
                        part,
                    );
                }
            }
            ["depformer", "layers", i, "gating", k, rest @ ..] => {
                out.insert(
                    format!(
                        "depformer.{k}.transformer.layers.{i}.gating.{}",
                        rest.join(".")
                    ),
                    t,
                );
            }
            ["depformer", "layers", i, rest @ ..] => {
                for k in 0..dep_q {
                    out.insert(
                        format!("depformer.{k}.transformer.layers.{i}.{}", rest.join(".")),
                        t.clone(),
                    );
                }
            }
            _ => {
                out.insert(name, t);
            }
        }
    }
    out
}
