//! The speech worker (`pipeline::speak`) on the tiny TTS: the reference's speech for a
//! whole text and for the same text in pieces that split words (as an LLM streams it),
//! words reported as their audio comes, responses said in order, a cancel that stops
//! within a step and leaves the worker ready for the next response, bad text as an error
//! that does not stop the worker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver};
use parley_engine::compute::gpu::DeviceChoice;
use parley_engine::compute::Dtype;
use parley_engine::pipeline::speak::{SpeakModels, SpeechEvent, TtsWorker};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tts-tiny")
}

fn models() -> SpeakModels {
    let voice = dir().join("voice_a.safetensors");
    let mut m = SpeakModels::load(
        &dir(),
        voice.to_str().expect("utf-8"),
        "2.0",
        DeviceChoice::Cpu,
        Dtype::F32,
        None,
    )
    .expect("models");
    m.opts.temp = 0.0;
    m
}

fn reference(name: &str) -> Vec<f32> {
    let mut r = hound::WavReader::open(dir().join(name)).expect("wav");
    r.samples::<i16>()
        .map(|s| s.expect("sample") as f32 / 32768.0)
        .collect()
}

/// Every event of response `id` up to its `Done`.
fn response(rx: &Receiver<SpeechEvent>, id: u64) -> (Vec<f32>, Vec<(String, f64)>, SpeechEvent) {
    let (mut pcm, mut words) = (vec![], vec![]);
    let mut started = false;
    loop {
        let e = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("an event within a minute");
        match e {
            SpeechEvent::Started { id: i } => {
                assert_eq!(i, id);
                started = true;
            }
            SpeechEvent::Audio { id: i, pcm: p } => {
                assert!(started && i == id, "audio of {i} while waiting for {id}");
                assert_eq!(p.len(), 1920);
                pcm.extend(p);
            }
            SpeechEvent::Word {
                id: i,
                text,
                start_s,
            } => {
                assert_eq!(i, id);
                // A word comes with the frame its audio starts in.
                assert!(
                    start_s * 24_000.0 < pcm.len() as f64 + 1.0,
                    "{text} at {start_s} s before its audio ({} samples)",
                    pcm.len()
                );
                words.push((text, start_s));
            }
            d @ SpeechEvent::Done { .. } => return (pcm, words, d),
            SpeechEvent::Error { id: i, message } => panic!("response {i}: {message}"),
            SpeechEvent::Skipped { id: i, words } => panic!("response {i} skipped {words:?}"),
        }
    }
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: samples");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4 + 1.6e-5, "{what}: off by {worst}");
}

#[test]
fn whole_or_in_pieces_the_reference_speech_with_its_words() {
    let (tx, rx) = bounded(64);
    let (worker, speak) = TtsWorker::start(models(), tx).expect("worker");
    speak.say(1, "Hello, this is Parley.").expect("say");
    speak.end(1).expect("end");
    // The same text as an LLM would stream it, words split across pieces.
    for piece in ["Hel", "lo, th", "is is Par", "ley."] {
        speak.say(2, piece).expect("say");
    }
    speak.end(2).expect("end");
    let want = reference("s0_voice_a_audio.wav");
    for id in [1, 2] {
        let (pcm, words, done) = response(&rx, id);
        assert_close(&pcm, &want, &format!("response {id}"));
        let texts: Vec<&str> = words.iter().map(|w| w.0.as_str()).collect();
        assert_eq!(texts, ["Hello,", "this", "is", "Parley."], "response {id}");
        assert!(words.windows(2).all(|w| w[0].1 < w[1].1), "{words:?}");
        assert_eq!(
            done,
            SpeechEvent::Done {
                id,
                cancelled: false,
                failed: false,
                spoken: "Hello, this is Parley.".into(),
                frames: want.len() / 1920,
            }
        );
    }
    drop(speak);
    worker.join();
    assert!(rx.recv().is_err(), "nothing after the end");
}

#[test]
fn a_cancel_stops_at_once_and_the_next_response_is_whole() {
    let (tx, rx) = bounded(4);
    let (worker, speak) = TtsWorker::start(models(), tx).expect("worker");
    let long = "Hello, this is Parley. ".repeat(6);
    speak.say(1, &long).expect("say");
    speak.end(1).expect("end");
    // Text that has no words is an error for that response only; so is a response
    // ended before any text came (it must not wait for ever).
    speak.say(2, "   ").expect("say");
    speak.end(2).expect("end");
    speak.end(3).expect("end");
    speak.say(4, "Hello, this is Parley.").expect("say");
    speak.end(4).expect("end");
    let mut frames = 0;
    loop {
        match rx.recv_timeout(Duration::from_secs(60)).expect("event") {
            SpeechEvent::Audio { .. } => {
                frames += 1;
                if frames == 3 {
                    speak.cancel(1);
                }
            }
            SpeechEvent::Done {
                id,
                cancelled,
                spoken,
                frames: n,
                ..
            } => {
                assert_eq!(id, 1);
                assert!(cancelled);
                // The queue of 4 events and the step under way: a few frames at most.
                assert!(n <= 3 + 6, "{n} frames after a cancel at 3");
                assert!(long.starts_with(&spoken), "{spoken:?}");
                break;
            }
            _ => {}
        }
    }
    // It may have started (its first steps need no word yet) before the text ended.
    let mut e = rx.recv_timeout(Duration::from_secs(60)).expect("event");
    if e == (SpeechEvent::Started { id: 2 }) {
        e = rx.recv_timeout(Duration::from_secs(60)).expect("event");
    }
    match e {
        SpeechEvent::Error { id: 2, message } => assert!(message.contains("no words"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        rx.recv_timeout(Duration::from_secs(60)),
        Ok(SpeechEvent::Done {
            id: 2,
            failed: true,
            ..
        })
    ));
    match rx.recv_timeout(Duration::from_secs(60)).expect("event") {
        SpeechEvent::Error { id: 3, message } => assert!(message.contains("no words"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        rx.recv_timeout(Duration::from_secs(60)),
        Ok(SpeechEvent::Done {
            id: 3,
            failed: true,
            ..
        })
    ));
    let (pcm, _, _) = response(&rx, 4);
    assert_close(&pcm, &reference("s0_voice_a_audio.wav"), "after the cancel");
    drop(speak);
    worker.join();
}
