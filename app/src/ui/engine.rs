//! The engine behind the window: a controller thread that loads models, opens devices and
//! runs sessions, so the UI thread never waits. The UI sends [`Command`]s and drains
//! [`FromEngine`] messages each frame without blocking; the controller wakes the UI with
//! `request_repaint` when something arrives.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use parley_engine::audio::device::{event_channel, list_devices, DeviceList, DeviceOptions};
use parley_engine::audio::echo::{echo_cancelling, AecSettings};
use parley_engine::audio::reopen::{ReopenOptions, ReopeningMic, ReopeningSpeaker};
use parley_engine::audio::virtual_device::{FileSource, Pace};
use parley_engine::audio::{AudioEvent, FrameSink, FrameSource, FRAME_LEN_SAMPLES};
use parley_engine::compute::gpu::DeviceChoice;
use parley_engine::compute::Dtype;
use parley_engine::pipeline::{
    CascadeInbox, Event, Mode, Models, NullSink, Session, SessionOptions, Stopper,
};

use super::settings::{Input, Settings};

#[derive(Debug)]
pub enum Command {
    Start(Box<Settings>),
    Stop,
    /// A user turn typed rather than said (cascade mode).
    Say(String),
    /// List audio devices and GPU adapters.
    Probe,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Idle,
    Loading(String),
    Running {
        mode: Mode,
        device: String,
    },
    /// Stopped after a session (its events are all delivered).
    Stopped,
}

#[derive(Debug)]
pub enum FromEngine {
    Status(Status),
    Event(Event),
    /// Something failed before or outside a session: what, and what to do about it.
    Problem {
        what: String,
        hint: String,
    },
    Devices(Box<DeviceList>),
    Adapters(Vec<String>),
}

/// The UI's side of the controller.
pub struct Engine {
    tx: Sender<Command>,
    rx: Receiver<FromEngine>,
    pub muted: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Engine")
    }
}

impl Engine {
    pub fn spawn(repaint: impl Fn() + Send + Sync + 'static) -> Self {
        let (tx, cmd_rx) = unbounded();
        let (out_tx, rx) = unbounded();
        let muted = Arc::new(AtomicBool::new(false));
        let m = muted.clone();
        let spawned = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || controller(cmd_rx, out_tx, m, repaint));
        let thread = spawned
            .map_err(|e| eprintln!("parley: cannot start the engine thread: {e}"))
            .ok();
        Self {
            tx,
            rx,
            muted,
            thread,
        }
    }

    pub fn send(&self, c: Command) {
        let _ = self.tx.send(c);
    }

    /// Everything that arrived since the last call; never blocks.
    pub fn drain(&self) -> Vec<FromEngine> {
        self.rx.try_iter().collect()
    }
}

/// Closing the window ends the controller: its session stops and its models (llama.cpp's
/// among them) are freed before the process exits, not while exit tears the libraries
/// down (which corrupted the heap at the end of a test run).
impl Drop for Engine {
    fn drop(&mut self) {
        drop(std::mem::replace(&mut self.tx, unbounded().0));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Silences the input while muted.
struct MuteSource {
    inner: Box<dyn FrameSource>,
    muted: Arc<AtomicBool>,
}

impl FrameSource for MuteSource {
    fn next_frame(&mut self, frame: &mut [f32; FRAME_LEN_SAMPLES]) -> parley_engine::Result<bool> {
        let more = self.inner.next_frame(frame)?;
        if self.muted.load(Ordering::Relaxed) {
            frame.fill(0.0);
        }
        Ok(more)
    }

    fn latency(&self) -> Option<std::time::Duration> {
        self.inner.latency()
    }
}

struct Running {
    session: Session,
    stopper: Stopper,
    forward: std::thread::JoinHandle<()>,
    key: Key,
    /// Where typed turns go (cascade mode).
    inbox: Option<CascadeInbox>,
}

/// What models were loaded for: directory, mode, device, precision, and for the cascade
/// its LLM, endpoint model, speech model directory and voice.
type Key = (String, Mode, String, String, String);

/// Models kept between sessions, keyed by what they were loaded for, with the cascade's
/// text inbox.
type Cache = Option<(Key, Models, Option<CascadeInbox>)>;

fn controller(
    commands: Receiver<Command>,
    out: Sender<FromEngine>,
    muted: Arc<AtomicBool>,
    repaint: impl Fn() + Send + Sync + 'static,
) {
    let repaint: Arc<dyn Fn() + Send + Sync> = Arc::new(repaint);
    let send = |m: FromEngine| {
        let _ = out.send(m);
        repaint();
    };
    let mut cache: Cache = None;
    let mut running: Option<Running> = None;
    for cmd in commands.iter() {
        match cmd {
            Command::Probe => {
                match list_devices() {
                    Ok(d) => send(FromEngine::Devices(Box::new(d))),
                    Err(e) => send(FromEngine::Problem {
                        what: format!("listing audio devices: {e}"),
                        hint: "Is a sound server (PulseAudio, PipeWire) or ALSA device available?"
                            .into(),
                    }),
                }
                let lines = parley_engine::compute::gpu::describe_choices();
                send(FromEngine::Adapters(lines));
            }
            Command::Stop => {
                if let Some(r) = running.take() {
                    cache = finish(r);
                }
                send(FromEngine::Status(Status::Stopped));
            }
            Command::Say(text) => {
                let sent = running
                    .as_ref()
                    .and_then(|r| r.inbox.as_ref())
                    .is_some_and(|i| i.try_send(text).is_ok());
                if !sent {
                    send(FromEngine::Problem {
                        what: "the message was not sent".into(),
                        hint: "Typed messages go to a running Cascade session: pick Cascade and press Start (or wait for the reply under way).".into(),
                    });
                }
            }
            Command::Start(settings) => {
                if let Some(r) = running.take() {
                    cache = finish(r);
                }
                match start(&settings, &mut cache, &muted, &out, repaint.clone(), &send) {
                    Ok(r) => running = Some(r),
                    Err((what, hint)) => {
                        send(FromEngine::Problem { what, hint });
                        send(FromEngine::Status(Status::Idle));
                    }
                }
            }
        }
    }
    if let Some(r) = running.take() {
        let _ = finish(r);
    }
}

/// Stops a session, waits for its last events, and keeps its models.
fn finish(r: Running) -> Cache {
    r.stopper.stop();
    let models = r.session.join().ok();
    let _ = r.forward.join();
    models.map(|m| (r.key, m, r.inbox))
}

fn start(
    s: &Settings,
    cache: &mut Cache,
    muted: &Arc<AtomicBool>,
    out: &Sender<FromEngine>,
    repaint: Arc<dyn Fn() + Send + Sync>,
    send: &impl Fn(FromEngine),
) -> Result<Running, (String, String)> {
    let dir = s.model_dir().trim().to_string();
    if dir.is_empty() {
        return Err((
            format!("no model directory for {} mode", s.mode),
            "Choose one in Models (a directory laid out like the Kyutai repository), or pull a preset with `parley models pull`.".into(),
        ));
    }
    let cascade_key = if s.mode == Mode::Cascade {
        check_cascade(s)?;
        [&s.llm, &s.llm_model, &s.tts_model_dir, &s.tts_voice]
            .map(|v| v.trim())
            .join("\n")
    } else {
        String::new()
    };
    let key = (
        dir.clone(),
        s.mode,
        s.device.clone(),
        s.precision.clone(),
        cascade_key,
    );
    let (mut models, mut inbox) = match cache.take() {
        Some((k, m, inbox)) if k == key => (m, inbox),
        _ => {
            send(FromEngine::Status(Status::Loading(format!(
                "loading {dir}"
            ))));
            let (device, dtype) = compute(s)?;
            let m = Models::load(Path::new(&dir), s.mode, device, dtype, None).map_err(|e| {
                (
                    format!("the model failed to load: {e}"),
                    format!("Check the {} model directory in Models: it needs config.json, the model and Mimi weights and the tokenizer, for a {} model.", s.mode, if s.mode == Mode::Duplex { "Moshi-style" } else { "speech-to-text" }),
                )
            })?;
            (m, None)
        }
    };
    if s.mode == Mode::Cascade && models.cascade.is_none() {
        send(FromEngine::Status(Status::Loading(format!(
            "loading the LLM ({}) and the speech model",
            s.llm.trim()
        ))));
        let (c, i) = load_cascade(s)?;
        models.cascade = Some(c);
        inbox = Some(i);
    }
    if let Some(c) = &mut models.cascade {
        c.history.system = s.persona.clone();
    }
    let (audio_tx, audio_rx) = event_channel();
    let mut opts = SessionOptions {
        drop_events_when_full: true,
        levels: true,
        audio_stats: None,
        aec_stats: None,
    };
    let source: Box<dyn FrameSource> = match &s.input {
        Input::Device(name) => {
            let dev = DeviceOptions {
                events: Some(audio_tx.clone()),
                ..DeviceOptions::default()
            };
            opts.audio_stats = Some(dev.stats.clone());
            Box::new(
                ReopeningMic::open(name.as_deref(), dev, ReopenOptions::default()).map_err(
                    |e| {
                        (
                            format!("no microphone: {e}"),
                            "Connect a microphone or pick another input device, then press Start."
                                .into(),
                        )
                    },
                )?,
            )
        }
        Input::File { path, realtime } => Box::new(
            FileSource::open(
                Path::new(path),
                if *realtime {
                    Pace::RealTime
                } else {
                    Pace::Unpaced
                },
            )
            .map_err(|e| {
                (
                    format!("the input recording: {e}"),
                    "Pick another recording.".into(),
                )
            })?,
        ),
    };
    let source = Box::new(MuteSource {
        inner: source,
        muted: muted.clone(),
    });
    let (source, sink): (Box<dyn FrameSource>, Box<dyn FrameSink>) =
        if matches!(s.mode, Mode::Duplex | Mode::Cascade)
            && s.play_output
            && matches!(s.input, Input::Device(_))
        {
            let dev = DeviceOptions {
                events: Some(audio_tx),
                stats: opts.audio_stats.clone().unwrap_or_default(),
                ..DeviceOptions::default()
            };
            let speaker =
                ReopeningSpeaker::open(s.output_device.as_deref(), dev, ReopenOptions::default())
                    .map_err(|e| {
                    (
                format!("no speakers: {e}"),
                "Connect headphones or speakers, pick another output device, or turn playback off."
                    .into(),
            )
                })?;
            // Echo cancellation between the live microphone and speakers only: its reference
            // is what this session plays there.
            if s.echo_cancellation.enabled_for(&speaker.device_name()) {
                let (source, sink, stats) =
                    echo_cancelling(source, Box::new(speaker), AecSettings::default());
                opts.aec_stats = Some(stats);
                (source, sink)
            } else {
                (source, Box::new(speaker))
            }
        } else {
            (source, Box::new(NullSink))
        };
    let (ev_tx, ev_rx) = bounded::<Event>(1024);
    let device_line = models.device.clone();
    let mode = s.mode;
    let session = Session::start(models, source, sink, ev_tx, opts)
        .map_err(|e| (format!("starting the session: {e}"), "Try again.".into()))?;
    let stopper = session.stopper();
    send(FromEngine::Status(Status::Running {
        mode,
        device: device_line,
    }));
    let out = out.clone();
    let forward = std::thread::Builder::new()
        .name("engine-events".into())
        .spawn(move || {
            loop {
                crossbeam_channel::select! {
                    recv(ev_rx) -> e => match e {
                        Ok(e) => {
                            let ended = matches!(e, Event::Ended { .. });
                            let _ = out.send(FromEngine::Event(e));
                            repaint();
                            if ended { break; }
                        }
                        Err(_) => break,
                    },
                    recv(audio_rx) -> a => if let Ok(a) = a {
                        let (what, hint) = match a {
                            AudioEvent::DeviceLost { name, reason, direction } => (
                                format!("audio {direction} lost: {name}: {reason}"),
                                "Reconnect it: the session goes on once it is back (it stops after 5 minutes without it).",
                            ),
                            AudioEvent::Reopened { name, direction } => (
                                format!("audio {direction} back: {name}"),
                                "The session goes on.",
                            ),
                            AudioEvent::StreamError { name, reason, direction } => (
                                format!("audio {direction} error: {name}: {reason}"),
                                "If it keeps happening, pick another device.",
                            ),
                        };
                        let _ = out.send(FromEngine::Problem { what, hint: hint.into() });
                        repaint();
                    },
                }
            }
            let _ = out.send(FromEngine::Status(Status::Stopped));
            repaint();
        })
        .map_err(|e| (format!("starting the event thread: {e}"), "Try again.".into()))?;
    Ok(Running {
        session,
        stopper,
        forward,
        key,
        inbox,
    })
}

/// The device and weight format the settings name.
fn compute(s: &Settings) -> Result<(DeviceChoice, Dtype), (String, String)> {
    let device: DeviceChoice = s
        .device
        .parse()
        .map_err(|e: String| (e, "Pick auto, gpu or cpu.".into()))?;
    let dtype: Dtype = s
        .precision
        .parse()
        .map_err(|e: String| (e, "Pick a weight format in Settings.".into()))?;
    Ok((device, dtype))
}

/// What the cascade needs besides the listen model, or what is missing and where to set it.
fn check_cascade(s: &Settings) -> Result<(), (String, String)> {
    let missing =
        |what: &str, hint: &str| Err((format!("no {what} for Cascade mode"), hint.into()));
    if s.llm.trim().is_empty() {
        return missing(
            "LLM",
            "Under Cascade on the left: press Use beside a downloaded LLM, or enter a GGUF file or an endpoint's URL.",
        );
    }
    if s.tts_model_dir.trim().is_empty() {
        return missing(
            "speech model",
            "Under Speech model on the left: download tts-1.6b-en_fr and press Use, or enter its directory.",
        );
    }
    if s.tts_voice.trim().is_empty() {
        return missing(
            "voice",
            "Under Speech model on the left: download the voices and press Use beside one, or enter a voice file.",
        );
    }
    Ok(())
}

/// The cascade's LLM and speech model, as the settings say.
fn load_cascade(
    s: &Settings,
) -> Result<(parley_engine::pipeline::CascadeModels, CascadeInbox), (String, String)> {
    use parley_engine::llm::{History, LlmSource, ReplyOptions};
    use parley_engine::pipeline::speak::SpeakModels;
    let llm = LlmSource::parse(
        &s.llm,
        Some(s.llm_model.as_str()),
        std::time::Duration::from_secs(30),
    )
    .and_then(|src| src.open())
    .map_err(|e| {
        (
            format!("the LLM: {e}"),
            "Under Cascade on the left: use a downloaded LLM preset, a GGUF chat model file, or an OpenAI-compatible endpoint's URL with the model it serves.".into(),
        )
    })?;
    let (device, dtype) = compute(s)?;
    let speak = SpeakModels::load(
        Path::new(s.tts_model_dir.trim()),
        s.tts_voice.trim(),
        "2.0",
        device,
        dtype,
        None,
    )
    .map_err(|e| {
        (
            format!("the speech model: {e}"),
            "Check the speech model directory (laid out like kyutai/tts-1.6b-en_fr) and the voice under Speech model.".into(),
        )
    })?;
    Ok(parley_engine::pipeline::CascadeModels::new(
        llm,
        speak,
        History::new(s.persona.clone(), 8),
        ReplyOptions::default(),
    ))
}
