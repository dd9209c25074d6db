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
        ("tts-1.6b-en_fr", "tts-1.6b-en_fr"),
    ] {
        let cfg: LmConfig = serde_json::from_value(manifest(published).config).expect("config");
        if cfg.is_tts() {
            cfg.validate_tts().expect("published TTS config accepted");
            let p = LmConfig::preset(preset).expect("preset");
            p.validate_tts().expect("preset");
            assert!(p.is_tts());
        } else {
            cfg.validate().expect("published config accepted");
        }
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

/// The TTS's published layout (one layer, random weights in the published names and
/// dtypes) loads strictly as a TTS, speaks in a voice of the published shape, and is
/// refused by the STT/Moshi loader with a pointer to `parley tts`.
#[test]
fn tts_loads_as_published_and_speaks() {
    use parley_engine::models::tts::{Entry, Step, TtsModel, TtsOptions, TtsStream, Voice};
    let dir = reduced_dir("tts-1.6b-en_fr", 1);
    let d = ModelDir::open(&dir).expect("open");
    let err = d
        .load_lm_as(WeightPrecision::Bf16)
        .expect_err("not an STT/Moshi model")
        .to_string();
    assert!(err.contains("parley tts"), "{err}");
    let cfg = d.lm_config().expect("config");
    let mut m = TtsModel::load(
        &d.lm_weights().expect("weights"),
        cfg,
        WeightPrecision::Bf16,
    )
    .expect("strict load");
    let voice_path = dir.join("voice.safetensors");
    let t = candle_core::Tensor::randn(0f32, 1.0, (1, 512, 125), &candle_core::Device::Cpu)
        .expect("voice");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("speaker_wavs".to_string(), t)]),
        &voice_path,
    )
    .expect("save voice");
    let voice = Voice::load(&voice_path).expect("voice");
    m.condition(&[&voice], "2.0").expect("condition");
    let opts = TtsOptions {
        temp: 0.0,
        codebooks: 24,
        max_steps: 24,
        ..TtsOptions::default()
    };
    let mut s = TtsStream::new(&mut m, 12.5, &opts).expect("stream");
    s.push(
        (0..6)
            .map(|i| Entry {
                tokens: vec![1 + i, 500 + i],
                text: format!("w{i}"),
                padding: 2,
            })
            .collect(),
    );
    s.finish_input();
    while !matches!(s.step().expect("step"), Step::Done) {}
    let out = s.into_output();
    assert_eq!(out.steps.len(), 24);
    let last = out.steps.last().expect("a step");
    assert_eq!(last.len(), 1 + 24, "24 codebooks asked for");
    assert!(
        last[1..].iter().all(|&c| (0..2048).contains(&c)),
        "{last:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
