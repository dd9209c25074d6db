//! The stage contract: what the model thread's work is made of.
//!
//! A mode is a list of [`Stage`]s (built in one place, [`super::Models::compose`]). The
//! model thread drives the 80 ms frame clock: for every frame it makes a [`Frame`] holding
//! the input audio and runs each stage on it in order; a stage reads what the stages
//! before it left in the frame (Mimi's codes, the LM's text token, the end-of-turn head)
//! and leaves its own results for those after it. What a stage says to the world goes
//! through its [`Outbox`]: events, and audio for the speaker (the [`Playout`] queue, read
//! by the output thread on its own clock).
//!
//! A stage runs on the model thread and must return within the frame's budget. Work that
//! comes in bursts or takes longer (Smart Turn's verdict, an LLM's reply) goes to a
//! [`Worker`]: a named thread behind bounded channels, which the stage feeds with
//! `try_submit` (never blocking) and polls with `try_result` on later frames.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

use super::Event;
use crate::audio::FRAME_LEN_SAMPLES;
use crate::{Error, Result};

/// One tick of the frame clock as it goes down the stages.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The input frame's index (the silence prefix repeats 0; flush frames continue the
    /// count past the input's end).
    pub index: u64,
    /// False for the silence prefix some models need before the input (the reference
    /// STT procedure): such a frame goes through the models but reports nothing.
    pub reported: bool,
    /// True for the silence after the input's end that brings the delayed outputs out.
    pub flushing: bool,
    /// When the frame's audio became available (its latency is measured from here).
    pub available: Instant,
    /// 80 ms of 24 kHz audio.
    pub input: Vec<f32>,
    /// Mimi's code per codebook for `input` (the encode stage).
    pub codes: Vec<u32>,
    /// The LM's text token of this step, when it is text (not padding).
    pub text: Option<u32>,
    /// The STT's semantic end-of-turn head, when the model has one.
    pub end_of_turn: Option<HeadReading>,
    /// The model's audio codes of this step (duplex), for the decoder.
    pub reply_codes: Option<Vec<u32>>,
    /// The audio this step produced for the speaker, if any (also queued for playout).
    pub output: Option<Vec<f32>>,
    /// The user's words the STT wrote at this step (reported frames only).
    pub heard: Option<String>,
    /// The turn-taking policy says the user started speaking at this frame.
    pub speech_started: bool,
    /// The turn-taking policy ended the user's turn at this frame.
    pub turn_ended: bool,
    /// The STT brought out the words it still held after an end of turn (a
    /// [`FlushRequest`]): `heard` now has the turn's last words.
    pub stt_flushed: bool,
}

impl Frame {
    pub fn new(index: u64, input: Vec<f32>, available: Instant) -> Self {
        Self {
            index,
            reported: true,
            flushing: false,
            available,
            input,
            codes: vec![],
            text: None,
            end_of_turn: None,
            reply_codes: None,
            output: None,
            heard: None,
            speech_started: false,
            turn_ended: false,
            stt_flushed: false,
        }
    }

    /// A frame of silence.
    pub fn silence(index: u64) -> Self {
        Self::new(index, vec![0.0; FRAME_LEN_SAMPLES], Instant::now())
    }
}

/// After an end of turn, the turn stage asks the STT stage (at the next frame) to bring out
/// the words its delay still holds: the STT steps on silence at once instead of waiting
/// for the audio clock. The request carries the silence already heard since the user
/// stopped, which the delay needs no more steps for.
#[derive(Debug, Clone, Default)]
pub struct FlushRequest(std::sync::Arc<AtomicU64>);

impl FlushRequest {
    /// No request pending.
    const NONE: u64 = 0;

    /// Asks for a flush; `silence_s` of silence followed the user's last speech.
    pub fn request(&self, silence_s: f64) {
        let ms = (silence_s.max(0.0) * 1e3).round() as u64;
        self.0.store(ms.saturating_add(1), Ordering::SeqCst);
    }

    /// The pending request's silence in seconds, clearing it.
    pub fn take(&self) -> Option<f64> {
        match self.0.swap(Self::NONE, Ordering::SeqCst) {
            Self::NONE => None,
            v => Some((v - 1) as f64 / 1e3),
        }
    }
}

/// The end-of-turn head at one step: the probability that the user has finished, and the
/// time of input audio the step's outputs describe (the STT's delay taken off).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadReading {
    pub probability: f32,
    pub time_s: f64,
}

/// One part of a mode's work on the model thread.
pub trait Stage {
    /// A short name, used in metrics (`encode`, `stt`, `lm`, `decode`, `turn`, ...).
    fn name(&self) -> &'static str;

    /// Silence frames this stage needs before the input (they report nothing).
    fn prefix_frames(&self) -> usize {
        0
    }

    /// Silence frames this stage needs after the input to bring every output due out.
    fn flush_frames(&self) -> usize {
        0
    }

    /// One frame: read what earlier stages left in `frame`, leave this stage's results,
    /// send events and audio through `out`. Must not block beyond the frame's compute.
    fn on_frame(&mut self, frame: &mut Frame, out: &mut Outbox<'_>) -> Result<()>;

    /// The first samples of the next frame, heard before the rest of it
    /// ([`crate::audio::FrameSource::next_part`]): a stage may start on them now, while
    /// the model thread waits, so that less is left for the whole frame's
    /// [`Self::on_frame`] (which gets them again, at the start of `frame.input`). Only a
    /// stage that reads nothing from the stages before it can (Mimi's encoder). Returns
    /// whether it did anything (its time then counts as the frame's early work).
    fn on_early(&mut self, _part: &[f32]) -> Result<bool> {
        Ok(false)
    }

    /// After the last flush frame (`last` is its index): anything still held comes out.
    fn finish(&mut self, _last: u64, _out: &mut Outbox<'_>) -> Result<()> {
        Ok(())
    }

    /// Forget all streaming state: the next frame starts a new stream.
    fn reset(&mut self);

    /// The reply being produced is abandoned (barge-in, or a client's cancel): stop
    /// producing it. The audio already queued is dropped by the session, not the stage.
    fn cancel(&mut self) {}
}

/// A mode's stages in order, and whether it speaks (has output audio on the frame clock).
pub struct Composition<'a> {
    pub stages: Vec<Box<dyn Stage + 'a>>,
    pub speaks: bool,
}

impl Composition<'_> {
    pub fn prefix_frames(&self) -> usize {
        self.stages
            .iter()
            .map(|s| s.prefix_frames())
            .max()
            .unwrap_or(0)
    }

    pub fn flush_frames(&self) -> usize {
        self.stages
            .iter()
            .map(|s| s.flush_frames())
            .max()
            .unwrap_or(0)
    }
}

/// How the session's event channel is used (shared by every thread of a session).
#[derive(Clone)]
pub(crate) struct Events {
    pub tx: Sender<Event>,
    pub drop_when_full: bool,
    pub audio_stats: Option<crate::audio::AudioStats>,
    pub aec_stats: Option<crate::audio::echo::AecStats>,
    pub levels: bool,
}

impl Events {
    pub fn send(&self, e: Event) {
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

/// What a stage sends out while it runs.
pub struct Outbox<'a> {
    pub(crate) events: &'a Events,
    pub(crate) playout: &'a Playout,
    pub(crate) cancel_requested: bool,
}

impl Outbox<'_> {
    pub fn send(&self, e: Event) {
        self.events.send(e);
    }

    /// Queues one frame of audio for the speaker.
    pub fn play(&self, pcm: Vec<f32>) -> Result<()> {
        self.playout.push(pcm)
    }

    /// Frames of audio queued for the speaker and not yet played: a stage producing a
    /// reply faster than real time holds back while this is high.
    pub fn queued_frames(&self) -> usize {
        self.playout.len()
    }

    /// Abandons the reply (barge-in): the queued audio is dropped and every stage's
    /// [`Stage::cancel`] runs before the next frame.
    pub fn cancel_reply(&mut self) {
        self.cancel_requested = true;
    }
}

/// The most audio the playout queue holds: a minute.
pub const PLAYOUT_MAX_FRAMES: usize = 750;

/// Audio waiting for the speaker, shared by the model thread (which queues it), the output
/// thread (which takes one frame per tick of its clock) and whoever cancels a reply.
#[derive(Debug, Default)]
pub struct Playout {
    queue: Mutex<VecDeque<Vec<f32>>>,
    /// Bumped by every cancel: the output thread then drops what the device still holds.
    generation: AtomicU64,
}

impl Playout {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Vec<f32>>> {
        // A panic while holding the lock left a queue of whole frames: still usable.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn push(&self, pcm: Vec<f32>) -> Result<()> {
        if pcm.len() != FRAME_LEN_SAMPLES {
            return Err(Error::InvalidInput(format!(
                "a playout frame of {} samples (80 ms is {FRAME_LEN_SAMPLES})",
                pcm.len()
            )));
        }
        let mut q = self.lock();
        if q.len() >= PLAYOUT_MAX_FRAMES {
            return Err(Error::InvalidInput(format!(
                "more than {PLAYOUT_MAX_FRAMES} frames of audio queued for the speaker \
                 (a producer must hold back while `queued_frames` is high)"
            )));
        }
        q.push_back(pcm);
        Ok(())
    }

    pub fn pop(&self) -> Option<Vec<f32>> {
        self.lock().pop_front()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops everything queued; returns how many frames.
    pub fn cancel(&self) -> usize {
        let mut q = self.lock();
        let n = q.len();
        q.clear();
        self.generation.fetch_add(1, Ordering::Relaxed);
        n
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }
}

/// A stage's work on its own named thread: jobs in through a bounded channel (never
/// blocking the model thread: a full queue refuses the job), results out through another,
/// polled. The thread owns `M` (a model) and hands it back when closed.
pub struct Worker<J, R, M> {
    jobs: Option<Sender<J>>,
    results: Receiver<R>,
    handle: Option<JoinHandle<M>>,
}

impl<J: Send + 'static, R: Send + 'static, M: Send + 'static> Worker<J, R, M> {
    /// Starts thread `name` running `work(&mut model, job)` for each job, `queue` jobs deep.
    pub fn spawn(
        name: &str,
        queue: usize,
        mut model: M,
        mut work: impl FnMut(&mut M, J) -> R + Send + 'static,
    ) -> Result<Self> {
        let (jobs, job_rx) = bounded::<J>(queue.max(1));
        let (res_tx, results) = bounded::<R>(queue.max(1) + 1);
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for job in job_rx.iter() {
                    if res_tx.send(work(&mut model, job)).is_err() {
                        break;
                    }
                }
                model
            })
            .map_err(|e| Error::InvalidInput(format!("starting the {name} thread: {e}")))?;
        Ok(Self {
            jobs: Some(jobs),
            results,
            handle: Some(handle),
        })
    }

    /// Queues a job; false if the queue is full (the worker is behind) or it has stopped.
    pub fn try_submit(&self, job: J) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.try_send(job).is_ok())
    }

    pub fn try_result(&self) -> Option<R> {
        self.results.try_recv().ok()
    }

    /// Waits up to `timeout` for a result (at the end of a session only).
    pub fn wait_result(&self, timeout: Duration) -> Option<R> {
        self.results.recv_timeout(timeout).ok()
    }

    /// Ends the thread after its queued jobs; returns its model (None if it panicked).
    pub fn close(mut self) -> Option<M> {
        self.jobs.take();
        // Results nobody will read must not block the thread: drain until it has gone.
        for _ in self.results.iter() {}
        self.handle.take()?.join().ok()
    }
}
