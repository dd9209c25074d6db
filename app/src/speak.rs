//! `parley headless --mode speak`: the TTS alone, driven the OpenAI Realtime way. The
//! client gives the assistant's text (`conversation.item.create` with an assistant
//! message, or `response.create` with `instructions`, said as written: there is no LLM in
//! this mode); Parley answers with `response.audio.delta` as the speech is produced
//! (faster than real time where the machine allows) or plays it on the speakers with
//! `--audio mic`. docs/headless.md has every event with an example.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use base64::Engine as _;
use crossbeam_channel::{bounded, Sender};
use parley_engine::audio::device::{DeviceOptions, SpeakerSink};
use parley_engine::audio::FrameSink;
use parley_engine::compute::gpu::DeviceChoice;
use parley_engine::compute::Dtype;
use parley_engine::pipeline::speak::{SpeakHandle, SpeakModels, SpeechEvent, TtsWorker};
use serde_json::{json, Value};

/// What the speak mode is given.
pub struct SpeakArgs<'a> {
    pub model_dir: &'a Path,
    pub voice: &'a str,
    pub cfg: &'a str,
    pub codebooks: Option<usize>,
    pub temp: f32,
    pub device: DeviceChoice,
    pub precision: Dtype,
    /// Play on the speakers (this device, or the default) instead of audio deltas.
    pub speakers: Option<Option<String>>,
}

/// What reaches stdout: the worker's events, and the reader's own; then the end.
enum Out {
    Speech(SpeechEvent),
    Line(Value),
    /// The worker said everything it was given, or Ctrl-C.
    End,
}

pub fn run(args: SpeakArgs) -> Result<()> {
    let mut models = SpeakModels::load(
        args.model_dir,
        args.voice,
        args.cfg,
        args.device,
        args.precision,
        args.codebooks,
    )
    .context("loading the text-to-speech model")?;
    models.opts.temp = args.temp;
    let mut sink: Option<Box<dyn FrameSink>> = match &args.speakers {
        Some(name) => Some(Box::new(SpeakerSink::open(
            name.as_deref(),
            DeviceOptions::default(),
        )?)),
        None => None,
    };
    let mut out = std::io::stdout().lock();
    let mut write = |v: &Value| -> Result<()> {
        writeln!(out, "{v}")
            .and_then(|()| out.flush())
            .map_err(|e| anyhow::anyhow!("writing events to stdout: {e}"))
    };
    write(
        &json!({"type": "session.created", "session": {"mode": "speak", "device": models.description}}),
    )?;
    let (speech_tx, speech_rx) = bounded::<SpeechEvent>(64);
    let (worker, handle) = TtsWorker::start(models, speech_tx)?;
    let (out_tx, out_rx) = bounded::<Out>(256);
    // Speech events and the reader's lines, in one stream, in order of arrival.
    let fwd = out_tx.clone();
    let forward = std::thread::Builder::new()
        .name("speech-events".into())
        .spawn(move || {
            for e in speech_rx {
                if fwd.send(Out::Speech(e)).is_err() {
                    return;
                }
            }
            let _ = fwd.send(Out::End);
        })
        .context("starting the event forwarder")?;
    let ctrl = (handle.canceller(), out_tx.clone());
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || read_lines(handle, out_tx))
        .context("starting the stdin reader")?;
    // Ctrl-C stops whatever is being said and closes the session; so does the input's end
    // once everything given has been said.
    if let Err(e) = ctrlc::set_handler(move || {
        ctrl.0.cancel_all();
        let _ = ctrl.1.send(Out::End);
    }) {
        eprintln!("warning: Ctrl-C will not stop the speech: {e}");
    }
    let mut frames_out = 0usize;
    for o in out_rx {
        match o {
            Out::End => break,
            Out::Line(v) => write(&v)?,
            Out::Speech(e) => {
                if let SpeechEvent::Audio { pcm, .. } = &e {
                    frames_out += 1;
                    if let Some(s) = &mut sink {
                        s.write_frame(pcm)?;
                        continue;
                    }
                }
                for v in speech_json(&e) {
                    write(&v)?;
                }
                if matches!(e, SpeechEvent::Done { .. }) {
                    if let Some(s) = &mut sink {
                        s.finish()?;
                    }
                }
            }
        }
    }
    if let Some(s) = &mut sink {
        s.discard_queued();
    }
    // After Ctrl-C the worker may still be stopping: it is not waited for.
    drop((forward, worker));
    write(&json!({"type": "session.closed", "frames_in": 0, "frames_out": frames_out}))?;
    Ok(())
}

fn resp(id: u64) -> String {
    format!("resp_{id}")
}

/// The Realtime events of one worker event.
fn speech_json(e: &SpeechEvent) -> Vec<Value> {
    match e {
        SpeechEvent::Started { id } => vec![json!({
            "type": "response.created",
            "response": {"id": resp(*id), "status": "in_progress"},
        })],
        SpeechEvent::Audio { id, pcm } => vec![json!({
            "type": "response.audio.delta",
            "response_id": resp(*id),
            "delta": base64::engine::general_purpose::STANDARD.encode(crate::headless::pcm16(pcm)),
        })],
        SpeechEvent::Word { id, text, start_s } => vec![json!({
            "type": "response.audio_transcript.delta",
            "response_id": resp(*id),
            "delta": format!("{text} "),
            "start_ms": (start_s * 1000.0).round() as i64,
        })],
        SpeechEvent::Done {
            id,
            cancelled,
            failed,
            spoken,
            frames,
        } => vec![
            json!({"type": "response.audio.done", "response_id": resp(*id)}),
            json!({"type": "response.audio_transcript.done", "response_id": resp(*id), "transcript": spoken}),
            json!({
                "type": "response.done",
                "response": {
                    "id": resp(*id),
                    "status": if *failed { "failed" } else if *cancelled { "cancelled" } else { "completed" },
                    "audio_ms": *frames as u64 * 80,
                },
            }),
        ],
        SpeechEvent::Skipped { id, words } => vec![json!({
            "type": "parley.warning",
            "response_id": resp(*id),
            "message": format!("words this voice's tokenizer cannot say were skipped: {}", words.join(" ")),
        })],
        SpeechEvent::Error { id, message } => vec![json!({
            "type": "error",
            "error": {"type": "invalid_request_error", "message": message, "response_id": resp(*id)},
        })],
    }
}

/// JSON Lines on stdin until `session.close` or its end.
fn read_lines(speak: SpeakHandle, out: Sender<Out>) {
    let error = |message: String| {
        let _ = out.send(Out::Line(json!({
            "type": "error",
            "error": {"type": "invalid_request_error", "message": message},
        })));
    };
    let last_id = std::cell::Cell::new(0u64);
    let say = |text: &str, out: &Sender<Out>| {
        let next_id = last_id.get() + 1;
        last_id.set(next_id);
        let _ = out.send(Out::Line(json!({
            "type": "conversation.item.created",
            "item": {"id": format!("item_{next_id}"), "type": "message", "role": "assistant",
                     "content": [{"type": "text", "text": text}]},
        })));
        if speak
            .say(next_id, text)
            .and_then(|()| speak.end(next_id))
            .is_err()
        {
            return false;
        }
        true
    };
    crate::headless::json_lines(error, |n, v| {
        match v.get("type").and_then(Value::as_str) {
            Some("conversation.item.create") => {
                match crate::headless::message_text(&v["item"], "assistant", "speak") {
                    Ok(text) => {
                        if !say(&text, &out) {
                            return false;
                        }
                    }
                    Err(m) => error(format!("stdin line {n}: {m}")),
                }
            }
            Some("response.create") => {
                match v["response"]["instructions"]
                    .as_str()
                    .filter(|t| !t.trim().is_empty())
                {
                    Some(text) => {
                        if !say(text, &out) {
                            return false;
                        }
                    }
                    None => error(format!(
                        "stdin line {n}: response.create in the speak mode needs \
                         `response.instructions`, the text to say"
                    )),
                }
            }
            Some("response.cancel") => speak.cancel(last_id.get()),
            Some("session.close") => return false,
            Some("input_audio_buffer.append") => error(format!(
                "stdin line {n}: the speak mode takes text, not audio (conversation.item.create)"
            )),
            Some(other) => error(format!(
                "stdin line {n}: unknown event type `{other}` (conversation.item.create, \
                 response.create, response.cancel or session.close)"
            )),
            None => error(format!("stdin line {n}: no `type`")),
        }
        true
    });
    // Dropping the handle lets the worker finish what it was given, then stop.
}
