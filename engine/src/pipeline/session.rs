//! A session: the three threads, the stages they drive, and the flush at the end.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::models::{Mode, Models};
use super::stage::{Composition, Events, Frame, Outbox, Playout, Stage};
use super::{Event, FrameMetrics, StageTime};
use crate::audio::{FrameSink, FrameSource, FRAME_LEN_SAMPLES};
use crate::{Error, Result};

/// How a session treats its event channel.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Send [`Event::Levels`] every frame (a window's meters and waveforms).
    pub levels: bool,
    /// The live devices' counters, reported with every frame's metrics (None for the
    /// virtual device and stdin, which cannot underrun).
    pub audio_stats: Option<crate::audio::AudioStats>,
    /// The echo canceller's counters when the input is cleaned of the output's echo
    /// ([`crate::audio::echo::echo_cancelling`]): its CPU per frame goes in the metrics.
    pub aec_stats: Option<crate::audio::echo::AecStats>,
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
    canceller: Canceller,
}

/// Stops a [`Session`] from any thread.
#[derive(Debug, Clone)]
pub struct Stopper(Arc<AtomicBool>);

impl Stopper {
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Cancels the reply being played (barge-in, or a client's `response.cancel`) from any
/// thread: the audio queued for the speaker is dropped at once (what the device itself
/// still holds, at its next frame), and every stage's [`Stage::cancel`] runs before the
/// model thread's next frame. The session goes on.
#[derive(Clone)]
pub struct Canceller {
    playout: Arc<Playout>,
    requests: Arc<AtomicU64>,
    /// Frames dropped by cancels the model thread has not yet reported.
    dropped: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Canceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canceller").finish_non_exhaustive()
    }
}

impl Canceller {
    pub fn cancel(&self) {
        self.dropped
            .fetch_add(self.playout.cancel(), Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
}

struct InFrame {
    pcm: Vec<f32>,
    available: Instant,
}

/// What the audio-in thread hands the model thread.
enum Input {
    /// The first [`EARLY_PART_SAMPLES`] of the next frame, heard before the rest of it.
    Early(Vec<f32>),
    Frame(InFrame),
}

/// The part of a frame the audio-in thread hands on as soon as it is heard
/// ([`FrameSource::next_part`]), 40 ms before the frame is complete: one step of Mimi's
/// SEANet encoder, which the encode stage then runs (with the encoder transformer's step)
/// while the model thread would otherwise wait.
const EARLY_PART_SAMPLES: usize = FRAME_LEN_SAMPLES / 2;

/// Frames between the input thread and the model, and ticks of the frame clock between the
/// model and the output: a little slack, and back-pressure beyond it.
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

/// What the model thread runs: a mode of [`Models`], or stages made elsewhere.
enum Work {
    Models(Box<Models>, Mode),
    Stages(Vec<Box<dyn Stage + Send>>, bool),
}

impl Session {
    /// Starts the threads on `models` in the mode they were loaded for. Events go to
    /// `events` (a bounded channel).
    pub fn start(
        models: Models,
        source: Box<dyn FrameSource>,
        sink: Box<dyn FrameSink>,
        events: Sender<Event>,
        opts: SessionOptions,
    ) -> Result<Self> {
        let mode = models.mode();
        Self::start_work(
            Work::Models(Box::new(models), mode),
            mode,
            source,
            sink,
            events,
            opts,
        )
    }

    /// Starts the threads on stages made by the caller (`speaks`: whether they produce
    /// audio on the frame clock). `mode` only labels the session; [`Session::join`] then
    /// has no models to return.
    pub fn start_stages(
        stages: Vec<Box<dyn Stage + Send>>,
        speaks: bool,
        mode: Mode,
        source: Box<dyn FrameSource>,
        sink: Box<dyn FrameSink>,
        events: Sender<Event>,
        opts: SessionOptions,
    ) -> Result<Self> {
        Self::start_work(
            Work::Stages(stages, speaks),
            mode,
            source,
            sink,
            events,
            opts,
        )
    }

    fn start_work(
        work: Work,
        mode: Mode,
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
            aec_stats: opts.aec_stats.clone(),
            levels: opts.levels,
        };
        let device = match &work {
            Work::Models(m, _) => m.device.clone(),
            Work::Stages(..) => "stages given by the caller".into(),
        };
        ev.send(Event::Started { mode, device });
        let start = Instant::now();
        // Two messages a frame: its early part and the frame.
        let (in_tx, in_rx) = bounded::<Input>(2 * QUEUE_FRAMES);
        let (tick_tx, tick_rx) = bounded::<u64>(QUEUE_FRAMES);
        let playout = Arc::new(Playout::default());
        let canceller = Canceller {
            playout: playout.clone(),
            requests: Arc::new(AtomicU64::new(0)),
            dropped: Arc::new(AtomicUsize::new(0)),
        };
        let (stop_in, ev_in) = (stop.clone(), ev.clone());
        let input = spawn("audio-in", move || {
            let mut frame = [0f32; FRAME_LEN_SAMPLES];
            let mut part = [0f32; EARLY_PART_SAMPLES];
            while !stop_in.load(Ordering::Relaxed) {
                let got = source.next_part(&mut part).and_then(|early| {
                    if early && in_tx.send(Input::Early(part.to_vec())).is_err() {
                        return Ok(false);
                    }
                    source.next_frame(&mut frame)
                });
                match got {
                    Ok(true) => {
                        let f = InFrame {
                            pcm: frame.to_vec(),
                            available: Instant::now(),
                        };
                        if in_tx.send(Input::Frame(f)).is_err() {
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

        let (stop_out, ev_out, play_out) = (stop.clone(), ev.clone(), playout.clone());
        let output = spawn("audio-out", move || {
            let mut frames_out = 0u64;
            let mut generation = play_out.generation();
            let mut write = |sink: &mut Box<dyn FrameSink>, pcm: &[f32]| -> bool {
                if let Err(e) = sink.write_frame(pcm) {
                    ev_out.send(Event::Error {
                        message: format!("audio output: {e}; the session stops"),
                        fatal: true,
                    });
                    stop_out.store(true, Ordering::Relaxed);
                    return false;
                }
                frames_out += 1;
                true
            };
            let silence = [0f32; FRAME_LEN_SAMPLES];
            let mut failed = false;
            // The output clock: one frame per tick of the input's clock, the reply's
            // audio while there is some, silence otherwise.
            for _ in tick_rx.iter() {
                if failed {
                    continue;
                }
                let g = play_out.generation();
                if g != generation {
                    // A reply was cancelled: what the device still holds goes too.
                    generation = g;
                    sink.discard_queued();
                }
                let pcm = play_out.pop();
                failed = !write(&mut sink, pcm.as_deref().unwrap_or(&silence));
            }
            // The input has ended: what is still queued plays out.
            while !failed {
                match play_out.pop() {
                    Some(pcm) => failed = !write(&mut sink, &pcm),
                    None => break,
                }
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
        let requests = canceller.requests.clone();
        let cancel = canceller.clone();
        let model = spawn("model", move || {
            let ctx = Ctx {
                ev: &ev_model,
                playout: &playout,
                ticks: &tick_tx,
                requests: &requests,
                canceller: &cancel,
                start,
            };
            let (models, result) = match work {
                Work::Models(mut m, mode) => {
                    for message in m.turn.take_notes() {
                        ev_model.send(Event::Warning { message });
                    }
                    let r = m
                        .compose(mode)
                        .and_then(|mut comp| run_stages(&mut comp, &in_rx, &ctx));
                    (Some(*m), r)
                }
                Work::Stages(stages, speaks) => {
                    let mut comp = Composition {
                        stages: stages.into_iter().map(|s| s as Box<dyn Stage>).collect(),
                        speaks,
                    };
                    (None, run_stages(&mut comp, &in_rx, &ctx))
                }
            };
            let frames_in = match result {
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
            drop(tick_tx);
            (models, frames_in)
        })?;

        // The output thread reports how many frames it wrote; the model thread waits for
        // nothing. A small supervisor joins them and sends `Ended` last.
        let ev_end = ev;
        let supervisor = spawn("session", move || {
            let (models, frames_in) = model.join().unwrap_or((None, 0));
            let frames_out = output.join().unwrap_or(0);
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
            canceller,
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

    /// A handle that cancels the reply being played (see [`Canceller`]).
    pub fn canceller(&self) -> Canceller {
        self.canceller.clone()
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
        let mut m = models.ok_or_else(|| {
            Error::InvalidInput("no models to return (the model thread failed, or the session ran stages given by the caller)".into())
        })?;
        m.reset();
        Ok(m)
    }
}

/// What the model thread's frames share.
struct Ctx<'a> {
    ev: &'a Events,
    playout: &'a Playout,
    ticks: &'a Sender<u64>,
    requests: &'a AtomicU64,
    canceller: &'a Canceller,
    start: Instant,
}

/// The model thread: the silence prefix, every input frame, then the flush, each down
/// the stages. Returns the number of input frames.
fn run_stages(comp: &mut Composition<'_>, input: &Receiver<Input>, ctx: &Ctx<'_>) -> Result<u64> {
    for s in &mut comp.stages {
        s.reset();
    }
    // The counter is the session's own, from 0: a cancel that came before the first frame
    // (a client's line read while the models warmed up) is still reported.
    let mut cancels_seen = 0;
    let mut run = |comp: &mut Composition<'_>, frame: Frame, early: Vec<StageTime>| -> Result<()> {
        let requested = ctx.requests.load(Ordering::Relaxed);
        if requested != cancels_seen {
            cancels_seen = requested;
            for s in &mut comp.stages {
                s.cancel();
            }
            ctx.ev.send(Event::ReplyCancelled {
                dropped_frames: ctx.canceller.dropped.swap(0, Ordering::Relaxed),
            });
        }
        step(comp, frame, early, ctx)
    };
    for _ in 0..comp.prefix_frames() {
        let mut f = Frame::silence(0);
        f.reported = false;
        run(comp, f, vec![])?;
    }
    let mut frames = 0u64;
    // The next frame's early part, and what the stages did with it.
    let mut part: Option<Vec<f32>> = None;
    let mut early = vec![];
    for msg in input.iter() {
        match msg {
            Input::Early(pcm) => {
                for s in &mut comp.stages {
                    let t = Instant::now();
                    if s.on_early(&pcm)? {
                        early.push(StageTime {
                            stage: s.name(),
                            ms: t.elapsed().as_secs_f64() * 1e3,
                        });
                    }
                }
                part = Some(pcm);
            }
            Input::Frame(f) => {
                part = None;
                let frame = Frame::new(frames, f.pcm, f.available);
                run(comp, frame, std::mem::take(&mut early))?;
                frames += 1;
            }
        }
    }
    if let Some(mut pcm) = part {
        // The input ended inside a frame the stages had begun: its heard part, completed
        // with silence, is the input's last frame.
        pcm.resize(FRAME_LEN_SAMPLES, 0.0);
        run(comp, Frame::new(frames, pcm, Instant::now()), early)?;
        frames += 1;
    }
    let flush = comp.flush_frames() as u64;
    for i in 0..flush {
        let mut f = Frame::silence(frames + i);
        f.flushing = true;
        run(comp, f, vec![])?;
    }
    let last = (frames + flush).saturating_sub(1);
    let mut out = Outbox {
        events: ctx.ev,
        playout: ctx.playout,
        cancel_requested: false,
    };
    for s in &mut comp.stages {
        s.finish(last, &mut out)?;
    }
    Ok(frames)
}

/// 40 peak values of a frame (2 ms apiece).
fn peaks(pcm: &[f32]) -> Vec<f32> {
    pcm.chunks(pcm.len().div_ceil(40).max(1))
        .map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect()
}

/// One frame down the stages, timed; then its tick of the output clock, levels and
/// metrics (not for the silence prefix).
fn step(
    comp: &mut Composition<'_>,
    mut frame: Frame,
    early: Vec<StageTime>,
    ctx: &Ctx<'_>,
) -> Result<()> {
    let mut out = Outbox {
        events: ctx.ev,
        playout: ctx.playout,
        cancel_requested: false,
    };
    let mut stages = Vec::with_capacity(comp.stages.len());
    for s in &mut comp.stages {
        let t = Instant::now();
        s.on_frame(&mut frame, &mut out)?;
        stages.push(StageTime {
            stage: s.name(),
            ms: t.elapsed().as_secs_f64() * 1e3,
        });
    }
    if out.cancel_requested {
        ctx.canceller.cancel();
    }
    if !frame.reported {
        return Ok(());
    }
    if comp.speaks && ctx.ticks.send(frame.index).is_err() {
        return Err(Error::InvalidInput("the audio output has stopped".into()));
    }
    let ev = ctx.ev;
    if ev.levels {
        ev.send(Event::Levels {
            frame: frame.index,
            input: peaks(&frame.input),
            output: frame.output.as_deref().map_or_else(|| vec![0.0; 40], peaks),
        });
    }
    let done = Instant::now();
    let audio = ev.audio_stats.as_ref().map(|s| s.snapshot());
    let compute: f64 = stages.iter().chain(&early).map(|s| s.ms).sum();
    ev.send(Event::Metrics(FrameMetrics {
        input_overruns: audio.map_or(0, |a| a.overrun_events),
        output_underruns: audio.map_or(0, |a| a.underrun_events),
        output_low_water_ms: audio
            .and_then(|a| a.playback_low_water_us)
            .map(|us| us as f64 / 1e3),
        aec_ms: ev.aec_stats.as_ref().map(|s| s.last_ms()),
        frame: frame.index,
        stages,
        early,
        latency_ms: (done - frame.available).as_secs_f64() * 1e3,
        deadline_missed: compute > 80.0,
        done_at_s: (done - ctx.start).as_secs_f64(),
    }));
    Ok(())
}
