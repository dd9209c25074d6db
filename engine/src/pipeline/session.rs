//! A session: the three threads, the models they drive, and the flush at the end.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use serde::{Deserialize, Serialize};

use super::{Event, FrameMetrics};
use crate::audio::{FrameSink, FrameSource, FRAME_LEN_SAMPLES};
use crate::compute::gpu::{select_device, DeviceChoice};
use crate::compute::Dtype;
use crate::models::kyutai_config::ModelDir;
use crate::models::lm::generator::{GenConfig, LmBackend, LmGen};
use crate::models::mimi::Mimi;
use crate::models::stt::{SttConfig, WordStream, END_OF_PADDING_ID};
use crate::models::tokenizer::TextTokenizer;
use crate::{Error, Result};

/// What the session does with the models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Mimi + a Moshi-style model: it listens and speaks at once.
    #[default]
    Duplex,
    /// Mimi + a speech-to-text model: live transcript, word times, end of turn.
    Listen,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "duplex" => Ok(Self::Duplex),
            "listen" => Ok(Self::Listen),
            other => Err(format!("unknown mode `{other}` (duplex or listen)")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Duplex => "duplex",
            Self::Listen => "listen",
        })
    }
}

/// The models of a session, owned by its model thread (and handed back by
/// [`Session::join`] so a new session can reuse them).
#[derive(Debug)]
pub struct Models {
    pub mode: Mode,
    pub mimi: Mimi,
    pub gen: LmGen,
    /// None for random-weight models (text then shows as token ids).
    pub tokenizer: Option<TextTokenizer>,
    pub stt: SttConfig,
    pub padding_id: u32,
    /// The line saying where the LM runs.
    pub device: String,
}

impl Models {
    /// Loads a model directory for `mode` on `device`: the LM in `dtype`, Mimi on the CPU.
    /// Duplex sampling follows the model's `lm_gen_config` unless `sampling` is given.
    pub fn load(
        dir: &Path,
        mode: Mode,
        device: DeviceChoice,
        dtype: Dtype,
        sampling: Option<GenConfig>,
    ) -> Result<Self> {
        let d = ModelDir::open(dir)?;
        let lm_cfg = d.lm_config()?;
        match (mode, lm_cfg.dep_q) {
            (Mode::Listen, q) if q > 0 => {
                return Err(Error::config(
                    dir,
                    "this model speaks (dep_q > 0): use --mode duplex",
                ))
            }
            (Mode::Duplex, 0) => {
                return Err(Error::config(
                    dir,
                    "this model does not speak (dep_q = 0): use --mode listen",
                ))
            }
            _ => {}
        }
        let mut mimi = d.load_mimi()?;
        mimi.set_weight_precision(dtype.mimi_precision())?;
        let (backend, device) = select_device(device)?;
        let (lm, weights) = LmBackend::open(&backend, dtype, Some(d.lm_param_count()?), |p| {
            d.load_lm_as(p)
        })?;
        let device = format!("{device}; {weights}");
        let gen_cfg = match (mode, sampling) {
            (_, Some(s)) => s,
            (Mode::Listen, None) => GenConfig::default(),
            (Mode::Duplex, None) => d.gen_config(0),
        };
        Ok(Self {
            mode,
            mimi,
            gen: LmGen::with_backend(lm, gen_cfg),
            tokenizer: Some(d.load_tokenizer()?),
            stt: d.stt_config()?,
            padding_id: d.config.text_padding_token_id.unwrap_or(3),
            device,
        })
    }

    /// A full-size architecture with random weights (published Mimi, `preset` LM), for
    /// the latency harness's timings: speed does not depend on the values. No tokenizer.
    pub fn random(mode: Mode, preset: &str, device: DeviceChoice, dtype: Dtype) -> Result<Self> {
        use crate::models::lm::{LmConfig, LmModel};
        use crate::models::mimi::MimiConfig;
        use crate::models::weights::Weights;
        let cfg = LmConfig::preset(preset).ok_or_else(|| {
            Error::InvalidInput(format!(
                "unknown preset `{preset}`; known: {}",
                crate::models::lm::config::PRESETS.join(", ")
            ))
        })?;
        if (mode == Mode::Listen) != (cfg.dep_q == 0) {
            return Err(Error::InvalidInput(format!(
                "preset {preset} does not fit --mode {mode}"
            )));
        }
        // The user's audio codebooks: what the LM reads per step.
        let n_in = cfg.n_q - cfg.dep_q;
        let mut mimi = Mimi::from_weights(
            &Weights::random(1),
            MimiConfig::default(),
            n_in.max(cfg.dep_q),
        )?;
        mimi.set_weight_precision(dtype.mimi_precision())?;
        let (backend, device) = select_device(device)?;
        let (lm, weights) = LmBackend::open(&backend, dtype, None, |p| {
            LmModel::from_weights(&Weights::random(2).with_precision(p), cfg)
        })?;
        let device = format!("{device}; {weights}");
        Ok(Self {
            mode,
            mimi,
            gen: LmGen::with_backend(lm, GenConfig::default()),
            tokenizer: None,
            stt: SttConfig {
                audio_silence_prefix_seconds: 1.0,
                audio_delay_seconds: 0.5,
            },
            padding_id: 3,
            device,
        })
    }

    fn frame_rate_hz(&self) -> f64 {
        self.mimi.config().frame_rate
    }

    /// Silence frames before the input in listen mode (the reference STT procedure).
    fn prefix_frames(&self) -> usize {
        match self.mode {
            Mode::Listen => {
                (self.stt.audio_silence_prefix_seconds * self.frame_rate_hz()).ceil() as usize
            }
            Mode::Duplex => 0,
        }
    }

    /// Silence frames after the input that bring every output due out.
    fn flush_frames(&self) -> usize {
        match self.mode {
            Mode::Listen => (self.stt.audio_delay_seconds * self.frame_rate_hz()).ceil() as usize,
            Mode::Duplex => self.gen.max_delay() + 1,
        }
    }

    /// Seconds of model time before the input's time 0 in listen mode.
    fn offset_s(&self) -> f64 {
        (self.prefix_frames() as f64 / self.frame_rate_hz()).trunc() + self.stt.audio_delay_seconds
    }

    fn reset(&mut self) {
        self.mimi.reset();
        self.gen.reset();
    }
}

/// How a session treats its event channel.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Send [`Event::Levels`] every frame (a window's meters and waveforms).
    pub levels: bool,
    /// The live devices' counters, reported with every frame's metrics (None for the
    /// virtual device and stdin, which cannot underrun).
    pub audio_stats: Option<crate::audio::AudioStats>,
    /// Drop events when the channel is full instead of waiting (a window that may be
    /// slow to read must never hold the model thread back). Headless and the harness
    /// wait instead, so nothing is lost.
    pub drop_events_when_full: bool,
}

/// A running session.
#[derive(Debug)]
pub struct Session {
    stop: Arc<AtomicBool>,
    input: Option<JoinHandle<()>>,
    /// Joins the model and output threads and sends `Ended`.
    model: Option<JoinHandle<Option<Models>>>,
}

/// Stops a [`Session`] from any thread.
#[derive(Debug, Clone)]
pub struct Stopper(Arc<AtomicBool>);

impl Stopper {
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[derive(Clone)]
struct Events {
    tx: Sender<Event>,
    drop_when_full: bool,
    audio_stats: Option<crate::audio::AudioStats>,
    levels: bool,
}

impl Events {
    fn send(&self, e: Event) {
        if self.drop_when_full {
            match self.tx.try_send(e) {
                Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
            }
        } else {
            // A reader that has gone away does not stop the session.
            let _ = self.tx.send(e);
        }
    }
}

struct InFrame {
    pcm: Vec<f32>,
    available: Instant,
}

/// Frames between the input thread and the model, and between the model and the output:
/// a little slack, and back-pressure beyond it.
const QUEUE_FRAMES: usize = 8;

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::InvalidInput(format!("starting the {name} thread: {e}")))
}

impl Session {
    /// Starts the threads. Events go to `events` (a bounded channel).
    pub fn start(
        mut models: Models,
        mut source: Box<dyn FrameSource>,
        mut sink: Box<dyn FrameSink>,
        events: Sender<Event>,
        opts: SessionOptions,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let ev = Events {
            tx: events,
            drop_when_full: opts.drop_events_when_full,
            audio_stats: opts.audio_stats.clone(),
            levels: opts.levels,
        };
        ev.send(Event::Started {
            mode: models.mode,
            device: models.device.clone(),
        });
        let start = Instant::now();
        let (in_tx, in_rx) = bounded::<InFrame>(QUEUE_FRAMES);
        let (out_tx, out_rx) = bounded::<(u64, Vec<f32>)>(QUEUE_FRAMES);

        let (stop_in, ev_in) = (stop.clone(), ev.clone());
        let input = spawn("audio-in", move || {
            let mut frame = [0f32; FRAME_LEN_SAMPLES];
            while !stop_in.load(Ordering::Relaxed) {
                match source.next_frame(&mut frame) {
                    Ok(true) => {
                        let f = InFrame {
                            pcm: frame.to_vec(),
                            available: Instant::now(),
                        };
                        if in_tx.send(f).is_err() {
                            break;
                        }
                    }
                    Ok(false) => break,
                    Err(e) => {
                        ev_in.send(Event::Error {
                            message: format!("audio input: {e}; the session stops"),
                            fatal: true,
                        });
                        break;
                    }
                }
            }
            // Dropping `in_tx` ends the input: the model thread flushes.
        })?;

        let (stop_out, ev_out) = (stop.clone(), ev.clone());
        let output = spawn("audio-out", move || {
            let mut frames_out = 0u64;
            let mut failed = false;
            for (_, pcm) in out_rx.iter() {
                if failed {
                    continue;
                }
                if let Err(e) = sink.write_frame(&pcm) {
                    ev_out.send(Event::Error {
                        message: format!("audio output: {e}; the session stops"),
                        fatal: true,
                    });
                    stop_out.store(true, Ordering::Relaxed);
                    failed = true;
                    continue;
                }
                frames_out += 1;
            }
            if !failed {
                if let Err(e) = sink.finish() {
                    ev_out.send(Event::Error {
                        message: format!("audio output: {e}"),
                        fatal: true,
                    });
                }
            }
            frames_out
        })?;

        let (stop_model, ev_model) = (stop.clone(), ev.clone());
        let model = spawn("model", move || {
            let frames_in = match run_model(&mut models, &in_rx, &out_tx, &ev_model, start) {
                Ok(n) => n,
                Err(e) => {
                    ev_model.send(Event::Error {
                        message: format!("model: {e}"),
                        fatal: true,
                    });
                    stop_model.store(true, Ordering::Relaxed);
                    // Unblock the input thread.
                    drop(in_rx);
                    0
                }
            };
            drop(out_tx);
            Some((models, frames_in))
        })?;

        // The output thread reports how many frames it wrote; the model thread waits for
        // nothing. A small supervisor joins them and sends `Ended` last.
        let ev_end = ev;
        let supervisor = spawn("session", move || {
            let got = model.join().ok().flatten();
            let frames_out = output.join().unwrap_or(0);
            let (models, frames_in) = match got {
                Some((m, n)) => (Some(m), n),
                None => (None, 0),
            };
            ev_end.send(Event::Ended {
                frames_in,
                frames_out,
            });
            models
        })?;
        Ok(Self {
            stop,
            input: Some(input),
            model: Some(supervisor),
        })
    }

    /// Asks the session to stop: the input ends at the next frame, the delays are
    /// flushed, and `Ended` follows.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// A handle that stops the session from elsewhere (a signal handler, the UI).
    pub fn stopper(&self) -> Stopper {
        Stopper(self.stop.clone())
    }

    pub fn is_finished(&self) -> bool {
        self.model.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the end; returns the models (reset) for another session, if the model
    /// thread did not fail.
    pub fn join(mut self) -> Result<Models> {
        if let Some(h) = self.input.take() {
            h.join()
                .map_err(|_| Error::InvalidInput("the audio-in thread panicked".into()))?;
        }
        let models = self
            .model
            .take()
            .ok_or_else(|| Error::InvalidInput("session already joined".into()))?
            .join()
            .map_err(|_| Error::InvalidInput("the model thread panicked".into()))?;
        let mut m = models.ok_or_else(|| Error::InvalidInput("the model thread failed".into()))?;
        m.reset();
        Ok(m)
    }
}

/// The model thread: every input frame through the models, then the flush. Returns the
/// number of input frames.
fn run_model(
    m: &mut Models,
    input: &Receiver<InFrame>,
    output: &Sender<(u64, Vec<f32>)>,
    ev: &Events,
    start: Instant,
) -> Result<u64> {
    m.reset();
    let silence = vec![0f32; FRAME_LEN_SAMPLES];
    let mut st = StepState {
        words: WordStream::new(m.frame_rate_hz(), m.padding_id, m.offset_s()),
        model_steps: 0,
        in_turn_end: false,
        quiet_frames: u64::MAX,
        user_loud: None,
    };
    for _ in 0..m.prefix_frames() {
        step(m, &silence, None, &mut st, output, ev, start)?;
    }
    let mut frames = 0u64;
    for f in input.iter() {
        step(
            m,
            &f.pcm,
            Some((frames, f.available)),
            &mut st,
            output,
            ev,
            start,
        )?;
        frames += 1;
    }
    for i in 0..m.flush_frames() {
        step(
            m,
            &silence,
            Some((frames + i as u64, Instant::now())),
            &mut st,
            output,
            ev,
            start,
        )?;
    }
    // The last words come out with the last flush frame.
    let frame = (frames + m.flush_frames() as u64).saturating_sub(1);
    let last = match &m.tokenizer {
        Some(t) => st.words.finish(t)?,
        None => vec![],
    };
    for w in last {
        ev.send(Event::Word {
            text: w.text,
            start_s: w.start_s,
            end_s: w.end_s,
            frame,
        });
    }
    Ok(frames)
}

struct StepState {
    words: WordStream,
    model_steps: u64,
    in_turn_end: bool,
    quiet_frames: u64,
    /// The last input frame in which the user was loud.
    user_loud: Option<u64>,
}

/// 40 peak values of a frame (2 ms apiece).
fn peaks(pcm: &[f32]) -> Vec<f32> {
    pcm.chunks(pcm.len().div_ceil(40).max(1))
        .map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect()
}

fn rms(pcm: &[f32]) -> f32 {
    (pcm.iter().map(|v| v * v).sum::<f32>() / pcm.len().max(1) as f32).sqrt()
}

/// One frame through the models. `frame`: the input frame's index and when it became
/// available (None for the silence prefix, which reports nothing).
fn step(
    m: &mut Models,
    pcm: &[f32],
    frame: Option<(u64, Instant)>,
    st: &mut StepState,
    output: &Sender<(u64, Vec<f32>)>,
    ev: &Events,
    start: Instant,
) -> Result<()> {
    let t0 = Instant::now();
    let codes = m.mimi.encode_step(pcm)?;
    let t1 = Instant::now();
    let out = m.gen.step(&codes)?;
    let t2 = Instant::now();
    st.model_steps += 1;
    let index = frame.map_or(0, |(i, _)| i);
    let mut decode_ms = 0.0;
    let mut out_pcm: Option<Vec<f32>> = None;
    if frame.is_some() && rms(pcm) > 0.02 {
        st.user_loud = Some(index);
    }
    if let Some(tokens) = &out.tokens {
        let text = tokens[0] as u32;
        if frame.is_some() && text != END_OF_PADDING_ID && text != m.padding_id {
            let piece = match &m.tokenizer {
                Some(t) => t.id_to_piece(text).map(|p| p.replace('\u{2581}', " ")),
                None => Some(format!("<{text}>")),
            };
            if let Some(text) = piece {
                ev.send(Event::TextDelta { text, frame: index });
            }
        }
        if let (Mode::Listen, Some(tok)) = (m.mode, &m.tokenizer) {
            for w in st.words.push(text, tok)? {
                ev.send(Event::Word {
                    text: w.text,
                    start_s: w.start_s,
                    end_s: w.end_s,
                    frame: index,
                });
            }
        }
    }
    if m.mode == Mode::Listen {
        if let Some(p) = out.extra_heads.get(2).and_then(|h| h.first().copied()) {
            if p > 0.5 && !st.in_turn_end && frame.is_some() {
                st.in_turn_end = true;
                ev.send(Event::EndOfTurn {
                    time_s: (st.model_steps as f64 / m.frame_rate_hz() - m.offset_s()).max(0.0),
                    probability: p,
                    frame: index,
                });
            }
        }
        if out
            .tokens
            .as_ref()
            .is_some_and(|t| t[0] as u32 != END_OF_PADDING_ID && t[0] as u32 != m.padding_id)
        {
            st.in_turn_end = false;
        }
    } else if let Some(frame_info) = frame {
        // Duplex: the model's audio for this frame, or silence while the delays hold it.
        let pcm_out = match &out.tokens {
            Some(tokens) => {
                let codes: Vec<u32> = tokens[1..].iter().map(|&t| t as u32).collect();
                let t = Instant::now();
                let pcm = m.mimi.decode_step(&codes)?;
                decode_ms = t.elapsed().as_secs_f64() * 1e3;
                pcm
            }
            None => vec![0f32; FRAME_LEN_SAMPLES],
        };
        if rms(&pcm_out) > 0.01 {
            // Audible after at least 0.4 s of quiet: a reply starts.
            if st.quiet_frames >= 5 {
                let after_user_ms =
                    st.user_loud
                        .filter(|&u| u < index && index - u <= 62)
                        .map(|u| {
                            (index - u) as f64 * 80.0 + frame_info.1.elapsed().as_secs_f64() * 1e3
                        });
                ev.send(Event::ResponseStarted {
                    frame: index,
                    after_user_ms,
                });
            }
            st.quiet_frames = 0;
        } else {
            st.quiet_frames = st.quiet_frames.saturating_add(1);
        }
        if ev.levels {
            out_pcm = Some(pcm_out.clone());
        }
        if output.send((frame_info.0, pcm_out)).is_err() {
            return Err(Error::InvalidInput("the audio output has stopped".into()));
        }
    }
    if let (true, Some((i, _))) = (ev.levels, frame) {
        ev.send(Event::Levels {
            frame: i,
            input: peaks(pcm),
            output: out_pcm.as_deref().map_or_else(|| vec![0.0; 40], peaks),
        });
    }
    if let Some((i, available)) = frame {
        let done = Instant::now();
        let encode_ms = (t1 - t0).as_secs_f64() * 1e3;
        let lm_ms = (t2 - t1).as_secs_f64() * 1e3;
        let audio = ev.audio_stats.as_ref().map(|s| s.snapshot());
        ev.send(Event::Metrics(FrameMetrics {
            input_overruns: audio.map_or(0, |a| a.overrun_events),
            output_underruns: audio.map_or(0, |a| a.underrun_events),
            frame: i,
            encode_ms,
            lm_ms,
            decode_ms,
            latency_ms: (done - available).as_secs_f64() * 1e3,
            deadline_missed: encode_ms + lm_ms + decode_ms > 80.0,
            done_at_s: (done - start).as_secs_f64(),
        }));
    }
    Ok(())
}
