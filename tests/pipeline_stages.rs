//! The pipeline's stage contract end to end: a reply longer than its input plays out on
//! the output clock; a reply cancelled mid-sentence stops within one frame and the
//! session goes on; turn-taking on a real recording says when the user speaks and when
//! their turns end.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use parley_engine::audio::virtual_device::Pace;
use parley_engine::audio::{FrameSink, FrameSource, FRAME_LEN_SAMPLES};
use parley_engine::compute::gpu::DeviceChoice;
use parley_engine::compute::Dtype;
use parley_engine::pipeline::{
    Event, Frame, Mode, Models, NullSink, Outbox, Session, SessionOptions, Stage, TurnModels,
    TurnSettings, TurnSource,
};

/// `n` frames of silence, as fast as they are taken.
struct Silence {
    left: usize,
}

impl FrameSource for Silence {
    fn next_frame(&mut self, frame: &mut [f32; FRAME_LEN_SAMPLES]) -> parley_engine::Result<bool> {
        if self.left == 0 {
            return Ok(false);
        }
        self.left -= 1;
        frame.fill(0.0);
        Ok(true)
    }
}

/// A sink that takes `pace` per frame, like a device, and records when each frame began
/// to be written and its first sample.
struct PacedSink {
    pace: Duration,
    written: Arc<Mutex<Vec<(Instant, f32)>>>,
    reply_frames: Arc<AtomicUsize>,
}

impl FrameSink for PacedSink {
    fn write_frame(&mut self, frame: &[f32]) -> parley_engine::Result<()> {
        assert_eq!(frame.len(), FRAME_LEN_SAMPLES);
        self.written
            .lock()
            .expect("lock")
            .push((Instant::now(), frame[0]));
        if frame[0] != 0.0 {
            self.reply_frames.fetch_add(1, Ordering::SeqCst);
        }
        std::thread::sleep(self.pace);
        Ok(())
    }
    fn finish(&mut self) -> parley_engine::Result<()> {
        Ok(())
    }
}

/// At input frame `at`, queues a reply of `len` frames whose frame k is filled with
/// `(k + 1) / 1000` (so each is recognisable); records whether it was cancelled.
struct Reply {
    at: u64,
    len: usize,
    cancelled: Arc<AtomicBool>,
}

impl Stage for Reply {
    fn name(&self) -> &'static str {
        "reply-burst"
    }
    fn on_frame(&mut self, frame: &mut Frame, out: &mut Outbox<'_>) -> parley_engine::Result<()> {
        if frame.reported && frame.index == self.at {
            for k in 0..self.len {
                out.play(vec![(k + 1) as f32 / 1000.0; FRAME_LEN_SAMPLES])?;
            }
        }
        Ok(())
    }
    fn reset(&mut self) {}
    fn cancel(&mut self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }
}

struct Run {
    session: Session,
    events: crossbeam_channel::Receiver<Event>,
    written: Arc<Mutex<Vec<(Instant, f32)>>>,
    reply_frames: Arc<AtomicUsize>,
    cancelled: Arc<AtomicBool>,
}

/// Held by the tests that time the output clock and by every listen session: a listen
/// session keeps both cores busy, and the output thread then takes its ticks late (a tick
/// sent before a reply was queued can find the reply half-queued).
static CPU: Mutex<()> = Mutex::new(());

fn cpu_alone() -> std::sync::MutexGuard<'static, ()> {
    CPU.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn start(input_frames: usize, reply_at: u64, reply_len: usize, pace_ms: u64) -> Run {
    let written = Arc::new(Mutex::new(vec![]));
    let reply_frames = Arc::new(AtomicUsize::new(0));
    let cancelled = Arc::new(AtomicBool::new(false));
    let (tx, events) = bounded::<Event>(4096);
    let session = Session::start_stages(
        vec![Box::new(Reply {
            at: reply_at,
            len: reply_len,
            cancelled: cancelled.clone(),
        })],
        true,
        Mode::Duplex,
        Box::new(Silence { left: input_frames }),
        Box::new(PacedSink {
            pace: Duration::from_millis(pace_ms),
            written: written.clone(),
            reply_frames: reply_frames.clone(),
        }),
        tx,
        SessionOptions::default(),
    )
    .expect("start");
    Run {
        session,
        events,
        written,
        reply_frames,
        cancelled,
    }
}

fn ended(events: &[Event]) -> (u64, u64) {
    match events.last() {
        Some(Event::Ended {
            frames_in,
            frames_out,
        }) => (*frames_in, *frames_out),
        other => panic!("the last event should be Ended: {other:?}"),
    }
}

#[test]
fn a_reply_longer_than_its_input_plays_out_on_the_output_clock() {
    let _cpu = cpu_alone();
    let run = start(10, 2, 60, 0);
    let events: Vec<Event> = run.events.iter().collect();
    let _ = run.session.join();
    let (frames_in, frames_out) = ended(&events);
    assert_eq!(frames_in, 10);
    let written = run.written.lock().expect("lock");
    let values: Vec<f32> = written.iter().map(|w| w.1).collect();
    assert_eq!(frames_out, values.len() as u64);
    // Silence for the ticks the output clock took before the reply was queued (at most
    // the two frames before it), then the whole reply in order, past the input's end.
    let lead = values.iter().take_while(|&&v| v == 0.0).count();
    assert!(lead <= 2, "{values:?}");
    let reply: Vec<f32> = (0..60).map(|k| (k + 1) as f32 / 1000.0).collect();
    assert_eq!(&values[lead..], &reply[..], "{values:?}");
    // Per-stage metrics name the stage.
    let m = events
        .iter()
        .find_map(|e| match e {
            Event::Metrics(m) => Some(m.clone()),
            _ => None,
        })
        .expect("metrics");
    assert_eq!(m.stages.len(), 1);
    assert_eq!(m.stages[0].stage, "reply-burst");
}

#[test]
fn a_cancelled_reply_stops_within_one_frame_and_the_session_goes_on() {
    let _cpu = cpu_alone();
    // 80 input frames; a 60-frame reply from frame 2; a device taking 15 ms per frame.
    let run = start(80, 2, 60, 15);
    let cancel = run.session.canceller();
    let t0 = Instant::now();
    while run.reply_frames.load(Ordering::SeqCst) < 10 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the reply never played"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let cancelled_at = Instant::now();
    cancel.cancel();
    let events: Vec<Event> = run.events.iter().collect();
    let _ = run.session.join();
    // Every input frame went through, and every tick of the clock played something.
    assert_eq!(ended(&events), (80, 80));
    let written = run.written.lock().expect("lock");
    let after: Vec<f32> = written
        .iter()
        .filter(|w| w.0 >= cancelled_at)
        .map(|w| w.1)
        .collect();
    let reply_after = after.iter().filter(|&&v| v != 0.0).count();
    assert!(
        reply_after <= 1,
        "{reply_after} reply frames played after the cancel: {after:?}"
    );
    assert!(
        after.len() > 40,
        "the session went on: {} frames",
        after.len()
    );
    let played = written.iter().filter(|w| w.1 != 0.0).count();
    assert!((10..=11).contains(&played), "{played} reply frames played");
    let dropped = events
        .iter()
        .find_map(|e| match e {
            Event::ReplyCancelled { dropped_frames } => Some(*dropped_frames),
            _ => None,
        })
        .expect("a ReplyCancelled event");
    assert_eq!(played + dropped, 60, "played {played}, dropped {dropped}");
    assert!(
        run.cancelled.load(Ordering::SeqCst),
        "the stage was told to stop"
    );
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The dialogue (two turns, 0.50-3.76 s and 5.76-9.16 s) through listen mode with the
/// tiny STT fixture, turn-taking by `turn`, at `pace`; returns the events.
fn listen_to_dialogue(turn: TurnModels, pace: Pace) -> Vec<Event> {
    let pcm =
        parley_engine::audio::file::read_audio_24k(&repo().join("assets/speech/dialogue.wav"))
            .expect("dialogue");
    listen(turn, pcm, pace)
}

/// `pcm` through listen mode with the tiny STT fixture; returns the events.
fn listen(turn: TurnModels, pcm: Vec<f32>, pace: Pace) -> Vec<Event> {
    let _cpu = cpu_alone();
    let mut models = Models::load(
        &repo().join("tests/fixtures/stt-tiny"),
        Mode::Listen,
        DeviceChoice::Cpu,
        Dtype::F32,
        None,
    )
    .expect("fixture");
    models.turn = turn;
    let (tx, rx) = bounded::<Event>(1 << 16);
    let source = parley_engine::audio::virtual_device::FileSource::from_pcm_24k(pcm, pace);
    let session = Session::start(
        models,
        Box::new(source),
        Box::new(NullSink),
        tx,
        SessionOptions::default(),
    )
    .expect("start");
    let events: Vec<Event> = rx.iter().collect();
    session.join().expect("join");
    events
}

fn speech_runs(events: &[Event]) -> Vec<(f64, f64)> {
    let mut runs = vec![];
    let mut start = None;
    for e in events {
        match e {
            Event::SpeechStarted { time_s, .. } => start = Some(*time_s),
            Event::SpeechStopped { time_s, .. } => {
                runs.push((start.take().expect("a stop after a start"), *time_s))
            }
            _ => {}
        }
    }
    runs
}

/// At the pace of speech, the encoder starts each frame when its first half has been
/// heard (the audio-in thread hands it on 40 ms early) and the stages hear the same: the
/// transcript is the one of whole frames taken as fast as they come, and each frame's
/// metrics carry the early work apart from its latency.
#[test]
fn a_live_pace_begins_each_frame_early_and_transcribes_the_same() {
    let mut pcm =
        parley_engine::audio::file::read_audio_24k(&repo().join("assets/speech/dialogue.wav"))
            .expect("dialogue");
    pcm.truncate(24_000 * 3 + 500); // 3 s and a part of a frame
    let energy = || TurnModels::energy_only(TurnSettings::default());
    let live = listen(energy(), pcm.clone(), Pace::RealTime);
    let fast = listen(energy(), pcm, Pace::Unpaced);
    let text = |events: &[Event]| -> Vec<(String, u64)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::TextDelta { text, frame, .. } => Some((text.clone(), *frame)),
                _ => None,
            })
            .collect()
    };
    assert!(!text(&fast).is_empty(), "the fixture writes some text");
    assert_eq!(text(&live), text(&fast));
    let early: Vec<Vec<&'static str>> = live
        .iter()
        .filter_map(|e| match e {
            Event::Metrics(m) => Some(m.early.iter().map(|s| s.stage).collect()),
            _ => None,
        })
        .collect();
    // 38 frames of input, the last one partial: each began early, in the encode stage.
    assert_eq!(
        early.iter().filter(|e| *e == &["encode"]).count(),
        38,
        "{early:?}"
    );
    let unpaced_early = fast
        .iter()
        .any(|e| matches!(e, Event::Metrics(m) if !m.early.is_empty()));
    assert!(!unpaced_early, "unpaced frames come whole");
}

#[test]
fn energy_turn_taking_finds_the_dialogues_turns() {
    let events = listen_to_dialogue(
        TurnModels::energy_only(TurnSettings::default()),
        Pace::Unpaced,
    );
    let runs = speech_runs(&events);
    assert_eq!(runs.len(), 2, "{runs:?}");
    for ((s, e), (ws, we)) in runs.iter().zip([(0.50, 3.76), (5.76, 9.16)]) {
        assert!((s - ws).abs() < 0.2 && (e - we).abs() < 0.2, "{runs:?}");
    }
    let ends: Vec<(TurnSource, f64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::TurnEnd { source, time_s, .. } => Some((*source, *time_s)),
            _ => None,
        })
        .collect();
    assert_eq!(ends.len(), 2, "{ends:?}");
    assert!(ends.iter().all(|e| e.0 == TurnSource::Energy), "{ends:?}");
}

/// Silero VAD and Smart Turn (needs ONNX Runtime and the Smart Turn model from
/// scripts/setup.sh: skipped with the reason where missing, unless PARLEY_REQUIRE_ORT=1).
#[test]
fn model_turn_taking_finds_the_dialogues_turns_and_ends() {
    let turn = TurnModels::load();
    if turn.vad.is_none() || turn.smart_turn.is_none() {
        let why = format!("{turn:?}");
        assert_ne!(
            std::env::var("PARLEY_REQUIRE_ORT").as_deref(),
            Ok("1"),
            "PARLEY_REQUIRE_ORT=1 and the turn models are missing: {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    // At the pace of speech (11 s): Smart Turn's verdicts come from its own thread, as
    // they would live; unpaced, the model thread would run far ahead of them.
    let events = listen_to_dialogue(turn, Pace::RealTime);
    assert!(
        !events.iter().any(|e| matches!(e, Event::Warning { .. })),
        "no fallback with both models"
    );
    let runs = speech_runs(&events);
    assert_eq!(runs.len(), 2, "{runs:?}");
    for ((s, e), (ws, we)) in runs.iter().zip([(0.50, 3.76), (5.76, 9.16)]) {
        assert!((s - ws).abs() < 0.1 && (e - we).abs() < 0.1, "{runs:?}");
    }
    // Smart Turn judged every pause, on its own thread, and its verdicts came back.
    let verdicts: Vec<f32> = events
        .iter()
        .filter_map(|e| match e {
            Event::TurnSignal {
                source: TurnSource::SmartTurn,
                probability,
                ..
            } => Some(*probability),
            _ => None,
        })
        .collect();
    assert!(verdicts.len() >= 2, "{verdicts:?}");
    // The last turn ends by Smart Turn (0.97 there); other turn ends only where Smart Turn
    // judged a pause complete ("Hello there." is a whole sentence) or at a turn's end.
    let ends: Vec<(TurnSource, f32, f64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::TurnEnd {
                source,
                probability,
                time_s,
                ..
            } => Some((*source, *probability, *time_s)),
            _ => None,
        })
        .collect();
    // At most one per turn end (the first turn's 2.0 s pause is right at the 2 s limit,
    // so whether it ends there depends on Smart Turn's verdict, 0.4-0.6 on this voice).
    for end in [3.76, 9.16] {
        assert!(
            ends.iter().filter(|e| (e.2 - end).abs() < 0.1).count() <= 1,
            "one turn end at {end} s: {ends:?}"
        );
    }
    let last = ends.last().copied().expect("turn ends");
    assert_eq!(last.0, TurnSource::SmartTurn, "{ends:?}");
    assert!(last.1 > 0.5 && (last.2 - 9.16).abs() < 0.1, "{ends:?}");
    for e in &ends {
        let at_turn_end = [3.76, 9.16].iter().any(|t| (e.2 - t).abs() < 0.1);
        assert!(
            at_turn_end || (e.0 == TurnSource::SmartTurn && e.1 >= 0.5),
            "{ends:?}"
        );
    }
    // The energy baseline's signals come too.
    assert!(events.iter().any(|e| matches!(
        e,
        Event::TurnSignal {
            source: TurnSource::Energy,
            ..
        }
    )));
}
