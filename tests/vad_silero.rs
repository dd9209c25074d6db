//! Silero VAD through ONNX Runtime against the official `silero-vad` package
//! (`tests/reference/make_vad_fixtures.py`): the speech probability of every 512-sample
//! chunk of the dialogue at 16 kHz within 1e-4 of the package's. Needs ONNX Runtime
//! (`scripts/setup.sh` installs it); skipped with the reason printed where it is missing,
//! unless `PARLEY_REQUIRE_ORT=1` (CI) makes that a failure.

use std::path::Path;

use parley_engine::models::vad::{runtime, SileroVad, CHUNK};

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vad")
}

/// The runtime, or None (test skipped) where it is missing and not required.
fn runtime_or_skip() -> Option<()> {
    match runtime() {
        Ok(_) => Some(()),
        Err(e) if std::env::var("PARLEY_REQUIRE_ORT").as_deref() == Ok("1") => {
            panic!("PARLEY_REQUIRE_ORT=1 and {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// A 1-D little-endian f32 `.npy` (format 1.0).
fn read_npy_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).expect("npy");
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).expect("header");
    assert!(header.contains("'<f4'"), "{header}");
    bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn dialogue_16k() -> Vec<f32> {
    let mut r = hound::WavReader::open(fixtures().join("dialogue_16k.wav")).expect("wav");
    assert_eq!(r.spec().sample_rate, 16_000);
    r.samples::<i16>()
        .map(|s| s.expect("sample") as f32 / 32768.0)
        .collect()
}

#[test]
fn silero_probabilities_match_the_python_package() {
    if runtime_or_skip().is_none() {
        return;
    }
    let want = read_npy_f32(&fixtures().join("silero_probs.npy"));
    let pcm = dialogue_16k();
    let mut vad = SileroVad::new().expect("vad");
    let got: Vec<f32> = pcm
        .chunks_exact(CHUNK)
        .map(|c| vad.probability(c).expect("probability"))
        .collect();
    assert_eq!(got.len(), want.len());
    // The dialogue has speech and pauses: the probabilities must say both.
    assert!(want.iter().filter(|&&p| p > 0.9).count() > 50);
    assert!(want.iter().filter(|&&p| p < 0.1).count() > 50);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("{} chunks, max |difference| {worst:.2e}", got.len());
    assert!(worst <= 1e-4, "max difference {worst}");
    // A reset starts the stream again: the same probabilities.
    vad.reset();
    let again: Vec<f32> = pcm
        .chunks_exact(CHUNK)
        .take(40)
        .map(|c| vad.probability(c).expect("probability"))
        .collect();
    assert_eq!(again, got[..40]);
}

#[test]
fn a_chunk_of_the_wrong_size_is_refused() {
    if runtime_or_skip().is_none() {
        return;
    }
    let mut vad = SileroVad::new().expect("vad");
    let err = vad.probability(&[0.0; 480]).expect_err("480 samples");
    assert!(err.to_string().contains("512"), "{err}");
}
