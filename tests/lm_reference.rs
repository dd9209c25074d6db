//! The delayed-streams LM against the official `moshi` package (fixtures made by
//! tests/reference/make_lm_fixtures.py): greedy tokens identical at every step, text logits
//! and extra heads within 1e-4 (f32), for an STT-style and a Moshi-style model.

use std::path::{Path, PathBuf};

#[path = "common/candle_layout.rs"]
mod candle_layout;

use candle_core::Tensor;
use parley_engine::models::lm::generator::{GenConfig, LmGen};
use parley_engine::models::lm::{LmConfig, LmModel};

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn npy(path: PathBuf) -> Tensor {
    Tensor::read_npy(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load(name: &str) -> LmGen {
    let d = dir(name);
    let cfg = LmConfig::from_json_file(&d.join("config.json")).expect("config");
    let model = LmModel::load(&d.join("model.safetensors"), cfg).expect("model");
    LmGen::new(model, GenConfig::default())
}

struct Run {
    tokens: Vec<Vec<i64>>,
    text_logits: Vec<Vec<f32>>,
    extra: Vec<Vec<Vec<f32>>>,
}

fn run(gen: &mut LmGen, name: &str) -> Run {
    let codes: Vec<Vec<i64>> = npy(dir(name).join("input_codes.npy"))
        .to_vec2()
        .expect("codes");
    let steps = codes[0].len();
    let mut out = Run {
        tokens: vec![],
        text_logits: vec![],
        extra: vec![],
    };
    for t in 0..steps {
        let input: Vec<u32> = codes.iter().map(|row| row[t] as u32).collect();
        let step = gen.step(&input).expect("step");
        if let Some(tok) = step.tokens {
            out.tokens.push(tok);
        }
        out.text_logits.push(step.text_logits.expect("cpu logits"));
        out.extra.push(step.extra_heads);
    }
    out
}

fn check(name: &str) -> Run {
    let mut gen = load(name);
    let got = run(&mut gen, name);
    let want: Vec<Vec<i64>> = npy(dir(name).join("ref_tokens.npy"))
        .to_vec2()
        .expect("tokens");
    let n = want[0].len();
    assert!(n >= 100, "{name}: only {n} reference steps");
    assert_eq!(got.tokens.len(), n, "{name}: returned steps");
    for t in 0..n {
        let col: Vec<i64> = want.iter().map(|row| row[t]).collect();
        assert_eq!(
            got.tokens[t], col,
            "{name}: tokens differ at returned step {t}"
        );
    }
    let want_logits: Vec<Vec<f32>> = npy(dir(name).join("ref_text_logits.npy"))
        .to_vec2()
        .expect("logits");
    assert_eq!(got.text_logits.len(), want_logits.len());
    let mut err = 0f32;
    for (g, w) in got.text_logits.iter().zip(&want_logits) {
        assert_eq!(g.len(), w.len());
        err = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(err, f32::max);
    }
    assert!(err < 1e-4, "{name}: text logits max abs error {err}");
    got
}

#[test]
fn stt_model_matches_reference() {
    let got = check("stt-tiny");
    let want = npy(dir("stt-tiny").join("ref_extra_heads.npy"));
    let want: Vec<f32> = want.flatten_all().expect("flat").to_vec1().expect("vec");
    let got: Vec<f32> = got.extra.iter().flatten().flatten().copied().collect();
    assert_eq!(got.len(), want.len());
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-5, "extra heads max abs error {err}");
}

#[test]
fn moshi_model_matches_reference() {
    check("moshi-tiny");
}

#[test]
fn reset_replays_the_same_stream() {
    let mut gen = load("moshi-tiny");
    let first = run(&mut gen, "moshi-tiny").tokens;
    gen.reset();
    let second = run(&mut gen, "moshi-tiny").tokens;
    assert_eq!(first, second);
}

#[test]
fn bad_model_files_give_clear_errors() {
    let d = dir("moshi-tiny");
    let mut cfg = LmConfig::from_json_file(&d.join("config.json")).expect("config");
    cfg.num_layers = 3;
    let err = LmModel::load(&d.join("model.safetensors"), cfg)
        .expect_err("layers")
        .to_string();
    assert!(err.contains("transformer.layers.2"), "{err}");
    let mut cfg = LmConfig::from_json_file(&d.join("config.json")).expect("config");
    cfg.num_layers = 1;
    let err = LmModel::load(&d.join("model.safetensors"), cfg)
        .expect_err("unused")
        .to_string();
    assert!(err.contains("not used"), "{err}");
    let mut cfg = LmConfig::from_json_file(&d.join("config.json")).expect("config");
    cfg.dim = 48;
    let err = LmModel::load(&d.join("model.safetensors"), cfg)
        .expect_err("dim")
        .to_string();
    assert!(err.contains("shape"), "{err}");
}

/// The `-candle` repositories store the depformer as one slice per codebook. The Moshi
/// fixture, renamed to that layout, must generate exactly the reference's tokens.
#[test]
fn candle_layout_checkpoint_matches_reference() {
    use candle_core::Device;
    use parley_engine::models::weights::Weights;

    let d = dir("moshi-tiny");
    let cfg = LmConfig::from_json_file(&d.join("config.json")).expect("config");
    let (dep_q, dd) = (cfg.dep_q, cfg.depformer_dim);
    let orig =
        candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).expect("load");
    let out = candle_layout::to_candle_names(orig, dep_q);
    assert!(out.contains_key(&format!(
        "depformer.{}.transformer.layers.0.gating.linear_in.weight",
        dep_q - 1
    )));
    assert_eq!(out["depformer.0.linear_in.weight"].dims()[0], dd);
    let w = Weights::from_tensors(&d.join("model-candle.safetensors"), out);
    let model = LmModel::from_weights(&w, cfg).expect("candle layout");
    let mut gen = LmGen::new(model, GenConfig::default());
    let got = run(&mut gen, "moshi-tiny").tokens;
    let want: Vec<Vec<i64>> = npy(d.join("ref_tokens.npy")).to_vec2().expect("tokens");
    for (t, g) in got.iter().enumerate() {
        let col: Vec<i64> = want.iter().map(|row| row[t]).collect();
        assert_eq!(g, &col, "step {t}");
    }
}
