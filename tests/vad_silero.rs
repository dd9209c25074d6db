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

/// The dialogue's two turns (aligned by espeak-ng's word events in
/// `assets/speech/dialogue.json`), fed as the pipeline feeds audio: 80 ms frames at 24 kHz.
/// With the default settings speech starts within 100 ms of each turn's first word, stops
/// within 100 ms of its last (the stop is dated at its first silent chunk; it is decided
/// `min_silence_ms` later), and nothing starts or stops inside a turn. With a shorter
/// silence setting, the pause between each turn's two sentences splits it.
#[test]
fn speech_starts_and_stops_with_the_dialogues_turns() {
    use parley_engine::models::vad::{VadEvent, VadSettings, VoiceActivity};
    if runtime_or_skip().is_none() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let pcm = parley_engine::audio::file::read_audio_24k(&root.join("assets/speech/dialogue.wav"))
        .expect("wav");
    let align: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("assets/speech/dialogue.json")).expect("json"),
    )
    .expect("alignment");
    let turns: Vec<(f64, f64)> = align["turns"]
        .as_array()
        .expect("turns")
        .iter()
        .map(|t| {
            (
                t["start_s"].as_f64().expect("start"),
                t["end_s"].as_f64().expect("end"),
            )
        })
        .collect();
    let runs = |settings: VadSettings| -> Vec<(f64, f64)> {
        let mut va = VoiceActivity::new(settings).expect("vad");
        let mut events = vec![];
        for frame in pcm.chunks(1920) {
            events.extend(va.push_24k(frame).expect("push"));
        }
        assert!(!va.speaking(), "{events:?}");
        // Every pause inside a run of speech comes before its stop.
        let mut speaking = false;
        for e in &events {
            match e {
                VadEvent::SpeechStarted { .. } => speaking = true,
                VadEvent::SpeechStopped { .. } => speaking = false,
                VadEvent::Paused { .. } | VadEvent::Resumed { .. } => {
                    assert!(speaking, "a pause outside speech: {events:?}")
                }
            }
        }
        let events: Vec<VadEvent> = events
            .into_iter()
            .filter(|e| !matches!(e, VadEvent::Paused { .. } | VadEvent::Resumed { .. }))
            .collect();
        va.reset();
        assert!(!va.speaking());
        events
            .chunks(2)
            .map(|pair| match (pair[0], pair.get(1)) {
                (
                    VadEvent::SpeechStarted { time_s: s, .. },
                    Some(&VadEvent::SpeechStopped { time_s: e, .. }),
                ) => (s, e),
                _ => panic!("not a start and a stop: {pair:?}"),
            })
            .collect()
    };
    let got = runs(VadSettings::default());
    eprintln!("default: {got:?}");
    assert_eq!(got.len(), turns.len(), "{got:?}");
    for (&(s, e), &(start, end)) in got.iter().zip(&turns) {
        assert!(
            (s - start).abs() <= 0.1,
            "speech started at {s:.3} s, the turn at {start:.3}"
        );
        assert!(
            (e - end).abs() <= 0.1,
            "speech stopped at {e:.3} s, the turn ended at {end:.3}"
        );
    }
    let split = runs(VadSettings {
        min_silence_ms: 250.0,
        ..VadSettings::default()
    });
    eprintln!("250 ms: {split:?}");
    // Each turn is two sentences; the pause between them (about 0.3 s) now splits it.
    assert_eq!(split.len(), 2 * turns.len(), "{split:?}");
    for (pair, &(start, end)) in split.chunks(2).zip(&turns) {
        let (stop, restart) = (pair[0].1, pair[1].0);
        assert!(
            start < stop && stop < restart && restart < end,
            "the split should fall inside the turn {start:.3}-{end:.3}: {split:?}"
        );
    }
}

/// Fed in half frames (as a live pipeline feeds its early halves) the VAD decides what it
/// decides on whole frames, at the same times and probabilities: its resampler takes half a
/// frame at a time and its 32 ms windows are cut from the stream, whatever the pieces.
#[test]
fn half_frames_give_the_decisions_of_whole_frames() {
    use parley_engine::models::vad::{VadSettings, VoiceActivity};
    if runtime_or_skip().is_none() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let pcm = parley_engine::audio::file::read_audio_24k(&root.join("assets/speech/dialogue.wav"))
        .expect("wav");
    let mut whole = VoiceActivity::new(VadSettings::default()).expect("vad");
    let mut halves = VoiceActivity::new(VadSettings::default()).expect("vad");
    let (mut a, mut b) = (vec![], vec![]);
    for frame in pcm.chunks(1920) {
        a.extend(whole.push_24k(frame).expect("push"));
        let (first, second) = frame.split_at(frame.len().min(960));
        b.extend(halves.push_24k(first).expect("push"));
        b.extend(halves.push_24k(second).expect("push"));
        assert_eq!(whole.last_probability(), halves.last_probability());
    }
    assert!(
        a.len() >= 4,
        "the dialogue's two turns start and stop: {a:?}"
    );
    assert_eq!(a, b);
}
