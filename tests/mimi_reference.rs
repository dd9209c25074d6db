//! Mimi against the official `moshi` package (fixtures made by
//! tests/reference/make_mimi_fixtures.py): codes identical, offline and streaming, in f32
//! and from a bf16 checkpoint; decoded audio within 1e-4 (max abs).

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use parley_engine::audio::file::read_audio_24k;
use parley_engine::models::mimi::{Codes, Mimi, MimiConfig};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/mimi-tiny")
        .join(name)
}

fn load(weights: &str) -> Mimi {
    let cfg = MimiConfig::from_json_file(&fixture("mimi_config.json")).expect("config");
    Mimi::load(&fixture(weights), cfg, 8).expect("load mimi")
}

fn input_pcm() -> Vec<f32> {
    let mut pcm = read_audio_24k(&fixture("input.wav")).expect("read input");
    pcm.truncate(pcm.len() / 1920 * 1920);
    pcm
}

fn ref_codes(name: &str) -> Codes {
    let t = Tensor::read_npy(fixture(name)).expect("read npy");
    t.to_vec2::<i64>()
        .expect("2d i64")
        .into_iter()
        .map(|row| row.into_iter().map(|c| c as u32).collect())
        .collect()
}

fn ref_audio(name: &str) -> Vec<f32> {
    Tensor::read_npy(fixture(name))
        .expect("read npy")
        .to_vec1::<f32>()
        .expect("1d f32")
}

fn assert_codes_eq(got: &Codes, want: &Codes, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: codebooks");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: frames of codebook {k}");
        if let Some(t) = g.iter().zip(w).position(|(a, b)| a != b) {
            panic!(
                "{what}: codebook {k} differs first at frame {t}: {} vs reference {}",
                g[t], w[t]
            );
        }
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn stream(mimi: &mut Mimi, pcm: &[f32]) -> (Codes, Vec<f32>) {
    mimi.reset();
    let mut codes: Codes = vec![vec![]; mimi.num_codebooks()];
    let mut out = vec![];
    for frame in pcm.chunks(1920) {
        let c = mimi.encode_step(frame).expect("encode_step");
        out.extend(mimi.decode_step(&c).expect("decode_step"));
        codes.iter_mut().zip(&c).for_each(|(row, &v)| row.push(v));
    }
    (codes, out)
}

#[test]
fn fixture_is_informative() {
    // A parity test on constant codes would prove nothing.
    let codes = ref_codes("ref_codes_offline.npy");
    for (k, row) in codes.iter().enumerate() {
        let mut distinct = row.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(
            distinct.len() >= 8,
            "codebook {k} has only {} distinct codes",
            distinct.len()
        );
    }
    let stream = ref_codes("ref_codes_stream.npy");
    assert_ne!(
        codes, stream,
        "the fixture's context must be short enough for the ring to wrap"
    );
}

#[test]
fn offline_matches_reference() {
    let mut mimi = load("mimi.safetensors");
    let pcm = input_pcm();
    let codes = mimi.encode(&pcm).expect("encode");
    assert_codes_eq(&codes, &ref_codes("ref_codes_offline.npy"), "offline codes");
    let audio = mimi.decode(&codes).expect("decode");
    let err = max_abs_diff(&audio, &ref_audio("ref_decoded_offline.npy"));
    assert!(err < 1e-4, "offline decode max abs error {err}");
}

#[test]
fn streaming_matches_reference() {
    let mut mimi = load("mimi.safetensors");
    let (codes, audio) = stream(&mut mimi, &input_pcm());
    assert_codes_eq(
        &codes,
        &ref_codes("ref_codes_stream.npy"),
        "streaming codes",
    );
    let err = max_abs_diff(&audio, &ref_audio("ref_decoded_stream.npy"));
    assert!(err < 1e-4, "streaming decode max abs error {err}");
}

#[test]
fn bf16_checkpoint_matches_reference() {
    let mut mimi = load("mimi_bf16.safetensors");
    let pcm = input_pcm();
    let codes = mimi.encode(&pcm).expect("encode");
    assert_codes_eq(
        &codes,
        &ref_codes("ref_bf16_codes_offline.npy"),
        "bf16 offline codes",
    );
    let (codes, _) = stream(&mut mimi, &pcm);
    assert_codes_eq(
        &codes,
        &ref_codes("ref_bf16_codes_stream.npy"),
        "bf16 streaming codes",
    );
}

#[test]
fn streaming_equals_offline_until_the_ring_wraps() {
    // context = 12 steps at 25 Hz = 6 frames: up to there both paths see the same keys.
    let mut mimi = load("mimi.safetensors");
    let pcm = input_pcm();
    let offline = mimi.encode(&pcm).expect("encode");
    let (streamed, audio) = stream(&mut mimi, &pcm);
    for (k, (a, b)) in offline.iter().zip(&streamed).enumerate() {
        assert_eq!(a[..6], b[..6], "codebook {k}");
    }
    let offline_audio = mimi.decode(&streamed).expect("decode");
    let err = max_abs_diff(&audio[..6 * 1920], &offline_audio[..6 * 1920]);
    assert!(err < 1e-5, "max abs diff {err}");
}
