//! The cascade end to end in a session: the tiny STT hears, SmolLM2 (the real GGUF that
//! `scripts/setup.sh` fetches) answers, the tiny TTS speaks. A user turn given as text
//! ("What is the capital of France?", injected where the STT's words go) gets a reply
//! whose text holds "Paris" and whose speech comes out as frames; user speech during a
//! reply cancels it at once and only the words played are kept. Skips, saying why, where
//! the LLM file is missing, unless PARLEY_REQUIRE_LLM=1 (CI).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};
use parley_engine::compute::gpu::DeviceChoice;
use parley_engine::compute::Dtype;
use parley_engine::llm::local::LocalLlm;
use parley_engine::llm::{History, ReplyOptions};
use parley_engine::pipeline::speak::SpeakModels;
use parley_engine::pipeline::{
    CascadeInbox, CascadeModels, Event, EventSink, Mode, Models, PcmSource, Session,
    SessionOptions, Speaker,
};

const FRAME: usize = 1920;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn models() -> Option<(Models, CascadeInbox)> {
    let llm = parley_engine::llm::test_llm()?;
    let mut m = Models::load(
        &fixture("stt-tiny"),
        Mode::Cascade,
        DeviceChoice::Cpu,
        Dtype::F32,
        None,
    )
    .expect("stt");
    let tts = fixture("tts-tiny");
    let voice = tts.join("voice_a.safetensors");
    let mut speak = SpeakModels::load(
        &tts,
        voice.to_str().expect("utf-8"),
        "2.0",
        DeviceChoice::Cpu,
        Dtype::F32,
        None,
    )
    .expect("tts");
    speak.opts.temp = 0.0;
    let (c, inbox) = CascadeModels::new(
        Box::new(LocalLlm::load(&llm, 0).expect("llm")),
        speak,
        History::new("You are a helpful assistant.", 4),
        ReplyOptions {
            temperature: 0.0,
            max_tokens: 40,
            seed: 0,
        },
    );
    m.cascade = Some(c);
    assert_eq!(m.mode(), Mode::Cascade);
    Some((m, inbox))
}

/// The recording's samples (speech), at 24 kHz.
fn speech() -> Vec<f32> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/speech/dialogue.wav");
    hound::WavReader::open(p)
        .expect("wav")
        .into_samples::<i16>()
        .map(|s| s.expect("sample") as f32 / 32768.0)
        .collect()
}

/// Runs a session fed frames in real time-ish (every 20 ms) by `feed(frame_index)` until
/// `done` says so (or a minute), returning every event.
fn run(
    m: Models,
    inbox: CascadeInbox,
    feed: impl Fn(usize) -> Vec<f32> + Send + 'static,
    on_event: impl Fn(&Event, &CascadeInbox, &AtomicUsize) -> bool,
) -> Vec<Event> {
    run_and_return(m, &inbox, feed, on_event).0
}

/// [`run`], giving back the models the session returns.
fn run_and_return(
    m: Models,
    inbox: &CascadeInbox,
    feed: impl Fn(usize) -> Vec<f32> + Send + 'static,
    on_event: impl Fn(&Event, &CascadeInbox, &AtomicUsize) -> bool,
) -> (Vec<Event>, Models) {
    let (pcm_tx, pcm_rx) = bounded::<Vec<f32>>(8);
    let (ev_tx, ev_rx): (_, Receiver<Event>) = bounded(1024);
    let session = Session::start(
        m,
        Box::new(PcmSource::new(pcm_rx)),
        Box::new(EventSink::new(ev_tx.clone())),
        ev_tx,
        SessionOptions::default(),
    )
    .expect("session");
    let stop = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(AtomicUsize::new(0));
    let (s, p) = (stop.clone(), phase.clone());
    let feeder = std::thread::spawn(move || {
        let t = Instant::now();
        let mut i = 0;
        while !s.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(60) {
            let f = feed(i + 100_000 * p.load(Ordering::SeqCst));
            if pcm_tx.send(f).is_err() {
                break;
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut events = vec![];
    for e in ev_rx.iter() {
        let end = matches!(e, Event::Ended { .. });
        if on_event(&e, inbox, &phase) {
            stop.store(true, Ordering::SeqCst);
        }
        events.push(e);
        if end {
            break;
        }
    }
    feeder.join().expect("feeder");
    let models = session.join().expect("join");
    (events, models)
}

fn reply_text(events: &[Event]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ResponseText { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

/// One session in which the user types "What is the capital of France?".
fn ask_the_capital(m: Models, inbox: &CascadeInbox) -> (Vec<Event>, Models) {
    let silence = |_| vec![0f32; FRAME];
    run_and_return(m, inbox, silence, |e, inbox, phase| {
        // Once the session runs, the user's turn as text.
        if matches!(e, Event::Started { .. }) && phase.swap(1, Ordering::SeqCst) == 0 {
            inbox
                .send("What is the capital of France?".into())
                .expect("inbox");
        }
        matches!(e, Event::ResponseDone { .. })
    })
}

#[test]
fn a_text_turn_gets_a_spoken_answer_from_the_real_llm() {
    let Some((m, inbox)) = models() else { return };
    let (events, m) = ask_the_capital(m, &inbox);
    let text = reply_text(&events);
    assert!(text.contains("Paris"), "{text}");
    // The session hands the LLM and the TTS back for the next one, with a fresh history:
    // the same question gets the same (greedy) answer.
    let back = m.cascade.as_ref().expect("the cascade's models come back");
    assert_eq!(back.history.turns().count(), 0, "a new conversation");
    assert_eq!(m.mode(), Mode::Cascade);
    let (again, _) = ask_the_capital(m, &inbox);
    assert_eq!(reply_text(&again), text);
    let done = events
        .iter()
        .find_map(|e| match e {
            Event::ResponseDone {
                cancelled,
                spoken,
                timing,
                ..
            } => Some((*cancelled, spoken.clone(), *timing)),
            _ => None,
        })
        .expect("response.done");
    assert!(!done.0, "completed");
    // The words written were spoken, in order (the tiny voice's tokenizer knows few
    // letters: a word it cannot say at all is skipped).
    let written: Vec<&str> = text.split_whitespace().collect();
    let spoken: Vec<&str> = done.1.split_whitespace().collect();
    let mut rest = written.iter();
    assert!(
        spoken.iter().all(|w| rest.any(|x| x == w)),
        "{spoken:?} not in order in {written:?}"
    );
    assert!(spoken.iter().any(|w| w.contains("Paris")), "{spoken:?}");
    assert!(done.2.llm_first_token_ms.is_some() && done.2.tts_first_audio_ms.is_some());
    // Its speech came out of the session as audio frames.
    let loud = events
        .iter()
        .filter(|e| matches!(e, Event::Audio { pcm, .. } if pcm.iter().any(|v| v.abs() > 1e-3)))
        .count();
    assert!(loud > 5, "{loud} frames of speech");
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::ResponseStarted { .. })));
}

#[test]
fn user_speech_during_a_reply_cancels_it_and_keeps_what_was_played() {
    let Some((m, inbox)) = models() else { return };
    let speech = Arc::new(speech());
    let sp = speech.clone();
    // Silence, then (phase 2, once the reply's audio plays) the user speaking.
    let feed = move |i: usize| {
        if i >= 200_000 {
            let k = (i - 200_000) * FRAME;
            let start = (k + FRAME * 6).min(sp.len() - FRAME);
            sp[start..start + FRAME].to_vec()
        } else {
            vec![0f32; FRAME]
        }
    };
    let events = run(m, inbox, feed, |e, inbox, phase| {
        match e {
            Event::Started { .. } if phase.swap(1, Ordering::SeqCst) == 0 => {
                inbox
                    .send("Tell me about Paris, the capital of France.".into())
                    .expect("inbox");
            }
            Event::Audio { pcm, .. } if pcm.iter().any(|v| v.abs() > 1e-3) => {
                let _ = phase.compare_exchange(1, 2, Ordering::SeqCst, Ordering::SeqCst);
            }
            _ => {}
        }
        matches!(e, Event::ResponseDone { .. })
    });
    let (cancelled, spoken) = events
        .iter()
        .find_map(|e| match e {
            Event::ResponseDone {
                cancelled, spoken, ..
            } => Some((*cancelled, spoken.clone())),
            _ => None,
        })
        .expect("response.done");
    assert!(cancelled, "the reply was not cancelled");
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::ReplyCancelled { .. })));
    let written = reply_text(&events);
    let w: Vec<&str> = written.split_whitespace().collect();
    let s: Vec<&str> = spoken.split_whitespace().collect();
    assert!(
        s.len() < w.len() && w.starts_with(&s),
        "spoken {s:?} of {w:?}"
    );
    // After the cancel, at most one frame of the reply's speech still played: then only
    // the output clock's silence.
    let at = events
        .iter()
        .position(|e| matches!(e, Event::ReplyCancelled { .. }))
        .expect("cancel");
    let after = events[at..]
        .iter()
        .filter(|e| matches!(e, Event::Audio { pcm, .. } if pcm.iter().any(|v| v.abs() > 1e-3)))
        .count();
    assert!(after <= 1, "{after} frames of speech after the cancel");
}

/// At the end of a spoken turn the STT brings out the words its 0.5 s delay still holds
/// (steps on silence at once, the frame after the decision), and the reply answers them
/// all: the turn the LLM gets is everything the STT wrote up to that frame, and that
/// frame carries the flush's extra steps.
#[test]
fn a_spoken_turn_is_answered_with_its_last_words() {
    let Some((m, inbox)) = models() else { return };
    let speech = Arc::new(speech());
    let sp = speech.clone();
    // The dialogue's first turn (it ends at 3.76 s), then silence.
    let turn_end = (3.9 * 24_000.0) as usize;
    let feed = move |i: usize| {
        let k = (i % 100_000) * FRAME;
        if k + FRAME <= turn_end {
            sp[k..k + FRAME].to_vec()
        } else {
            vec![0f32; FRAME]
        }
    };
    let events = run(m, inbox, feed, |e, _, _| {
        matches!(e, Event::ResponseDone { .. })
    });
    let decided = events
        .iter()
        .find_map(|e| match e {
            Event::TurnEnd { frame, .. } => Some(*frame),
            _ => None,
        })
        .expect("an end of turn");
    let (asked, at) = events
        .iter()
        .find_map(|e| match e {
            Event::UserTurn {
                text,
                frame,
                typed: false,
            } => Some((text.clone(), *frame)),
            _ => None,
        })
        .expect("the user's turn");
    assert_eq!(
        at,
        decided + 1,
        "the turn goes to the LLM the frame after the decision"
    );
    let heard: String = events
        .iter()
        .filter_map(|e| match e {
            Event::TextDelta {
                speaker: Speaker::User,
                text,
                frame,
            } if *frame <= at => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(asked, heard.trim());
    // A frame's own step writes one piece at most; the flush's steps wrote more.
    let in_flush_frame = events
        .iter()
        .filter(
            |e| matches!(e, Event::TextDelta { speaker: Speaker::User, frame, .. } if *frame == at),
        )
        .count();
    assert!(
        in_flush_frame >= 2,
        "{in_flush_frame} pieces in the flush frame"
    );
}
