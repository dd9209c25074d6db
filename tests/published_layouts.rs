//! Kyutai's published checkpoints, as the reference lays them out
//! (tests/fixtures/published/*.json, written by tests/reference/make_published_layouts.py
//! from the official package's own LMModel): each layout has the published tensor count
//! and file size; Parley's presets are the published architectures; and every published
//! model directory (config.json as published, two layers instead of all, random weights
//! under the published names, dtypes and shapes) loads with the strict loader and runs a
//! few steps, or, for the TTS, fails with the clear "not supported yet" error.

use std::path::{Path, PathBuf};

use parley_engine::compute::cpu::WeightPrecision;
use parley_engine::models::checkpoint::{safetensors_file_size, PublishedLayout};
use parley_engine::models::kyutai_config::ModelDir;
use parley_engine::models::lm::generator::{GenConfig, LmGen};
use parley_engine::models::lm::LmConfig;

fn manifest(name: &str) -> PublishedLayout {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/published")
        .join(format!("{name}.json"));
    PublishedLayout::load(&path).expect("manifest")
}

const MODELS: [&str; 5] = [
    "stt-1b-en_fr",
    "stt-1b-en_fr-candle",
    "stt-2.6b-en",
    "moshiko",
    "tts-1.6b-en_fr",
];

#[test]
fn every_published_layout_has_the_published_count_and_size() {
    for name in MODELS {
        let m = manifest(name);
        assert_eq!(
            m.tensors.len() as u64,
            m.published_tensors,
            "{name}: tensor count"
        );
        assert_eq!(
            safetensors_file_size(&m.tensors),
            m.published_bytes,
            "{name}: file size (header + data)"
        );
    }
}

fn arch(c: &LmConfig) -> String {
    let dep = (c.dep_q > 0).then(|| c.depformer_spec());
    format!(
        "{:?}",
        (
            (
                c.dim,
                c.num_heads,
                c.num_layers,
                c.hidden_scale,
                c.context,
                c.max_period
            ),
            (c.text_card, c.n_q, c.dep_q, &c.delays, c.card),
            (
                c.extra_heads_num_heads,
                c.extra_heads_dim,
                c.existing_text_padding_id
            ),
            c.transformer_spec(),
            dep
        )
    )
}

#[test]
fn presets_are_the_published_architectures() {
    for (preset, published) in [
        ("stt-1b-en_fr", "stt-1b-en_fr-candle"),
        ("stt-2.6b-en", "stt-2.6b-en"),
        ("moshi-7b", "moshiko"),
    ] {
        let cfg: LmConfig = serde_json::from_value(manifest(published).config).expect("config");
        cfg.validate().expect("published config accepted");
        let p = LmConfig::preset(preset).expect("preset");
        assert_eq!(arch(&p), arch(&cfg), "preset {preset} vs {published}");
    }
    // A repository without config.json is the reference loader's default Moshi.
    let dir = scratch("legacy");
    std::fs::write(dir.join("model.safetensors"), b"").expect("touch");
    let legacy = ModelDir::open(&dir).expect("dir").lm_config().expect("cfg");
    let want: LmConfig =
        serde_json::from_value(manifest("moshiko").config).expect("loader defaults");
    assert_eq!(arch(&legacy), arch(&want));
    let _ = std::fs::remove_dir_all(&dir);
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("parley-published-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

/// Writes `name`'s published model directory with `layers` layers (config.json as
/// published otherwise) and random weights in the published layout.
fn reduced_dir(name: &str, layers: usize) -> PathBuf {
    let dir = scratch(name);
    manifest(name)
        .write_random_dir(&dir, Some(layers), 7)
        .expect("write");
    dir
}

fn loads_and_runs(name: &str) {
    let dir = reduced_dir(name, 2);
    let d = ModelDir::open(&dir).expect("open");
    let model = d.load_lm_as(WeightPrecision::Bf16).expect("strict load");
    let cfg = model.config().clone();
    let mut gen = LmGen::new(model, GenConfig::default());
    let n_in = cfg.n_q - cfg.dep_q;
    let mut texts = vec![];
    for t in 0..4u32 {
        let input: Vec<u32> = (0..n_in as u32).map(|k| (t * 7 + k * 13) % 2048).collect();
        let step = gen.step(&input).expect("step");
        assert!((step.text_token as usize) < cfg.text_card + 1);
        texts.push(step.text_token);
    }
    eprintln!("{name}: text tokens {texts:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stt_1b_loads_as_published() {
    loads_and_runs("stt-1b-en_fr");
}

#[test]
fn stt_1b_candle_loads_as_published() {
    loads_and_runs("stt-1b-en_fr-candle");
}

#[test]
fn stt_2_6b_loads_as_published() {
    loads_and_runs("stt-2.6b-en");
}

#[test]
fn moshiko_loads_as_published() {
    loads_and_runs("moshiko");
}

#[test]
fn tts_is_read_and_refused_clearly() {
    let dir = reduced_dir("tts-1.6b-en_fr", 1);
    let d = ModelDir::open(&dir).expect("open");
    let err = d
        .load_lm_as(WeightPrecision::Bf16)
        .expect_err("TTS not supported yet")
        .to_string();
    assert!(
        err.contains("not supported yet") && err.contains("TTS"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
