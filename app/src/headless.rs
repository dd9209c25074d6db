//! `parley headless`: a session without a window, talking JSON Lines (or raw PCM) over
//! stdin and stdout, or the real microphone and speakers with events on stdout. Every
//! event is documented with an example in docs/headless.md.

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use base64::Engine as _;
use clap::Args;
use crossbeam_channel::{bounded, Sender};
use parley_engine::audio::device::{event_channel, DeviceOptions};
use parley_engine::audio::echo::{echo_cancelling, AecMode, AecSettings};
use parley_engine::audio::reopen::{ReopenOptions, ReopeningMic, ReopeningSpeaker};
use parley_engine::audio::{AudioEvent, FrameSink, FrameSource, FRAME_LEN_SAMPLES};
use parley_engine::compute::gpu::DeviceChoice;
use parley_engine::compute::Dtype;
use parley_engine::pipeline::{
    Canceller, CascadeInbox, Event, EventSink, Mode, Models, NullSink, PcmSource, Session,
    SessionOptions, Speaker, TurnModels, TurnSettings,
};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AudioIo {
    /// The default (or named) microphone and speakers.
    Mic,
    /// Audio in and out through stdin and stdout.
    Stdin,
}

/// What a headless session does: a pipeline mode, or the TTS alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadlessMode {
    Pipeline(Mode),
    /// The TTS says the assistant's text (`conversation.item.create`).
    Speak,
}

impl std::str::FromStr for HeadlessMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "speak" => Ok(Self::Speak),
            other => other
                .parse()
                .map(Self::Pipeline)
                .map_err(|_| format!("unknown mode `{other}` (duplex, listen or speak)")),
        }
    }
}

#[derive(Debug, Args)]
pub struct HeadlessArgs {
    /// A model directory laid out like a Kyutai repository (the TTS's with --mode speak,
    /// where --tts-model-dir may say it instead; the STT's with --mode cascade, where
    /// --stt-model-dir says the same).
    #[arg(long, alias = "stt-model-dir")]
    model_dir: Option<PathBuf>,
    /// duplex (a Moshi-style model), listen (a speech-to-text model) or speak (the
    /// text-to-speech model says the assistant's text).
    #[arg(long, default_value = "duplex")]
    mode: HeadlessMode,
    #[command(flatten)]
    speech: crate::cascade_args::SpeechArgs,
    #[command(flatten)]
    llm: crate::cascade_args::LlmArgs,
    #[arg(long, value_enum, default_value = "stdin")]
    audio: AudioIo,
    /// With --audio stdin: raw PCM16 LE 24 kHz mono on stdin, the reply as raw PCM16 on
    /// stdout, events as JSON Lines on stderr.
    #[arg(long)]
    raw: bool,
    /// Capture device name (--audio mic); `parley devices` lists them.
    #[arg(long)]
    input_device: Option<String>,
    /// Playback device name (--audio mic).
    #[arg(long)]
    output_device: Option<String>,
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    #[arg(long, alias = "dtype", default_value = "auto")]
    precision: Dtype,
    /// Turn-taking: silence (ms) after which speech is called stopped.
    #[arg(long, default_value_t = TurnSettings::default().vad.min_silence_ms)]
    min_silence_ms: f64,
    /// Turn-taking: Smart Turn's probability at which a turn is complete.
    #[arg(long, default_value_t = TurnSettings::default().smart_turn_threshold)]
    smart_turn_threshold: f32,
    /// Turn-taking: silence (ms) after which a turn is over whatever the models say.
    #[arg(long, default_value_t = TurnSettings::default().max_pause_ms)]
    max_pause_ms: f64,
    /// Echo cancellation on the microphone (--audio mic, duplex and cascade): what Parley
    /// plays is removed from what it hears. auto: on unless the output device's name says
    /// it is a headset or headphones; on; off.
    #[arg(long, default_value = "auto")]
    aec: AecMode,
    /// With echo cancellation: WebRTC's noise suppressor after it (moderate, ~12 dB).
    #[arg(long)]
    noise_suppression: bool,
}

/// The turn-taking settings the flags ask for, checked.
fn turn_settings(args: &HeadlessArgs) -> Result<TurnSettings> {
    let d = TurnSettings::default();
    if !(100.0..=10_000.0).contains(&args.min_silence_ms) {
        anyhow::bail!(
            "--min-silence-ms {} is outside 100..=10000",
            args.min_silence_ms
        );
    }
    if !(0.0..=1.0).contains(&args.smart_turn_threshold) {
        anyhow::bail!(
            "--smart-turn-threshold {} is outside 0..=1",
            args.smart_turn_threshold
        );
    }
    if !(args.min_silence_ms..=60_000.0).contains(&args.max_pause_ms) {
        anyhow::bail!(
            "--max-pause-ms {} must be between --min-silence-ms and 60000",
            args.max_pause_ms
        );
    }
    Ok(TurnSettings {
        vad: parley_engine::models::vad::VadSettings {
            min_silence_ms: args.min_silence_ms,
            ..d.vad
        },
        smart_turn_threshold: args.smart_turn_threshold,
        max_pause_ms: args.max_pause_ms,
        ..d
    })
}

pub fn run(args: HeadlessArgs) -> Result<()> {
    if args.raw && args.audio == AudioIo::Mic {
        anyhow::bail!("--raw carries audio over stdin and stdout: it needs --audio stdin");
    }
    if args.audio == AudioIo::Stdin && (args.aec == AecMode::On || args.noise_suppression) {
        anyhow::bail!(
            "echo cancellation works on the live devices, where Parley hears what it plays: \
             --aec on and --noise-suppression need --audio mic (with --audio stdin the client \
             sends audio that never went through Parley's speakers)"
        );
    }
    let mode = match args.mode {
        HeadlessMode::Speak => return run_speak(&args),
        HeadlessMode::Pipeline(m) => m,
    };
    if mode == Mode::Listen && args.aec == AecMode::On {
        anyhow::bail!(
            "--aec on: listen mode plays nothing, so there is no echo to cancel \
             (echo cancellation runs in duplex and cascade mode)"
        );
    }
    if args.noise_suppression && args.aec == AecMode::Off {
        anyhow::bail!(
            "--noise-suppression runs after echo cancellation: it needs --aec auto or on"
        );
    }
    let Some(model_dir) = &args.model_dir else {
        anyhow::bail!("--mode {mode} needs --model-dir");
    };
    let settings = turn_settings(&args)?;
    let mut models = Models::load(model_dir, mode, args.device, args.precision, None)
        .context("loading the models")?;
    if settings != TurnSettings::default() {
        models.turn = TurnModels::with_settings(settings);
    }
    let inbox = if mode == Mode::Cascade {
        let (c, inbox) = crate::cascade_args::cascade_models(
            &args.speech,
            &args.llm,
            args.device,
            args.precision,
        )
        .context("loading the cascade's LLM and TTS")?;
        models.cascade = Some(c);
        Some(inbox)
    } else {
        None
    };
    let (ev_tx, ev_rx) = bounded::<Event>(256);
    let mut opts = SessionOptions::default();
    // The stdin reader starts after the session, which sends `session.created` as it
    // starts: an error about a bad line can never come before it.
    let mut reader = None;
    // Where a signal says that the stdin audio has ended (the reader may be waiting for a
    // line that never comes).
    let mut end_input = None;
    let (source, sink): (Box<dyn FrameSource>, Box<dyn FrameSink>) = match args.audio {
        AudioIo::Mic => {
            // One set of counters for both streams, reported with every frame's metrics.
            // A device that disappears is reopened when it comes back (the session goes
            // on); its loss and return are `parley.warning` events.
            let (audio_tx, audio_rx) = event_channel();
            let dev = DeviceOptions {
                events: Some(audio_tx),
                ..DeviceOptions::default()
            };
            opts.audio_stats = Some(dev.stats.clone());
            let warnings = ev_tx.clone();
            std::thread::Builder::new()
                .name("audio-events".into())
                .spawn(move || {
                    for a in audio_rx.iter() {
                        let message = match a {
                            AudioEvent::DeviceLost { name, direction, reason } => format!(
                                "audio {direction} `{name}` lost ({reason}); reopening it when it is back"
                            ),
                            AudioEvent::Reopened { name, direction } => {
                                format!("audio {direction} `{name}` is back")
                            }
                            AudioEvent::StreamError { name, direction, reason } => {
                                format!("audio {direction} `{name}`: {reason}")
                            }
                        };
                        if warnings.send(Event::Warning { message }).is_err() {
                            break;
                        }
                    }
                })?;
            let source = ReopeningMic::open(
                args.input_device.as_deref(),
                dev.clone(),
                ReopenOptions::default(),
            )?;
            if mode == Mode::Listen {
                (Box::new(source), Box::new(NullSink))
            } else {
                let speaker = ReopeningSpeaker::open(
                    args.output_device.as_deref(),
                    dev,
                    ReopenOptions::default(),
                )?;
                let output = speaker.device_name();
                if args.aec.enabled_for(&output) {
                    eprintln!(
                        "echo cancellation: on (--aec {}, output `{output}`{})",
                        args.aec,
                        if args.noise_suppression {
                            ", noise suppression on"
                        } else {
                            ""
                        }
                    );
                    let settings = AecSettings {
                        noise_suppression: args.noise_suppression,
                    };
                    let (source, sink, stats) =
                        echo_cancelling(Box::new(source), Box::new(speaker), settings);
                    opts.aec_stats = Some(stats);
                    (source, sink)
                } else {
                    eprintln!(
                        "echo cancellation: off (--aec {}, output `{output}`)",
                        args.aec
                    );
                    (Box::new(source), Box::new(speaker))
                }
            }
        }
        AudioIo::Stdin => {
            let (pcm_tx, pcm_rx) = bounded::<Vec<f32>>(64);
            let end = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            end_input = Some(end.clone());
            let events = ev_tx.clone();
            let raw = args.raw;
            reader = Some(move |cancel: Canceller| {
                if raw {
                    read_raw(pcm_tx, events)
                } else {
                    read_json_lines(pcm_tx, events, cancel, inbox)
                }
            });
            let sink: Box<dyn FrameSink> = if raw {
                Box::new(RawStdoutSink)
            } else {
                Box::new(EventSink::new(ev_tx.clone()))
            };
            (Box::new(PcmSource::new(pcm_rx).ending_on(end)), sink)
        }
    };
    let session = Session::start(models, source, sink, ev_tx, opts)?;
    if let Some(reader) = reader {
        let cancel = session.canceller();
        if let Err(e) = std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || reader(cancel))
        {
            // The reader's sender went with it, so the source has ended: let the session
            // finish, then fail.
            session.stopper().stop();
            session.join()?;
            return Err(e).context("starting the stdin reader");
        }
    }
    // Ctrl-C, SIGTERM and SIGHUP end the input: the session flushes and closes as at the
    // end of a file.
    let stopper = session.stopper();
    if let Err(e) = ctrlc::set_handler(move || {
        stopper.stop();
        if let Some(end) = &end_input {
            // The stdin source may be waiting for audio that never comes.
            end.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }) {
        eprintln!("warning: Ctrl-C, SIGTERM and SIGHUP will not flush the session: {e}");
    }
    // Events go to stdout, or to stderr when stdout carries raw audio.
    let mut out: Box<dyn Write> = if args.raw {
        Box::new(std::io::stderr().lock())
    } else {
        Box::new(std::io::stdout().lock())
    };
    let mut fatal = None;
    for e in ev_rx.iter() {
        let ended = matches!(e, Event::Ended { .. });
        if let Event::Error {
            message,
            fatal: true,
        } = &e
        {
            fatal.get_or_insert_with(|| message.clone());
        }
        let stream = if args.raw { "stderr" } else { "stdout" };
        writeln!(out, "{}", to_json(&e))
            .and_then(|()| out.flush())
            .with_context(|| format!("writing events to {stream}"))?;
        if ended {
            break;
        }
    }
    session.join()?;
    // A session that had to stop early fails the process, after its events are out.
    match fatal {
        Some(m) => anyhow::bail!("the session stopped early: {m}"),
        None => Ok(()),
    }
}

/// `--mode speak`: the TTS alone (`speak.rs`).
fn run_speak(args: &HeadlessArgs) -> Result<()> {
    if args.raw {
        anyhow::bail!("--raw carries audio both ways; --mode speak takes text (JSON Lines)");
    }
    let sp = &args.speech;
    let Some(dir) = sp.tts_model_dir.as_ref().or(args.model_dir.as_ref()) else {
        anyhow::bail!("--mode speak needs --tts-model-dir (or --model-dir)");
    };
    if !(0.0..=10.0).contains(&sp.temp) {
        anyhow::bail!("--temp {} is outside 0..=10", sp.temp);
    }
    let Some(voice) = &sp.voice else {
        anyhow::bail!(
            "--mode speak needs --voice (a file from kyutai/tts-voices, or a pulled voice's name)"
        );
    };
    crate::speak::run(crate::speak::SpeakArgs {
        model_dir: dir,
        voice,
        cfg: &sp.cfg,
        codebooks: sp.codebooks,
        temp: sp.temp,
        device: args.device,
        precision: args.precision,
        speakers: (args.audio == AudioIo::Mic).then(|| args.output_device.clone()),
    })
}

/// The JSON line of an event (OpenAI Realtime names where one fits).
pub fn to_json(e: &Event) -> Value {
    let ms = |s: f64| (s * 1000.0).round() as i64;
    match e {
        Event::Started { mode, device } => {
            json!({"type": "session.created", "session": {"mode": mode, "device": device}})
        }
        Event::Warning { message } => json!({"type": "parley.warning", "message": message}),
        Event::TextDelta {
            speaker,
            text,
            frame,
        } => json!({
            "type": match speaker {
                Speaker::User => "conversation.item.input_audio_transcription.delta",
                Speaker::Assistant => "response.audio_transcript.delta",
            },
            "delta": text, "frame": frame,
        }),
        Event::Word {
            speaker,
            text,
            start_s,
            end_s,
            frame,
        } => {
            json!({"type": "transcript.word", "speaker": speaker, "text": text, "start_ms": ms(*start_s), "end_ms": ms(*end_s), "frame": frame})
        }
        Event::SpeechStarted {
            time_s,
            frame,
            source,
        } => {
            json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": ms(*time_s), "source": source, "frame": frame})
        }
        Event::SpeechStopped {
            time_s,
            frame,
            source,
        } => {
            json!({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": ms(*time_s), "source": source, "frame": frame})
        }
        Event::TurnSignal {
            source,
            probability,
            time_s,
            frame,
        } => {
            json!({"type": "parley.turn_signal", "source": source, "probability": probability, "audio_end_ms": ms(*time_s), "frame": frame})
        }
        Event::TurnEnd {
            source,
            probability,
            time_s,
            frame,
        } => {
            json!({"type": "parley.turn_end", "source": source, "probability": probability, "audio_end_ms": ms(*time_s), "frame": frame})
        }
        Event::UserTurn { text, typed, frame } => {
            let part = if *typed {
                json!({"type": "input_text", "text": text})
            } else {
                json!({"type": "input_audio", "transcript": text})
            };
            json!({"type": "conversation.item.created", "frame": frame,
                   "item": {"type": "message", "role": "user", "content": [part]}})
        }
        Event::ResponseText { text, frame } => {
            json!({"type": "response.text.delta", "delta": text, "frame": frame})
        }
        Event::ResponseDone {
            cancelled,
            failed,
            spoken,
            frame,
            timing,
        } => json!({
            "type": "response.done",
            "response": {
                "status": match (cancelled, failed) {
                    (true, _) => "cancelled",
                    (false, Some(_)) => "failed",
                    (false, None) => "completed",
                },
                "error": failed,
                "transcript": spoken,
                "timing_ms": timing,
            },
            "frame": frame,
        }),
        Event::ReplyCancelled { dropped_frames } => {
            json!({"type": "output_audio_buffer.cleared", "dropped_frames": dropped_frames})
        }
        Event::ResponseStarted {
            frame,
            after_user_ms,
        } => json!({"type": "response.created", "frame": frame, "after_user_ms": after_user_ms}),
        Event::Levels {
            frame,
            input,
            output,
        } => json!({"type": "parley.levels", "frame": frame, "input": input, "output": output}),
        Event::Audio { frame, pcm } => {
            json!({"type": "response.audio.delta", "delta": base64::engine::general_purpose::STANDARD.encode(pcm16(pcm)), "frame": frame})
        }
        Event::Metrics(m) => {
            let mut v = serde_json::to_value(m).unwrap_or(Value::Null);
            if let Some(o) = v.as_object_mut() {
                o.insert("type".into(), "parley.metrics".into());
            }
            v
        }
        Event::Error { message, fatal } => json!({
            "type": "error",
            "error": {"type": if *fatal { "server_error" } else { "invalid_request_error" }, "message": message},
        }),
        Event::Ended {
            frames_in,
            frames_out,
        } => json!({"type": "session.closed", "frames_in": frames_in, "frames_out": frames_out}),
    }
}

pub(crate) fn pcm16(pcm: &[f32]) -> Vec<u8> {
    pcm.iter()
        .flat_map(|&v| ((v.clamp(-1.0, 1.0) * 32767.0).round() as i16).to_le_bytes())
        .collect()
}

fn from_pcm16(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect()
}

fn client_error(events: &Sender<Event>, message: String) {
    let _ = events.send(Event::Error {
        message,
        fatal: false,
    });
}

/// What one client line asks for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ClientEvent {
    /// `input_audio_buffer.append`: its PCM16 samples.
    Append(Vec<f32>),
    /// `response.cancel`.
    Cancel,
    /// `conversation.item.create` with a user message (cascade).
    UserText(String),
    /// `response.create` (cascade).
    CreateResponse,
    /// `session.close`.
    Close,
}

/// The client event a JSON line holds, or what is wrong with it. `cascade`: the cascade
/// mode's text turns are taken.
pub(crate) fn client_event(v: &Value, cascade: bool) -> std::result::Result<ClientEvent, String> {
    let kind = match v.get("type") {
        None => return Err("no `type`".into()),
        Some(Value::String(t)) => t.as_str(),
        Some(other) => return Err(format!("`type` is {other}, not a string")),
    };
    match kind {
        "input_audio_buffer.append" => {
            let b64 = v
                .get("audio")
                .and_then(Value::as_str)
                .ok_or("input_audio_buffer.append without an `audio` string")?;
            match base64::engine::general_purpose::STANDARD.decode(b64) {
                Ok(bytes) if bytes.len() % 2 == 0 => Ok(ClientEvent::Append(from_pcm16(&bytes))),
                Ok(bytes) => Err(format!(
                    "{} bytes of audio is not whole PCM16 samples",
                    bytes.len()
                )),
                Err(e) => Err(format!("`audio` is not base64: {e}")),
            }
        }
        "response.cancel" => Ok(ClientEvent::Cancel),
        "conversation.item.create" if cascade => {
            message_text(&v["item"], "user", "cascade").map(ClientEvent::UserText)
        }
        "response.create" if cascade => Ok(ClientEvent::CreateResponse),
        "session.close" => Ok(ClientEvent::Close),
        other => Err(format!(
            "unknown event type `{other}` (input_audio_buffer.append, response.cancel or session.close{})",
            if cascade {
                ", and conversation.item.create and response.create in the cascade mode"
            } else {
                ""
            }
        )),
    }
}

/// JSON Lines on stdin: audio appends until `session.close` or the end of input;
/// `response.cancel` drops the reply's queued audio. A line that cannot be used gets an
/// `error` event and the session goes on.
fn read_json_lines(
    pcm: Sender<Vec<f32>>,
    events: Sender<Event>,
    cancel: Canceller,
    inbox: Option<CascadeInbox>,
) {
    // The cascade: a user's text item waits for `response.create`.
    let mut user_text: Option<String> = None;
    let errors = events.clone();
    json_lines(
        |m| client_error(&errors, m),
        |n, v| {
            match client_event(&v, inbox.is_some()) {
                Ok(ClientEvent::Append(samples)) => {
                    if !samples.is_empty() && pcm.send(samples).is_err() {
                        return false;
                    }
                }
                Ok(ClientEvent::Cancel) => cancel.cancel(),
                Ok(ClientEvent::UserText(t)) => user_text = Some(t),
                Ok(ClientEvent::CreateResponse) => match (user_text.take(), &inbox) {
                    (Some(t), Some(i)) => {
                        if i.send(t).is_err() {
                            return false;
                        }
                    }
                    _ => client_error(
                        &events,
                        format!(
                            "stdin line {n}: response.create with no user text item before it (the \
                             spoken turns start replies by themselves)"
                        ),
                    ),
                },
                Ok(ClientEvent::Close) => return false,
                Err(m) => client_error(&events, format!("stdin line {n}: {m}")),
            }
            true
        },
    );
    // Dropping `pcm` ends the input: the session flushes and closes.
}

/// The text of a Realtime message item of role `role` (its `text`, `input_text` or
/// `output_text` content parts, joined by spaces); `mode` names the mode in errors.
pub(crate) fn message_text(
    item: &Value,
    role: &str,
    mode: &str,
) -> std::result::Result<String, String> {
    let got = item["role"].as_str().unwrap_or("");
    if got != role {
        return Err(format!(
            "the {mode} mode takes {role} messages; this item's role is `{got}`"
        ));
    }
    let parts = item["content"]
        .as_array()
        .ok_or("an item without a `content` array")?;
    let mut text = vec![];
    for p in parts {
        match (p["type"].as_str(), p["text"].as_str()) {
            (Some("text" | "input_text" | "output_text"), Some(t)) => text.push(t),
            (t, _) => {
                return Err(format!(
                    "a content part of type {t:?}: `text`, `input_text` or `output_text` \
                     parts with a `text` string are taken"
                ))
            }
        }
    }
    let text = text.join(" ");
    if text.trim().is_empty() {
        return Err("an item with no text".into());
    }
    Ok(text)
}

/// The longest line the headless modes read: 16 MiB holds two minutes of audio in one
/// `input_audio_buffer.append` (base64 PCM16 at 24 kHz), far more than any client sends.
pub(crate) const MAX_LINE_BYTES: usize = 16 << 20;

/// One line of `input` (without its newline) into `line`, reading at most
/// `MAX_LINE_BYTES` of it: `Ok(None)` at the end, `Ok(Some(false))` for a longer line
/// (the rest of it is read and dropped, a piece at a time).
pub(crate) fn bounded_line(
    input: &mut impl BufRead,
    line: &mut Vec<u8>,
) -> std::io::Result<Option<bool>> {
    line.clear();
    let n = input
        .by_ref()
        .take(MAX_LINE_BYTES as u64 + 1)
        .read_until(b'\n', line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(Some(true));
    }
    if line.len() <= MAX_LINE_BYTES {
        // The last line, without a newline.
        return Ok(Some(true));
    }
    line.clear();
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            return Ok(Some(false));
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                input.consume(i + 1);
                return Ok(Some(false));
            }
            None => {
                let k = buf.len();
                input.consume(k);
            }
        }
    }
}

/// JSON Lines on stdin, each parsed line given to `f` with its number (1-based) until it
/// returns false or stdin ends. A line that is not JSON, not UTF-8 or longer than
/// [`MAX_LINE_BYTES`] goes to `error` and reading goes on; a read error goes to `error`
/// and ends it.
pub(crate) fn json_lines(error: impl Fn(String), f: impl FnMut(usize, Value) -> bool) {
    json_lines_from(&mut std::io::stdin().lock(), error, f);
}

/// [`json_lines`] from any reader.
pub(crate) fn json_lines_from(
    input: &mut impl BufRead,
    error: impl Fn(String),
    mut f: impl FnMut(usize, Value) -> bool,
) {
    let mut buf = vec![];
    for n in 1.. {
        let whole = match bounded_line(input, &mut buf) {
            Ok(None) => break,
            Ok(Some(whole)) => whole,
            Err(e) => {
                error(format!("stdin line {n}: {e}"));
                break;
            }
        };
        if !whole {
            error(format!(
                "stdin line {n} is longer than {} MiB: skipped (send audio in smaller appends)",
                MAX_LINE_BYTES >> 20
            ));
            continue;
        }
        let Ok(line) = std::str::from_utf8(&buf) else {
            error(format!("stdin line {n} is not UTF-8 text: skipped"));
            continue;
        };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(v) => {
                if !f(n, v) {
                    break;
                }
            }
            Err(e) => error(format!("stdin line {n}: not JSON: {e}")),
        }
    }
}

/// Raw PCM16 LE on stdin until its end.
fn read_raw(pcm: Sender<Vec<f32>>, events: Sender<Event>) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; 2 * FRAME_LEN_SAMPLES];
    let mut carry: Option<u8> = None;
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let mut bytes = Vec::with_capacity(n + 1);
                bytes.extend(carry.take());
                bytes.extend_from_slice(&buf[..n]);
                if bytes.len() % 2 == 1 {
                    carry = bytes.pop();
                }
                if !bytes.is_empty() && pcm.send(from_pcm16(&bytes)).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                client_error(&events, format!("stdin: {e}"));
                break;
            }
        }
    }
    if carry.is_some() {
        client_error(
            &events,
            "stdin ended in the middle of a PCM16 sample (one byte dropped)".into(),
        );
    }
}

/// The reply as raw PCM16 LE on stdout.
struct RawStdoutSink;

impl FrameSink for RawStdoutSink {
    fn write_frame(&mut self, frame: &[f32]) -> parley_engine::Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(&pcm16(frame))
            .map_err(|e| parley_engine::Error::InvalidInput(format!("stdout: {e}")))
    }
    fn finish(&mut self) -> parley_engine::Result<()> {
        std::io::stdout()
            .flush()
            .map_err(|e| parley_engine::Error::InvalidInput(format!("stdout: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bad lines (not UTF-8, too long, not JSON) are errors, each once, and the lines
    /// after them are still read.
    #[test]
    fn bad_lines_are_named_and_reading_goes_on() {
        let mut input = b"{\"a\":1}\n\xff\xfe not utf-8\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 10));
        input.extend(b"\nnot json\n\n{\"a\":2}");
        let errors = std::cell::RefCell::new(vec![]);
        let mut seen = vec![];
        json_lines_from(
            &mut std::io::BufReader::with_capacity(4096, &input[..]),
            |e| errors.borrow_mut().push(e),
            |n, v| {
                seen.push((n, v["a"].as_i64()));
                true
            },
        );
        assert_eq!(seen, [(1, Some(1)), (6, Some(2))]);
        let errors = errors.into_inner();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].contains("line 2 is not UTF-8"), "{}", errors[0]);
        assert!(
            errors[1].contains("line 3 is longer than 16 MiB"),
            "{}",
            errors[1]
        );
        assert!(errors[2].contains("line 4: not JSON"), "{}", errors[2]);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn config() -> ProptestConfig {
            let base = ProptestConfig {
                failure_persistence: None,
                ..ProptestConfig::default()
            };
            if std::env::var_os("PROPTEST_CASES").is_some() {
                base
            } else {
                ProptestConfig {
                    cases: 256,
                    rng_seed: proptest::test_runner::RngSeed::Fixed(0x4ead1e55),
                    ..base
                }
            }
        }

        /// A line as a hostile client might send it: JSON of the right shape with
        /// fields of any type, JSON of any shape, or bytes.
        fn line() -> impl Strategy<Value = Vec<u8>> {
            let kind = prop_oneof![
                Just(serde_json::json!("input_audio_buffer.append")),
                Just(serde_json::json!("response.cancel")),
                Just(serde_json::json!("conversation.item.create")),
                Just(serde_json::json!("response.create")),
                Just(serde_json::json!("session.close")),
                Just(serde_json::json!("session.update")),
                Just(serde_json::json!(5)),
                Just(Value::Null),
                Just(serde_json::json!(["input_audio_buffer.append"])),
            ];
            let audio = prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| serde_json::json!(
                    base64::engine::general_purpose::STANDARD.encode(b)
                )),
                "[ -~]{0,40}".prop_map(|s| serde_json::json!(s)),
                Just(serde_json::json!(12)),
                Just(Value::Null),
            ];
            let item = prop_oneof![
                "[ -~]{0,20}".prop_map(|t| serde_json::json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": t}]})),
                Just(serde_json::json!({"role": "assistant", "content": []})),
                Just(serde_json::json!({"role": "user", "content": [{"type": "input_audio"}]})),
                Just(serde_json::json!({"role": "user", "content": "text"})),
                Just(serde_json::json!(7)),
            ];
            let json = (kind, audio, item, any::<bool>()).prop_map(|(k, a, i, extra)| {
                let mut v = serde_json::json!({"type": k, "audio": a, "item": i});
                if extra {
                    v["event_id"] = serde_json::json!({"nested": [1, 2, {"x": null}]});
                }
                v.to_string().into_bytes()
            });
            prop_oneof![
                4 => json,
                1 => prop::collection::vec(any::<u8>(), 0..80),
                1 => "[ -~]{0,80}".prop_map(String::into_bytes),
            ]
        }

        proptest! {
            #![proptest_config(config())]

            /// Every event is taken or refused with a reason; audio holds whole samples.
            #[test]
            fn client_events_are_taken_or_refused(l in line(), cascade in any::<bool>()) {
                if let Ok(v) = serde_json::from_slice::<Value>(&l) {
                    match client_event(&v, cascade) {
                        Ok(ClientEvent::Append(pcm)) => {
                            let b64 = v["audio"].as_str().expect("audio");
                            let bytes = base64::engine::general_purpose::STANDARD.decode(b64).expect("b64");
                            prop_assert_eq!(pcm.len() * 2, bytes.len());
                            prop_assert!(pcm.iter().all(|x| (-1.0..1.0).contains(x)));
                        }
                        Ok(ClientEvent::UserText(t)) => prop_assert!(cascade && !t.trim().is_empty()),
                        Ok(ClientEvent::CreateResponse) => prop_assert!(cascade),
                        Ok(_) => {}
                        Err(m) => prop_assert!(!m.is_empty()),
                    }
                }
            }

            /// A stream of such lines: each non-blank line is either handed on as JSON or
            /// is one error, in order, and nothing after a bad line is lost.
            #[test]
            fn every_line_is_read_or_reported_once(lines in prop::collection::vec(line(), 0..20)) {
                let mut input = vec![];
                for l in &lines {
                    let l: Vec<u8> = l.iter().copied().filter(|&b| b != b'\n').collect();
                    input.extend_from_slice(&l);
                    input.push(b'\n');
                }
                let expected = input
                    .split(|&b| b == b'\n')
                    .filter(|l| std::str::from_utf8(l).map_or(true, |t| !t.trim().is_empty()))
                    .count();
                let errors = std::cell::RefCell::new(0usize);
                let mut seen = 0usize;
                let mut last = 0usize;
                json_lines_from(
                    &mut std::io::BufReader::with_capacity(16, &input[..]),
                    |_| *errors.borrow_mut() += 1,
                    |n, _| {
                        assert!(n > last);
                        last = n;
                        seen += 1;
                        true
                    },
                );
                prop_assert_eq!(seen + errors.into_inner(), expected);
            }
        }
    }
}
