//! The virtual device: a recording played into the pipeline as if it were the microphone
//! ([`FileSource`]), and a sink that keeps what would have gone to the speakers, with when
//! each frame was written ([`RecordingSink`]).
//!
//! Both run entirely on the caller's thread; [`FileSource`] in [`Pace::RealTime`] sleeps
//! until each frame is due, nothing else blocks. They implement the same [`FrameSource`] and
//! [`FrameSink`] traits as the live devices, so the latency harness runs the very pipeline
//! code that the microphone and speakers do.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use super::file::{read_audio_24k, write_wav_f32};
use super::{
    check_frame_len, FrameSink, FrameSource, FRAME_DURATION, FRAME_LEN_SAMPLES, SAMPLE_RATE_HZ,
};
use crate::Result;

/// How fast a [`FileSource`] hands out frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// As a microphone would: frame `k` (counting from 0) is returned no earlier than
    /// `start + (k + 1) × 80 ms`, when its last sample would have been spoken. Deadlines
    /// come from the start instant on the monotonic clock, so lateness never accumulates.
    RealTime,
    /// As fast as the caller asks.
    Unpaced,
}

/// A 24 kHz mono recording played frame by frame as a [`FrameSource`].
#[derive(Debug, Clone)]
pub struct FileSource {
    pcm_24k: Vec<f32>,
    /// Next sample to hand out.
    pos: usize,
    pace: Pace,
    /// The session start: set by [`starting_at`](Self::starting_at), or at the first
    /// `next_frame`.
    start: Option<Instant>,
    frames_read: u64,
}

impl FileSource {
    /// Reads any supported audio file (converted to 24 kHz mono) to play at `pace`.
    pub fn open(path: &Path, pace: Pace) -> Result<Self> {
        Ok(Self::from_pcm_24k(read_audio_24k(path)?, pace))
    }

    /// Plays `pcm_24k` (mono, 24 kHz) at `pace`.
    pub fn from_pcm_24k(pcm_24k: Vec<f32>, pace: Pace) -> Self {
        Self {
            pcm_24k,
            pos: 0,
            pace,
            start: None,
            frames_read: 0,
        }
    }

    /// Counts real-time deadlines from `start` instead of from the first `next_frame`; give
    /// the same instant to [`RecordingSink::starting_at`] to put input and output on one
    /// clock.
    pub fn starting_at(mut self, start: Instant) -> Self {
        self.start = Some(start);
        self
    }

    /// Frames in the whole recording, the last one zero-padded.
    pub fn frame_count(&self) -> usize {
        self.pcm_24k.len().div_ceil(FRAME_LEN_SAMPLES)
    }

    /// Frames handed out so far.
    pub fn frames_read(&self) -> u64 {
        self.frames_read
    }

    /// When frame `index` is due in [`Pace::RealTime`], from the session start.
    pub fn due_after_start(index: u64) -> Duration {
        Duration::from_micros(80_000 * (index + 1))
    }

    /// In [`Pace::RealTime`], sleeps until the first `samples` of the next frame have
    /// been spoken.
    fn wait_for(&mut self, samples: usize) {
        if self.pace != Pace::RealTime {
            return;
        }
        let start = *self.start.get_or_insert_with(Instant::now);
        let short = Duration::from_micros(
            ((FRAME_LEN_SAMPLES - samples) as u64 * 1_000_000) / u64::from(SAMPLE_RATE_HZ),
        );
        let due = start + Self::due_after_start(self.frames_read) - short;
        loop {
            let now = Instant::now();
            if now >= due {
                break;
            }
            thread::sleep(due - now);
        }
    }

    /// Copies the next frame's first `out.len()` samples (zeros past the recording's end).
    fn copy_ahead(&self, out: &mut [f32]) {
        let end = (self.pos + out.len()).min(self.pcm_24k.len());
        let n = end - self.pos;
        out[..n].copy_from_slice(&self.pcm_24k[self.pos..end]);
        out[n..].fill(0.0);
    }
}

impl FrameSource for FileSource {
    fn next_frame(&mut self, frame: &mut [f32; FRAME_LEN_SAMPLES]) -> Result<bool> {
        if self.pos >= self.pcm_24k.len() {
            return Ok(false);
        }
        self.wait_for(FRAME_LEN_SAMPLES);
        self.copy_ahead(frame);
        self.pos = (self.pos + FRAME_LEN_SAMPLES).min(self.pcm_24k.len());
        self.frames_read += 1;
        Ok(true)
    }

    /// In [`Pace::RealTime`] only (unpaced, the whole frame is there at once).
    fn next_part(&mut self, part: &mut [f32]) -> Result<bool> {
        if self.pace != Pace::RealTime
            || self.pos >= self.pcm_24k.len()
            || part.is_empty()
            || part.len() >= FRAME_LEN_SAMPLES
        {
            return Ok(false);
        }
        self.wait_for(part.len());
        self.copy_ahead(part);
        Ok(true)
    }
}

/// What a [`RecordingSink`] received.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recording {
    /// Every frame written, in order, 24 kHz mono.
    pub pcm_24k: Vec<f32>,
    /// When each frame was written, from the session start: frame `k` is
    /// `pcm_24k[k * 1920..(k + 1) * 1920]`.
    pub frame_times: Vec<Duration>,
    /// When `finish` was last called, from the session start.
    pub finished_at: Option<Duration>,
}

impl Recording {
    /// Writes the audio as a 32-bit float WAV at 24 kHz.
    pub fn write_wav(&self, path: &Path) -> Result<()> {
        write_wav_f32(path, &self.pcm_24k, SAMPLE_RATE_HZ)
    }
}

/// A [`FrameSink`] that records every frame and the instant it was written.
///
/// The recording is shared with [`RecordingHandle`]s, so it can be read while (or after)
/// a pipeline thread owns the sink.
#[derive(Debug)]
pub struct RecordingSink {
    start: Instant,
    recording: Arc<Mutex<Recording>>,
}

/// Reads the recording of a [`RecordingSink`] from any thread.
#[derive(Debug, Clone)]
pub struct RecordingHandle {
    recording: Arc<Mutex<Recording>>,
}

impl RecordingSink {
    /// A sink whose session starts now.
    pub fn new() -> Self {
        Self::starting_at(Instant::now())
    }

    /// A sink whose frame times count from `start` (see [`FileSource::starting_at`]).
    pub fn starting_at(start: Instant) -> Self {
        Self {
            start,
            recording: Arc::default(),
        }
    }

    /// A handle to read the recording with.
    pub fn handle(&self) -> RecordingHandle {
        RecordingHandle {
            recording: self.recording.clone(),
        }
    }

    /// A copy of what has been recorded so far.
    pub fn recording(&self) -> Recording {
        self.handle().recording()
    }
}

impl Default for RecordingSink {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordingHandle {
    /// A copy of what has been recorded so far.
    pub fn recording(&self) -> Recording {
        self.lock().clone()
    }

    /// Frames recorded so far.
    pub fn frames_written(&self) -> usize {
        self.lock().frame_times.len()
    }

    /// Writes what has been recorded so far as a 32-bit float WAV at 24 kHz.
    pub fn write_wav(&self, path: &Path) -> Result<()> {
        self.lock().write_wav(path)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recording> {
        // A panic while holding the lock leaves whole frames behind; the data stays usable.
        self.recording
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl FrameSink for RecordingSink {
    fn write_frame(&mut self, frame: &[f32]) -> Result<()> {
        check_frame_len(frame, &"recording sink")?;
        let at = Instant::now().saturating_duration_since(self.start);
        let mut rec = self
            .recording
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        rec.pcm_24k.extend_from_slice(frame);
        rec.frame_times.push(at);
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        let at = Instant::now().saturating_duration_since(self.start);
        self.recording
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .finished_at = Some(at);
        Ok(())
    }
}

/// A simulated room for echo cancellation: what a sink plays comes back into a source
/// through an echo path, added to the source's own audio (the user's speech), as it would
/// from a laptop's speakers into its microphone.
///
/// The echo path is an impulse response at 24 kHz (its delay included, zero taps skipped).
/// Output frame `m` starts to sound at input sample `(m + latency_frames) × 1920`: the
/// output device's latency (at least one frame). To build input frame `k` the source waits for the output frames
/// it needs (up to frame `k - latency_frames`), as a live device's clock would: not after the
/// output has finished, and never more than 2 s. A room is for sessions that play on every
/// tick of the frame clock (silence included), as duplex and cascade sessions do.
#[derive(Debug)]
pub struct EchoRoom;

/// The microphone of an [`EchoRoom`].
#[derive(Debug)]
pub struct EchoRoomSource<S> {
    inner: S,
    room: Arc<RoomShared>,
    taps: Vec<(usize, f32)>,
    latency: usize,
    frames_read: u64,
}

/// The speaker of an [`EchoRoom`].
#[derive(Debug)]
pub struct EchoRoomSink<K> {
    inner: K,
    room: Arc<RoomShared>,
    /// Played samples kept: as many as the device latency and the longest tap reach back.
    keep: usize,
    /// The output latency the room reports (its device part, not the echo path's delay).
    latency: Option<Duration>,
}

#[derive(Debug, Default)]
struct RoomShared {
    state: Mutex<RoomState>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct RoomState {
    /// Played samples from output sample `first` on.
    played: std::collections::VecDeque<f32>,
    first: usize,
    frames_written: u64,
    finished: bool,
}

/// A room's echo path at 24 kHz: silence for `delay_ms`, the direct sound, then
/// reflections every millisecond with pseudo-random signs and sizes decaying by 60 dB over
/// `rt60_ms`; unit energy scaled to `gain` (the echo's level against what is played).
/// Sparse (one tap per millisecond), so simulating it stays cheap; deterministic.
pub fn room_impulse_response(delay_ms: f64, rt60_ms: f64, gain: f32) -> Vec<f32> {
    let rate = SAMPLE_RATE_HZ as f64;
    let d = (delay_ms.max(0.0) * rate / 1000.0) as usize;
    let len = (rt60_ms.max(1.0) * rate / 1000.0) as usize;
    let step = SAMPLE_RATE_HZ as usize / 1000;
    let mut h = vec![0.0f32; d + len];
    h[d] = 1.0;
    let mut noise = white_noise(0x2545F4914F6CDD1D);
    for i in (step..len).step_by(step) {
        let noise = noise();
        let t_ms = i as f64 * 1000.0 / rate;
        h[d + i] = 0.5 * noise * (-6.9 * t_ms / rt60_ms.max(1.0)).exp() as f32;
    }
    let norm = h.iter().map(|v| v * v).sum::<f32>().sqrt();
    h.iter_mut().for_each(|v| *v *= gain / norm);
    h
}

/// Deterministic white noise, uniform in [-1, 1) (xorshift64; a `seed` of 0 counts as 1),
/// for simulated rooms: their echo paths and noise floors.
pub fn white_noise(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed.max(1);
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// How long the room's microphone waits for the output it needs.
const ROOM_WAIT: Duration = Duration::from_secs(2);

impl EchoRoom {
    /// A source and a sink sharing a room with `impulse_response` between them (see
    /// [`EchoRoom`]).
    #[allow(clippy::new_ret_no_self)]
    pub fn new<S: FrameSource, K: FrameSink>(
        source: S,
        sink: K,
        impulse_response: Vec<f32>,
        latency_frames: usize,
    ) -> (EchoRoomSource<S>, EchoRoomSink<K>) {
        let taps: Vec<(usize, f32)> = impulse_response
            .iter()
            .copied()
            .enumerate()
            .filter(|t| t.1 != 0.0)
            .collect();
        let room = Arc::new(RoomShared::default());
        // A room without device latency would have each input frame wait for the output
        // of that same frame, which comes only after it: one frame at least.
        let latency_frames = latency_frames.max(1);
        // Played samples kept: as far back as the device latency and the longest tap
        // reach from the newest input frame, plus the frames the input may lag behind.
        let keep = impulse_response.len() + (latency_frames + 2) * FRAME_LEN_SAMPLES;
        (
            EchoRoomSource {
                inner: source,
                room: room.clone(),
                taps,
                latency: latency_frames,
                frames_read: 0,
            },
            EchoRoomSink {
                inner: sink,
                room,
                keep,
                latency: Some(FRAME_DURATION * latency_frames as u32),
            },
        )
    }
}

impl RoomShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, RoomState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<S: FrameSource> FrameSource for EchoRoomSource<S> {
    fn next_frame(&mut self, frame: &mut [f32; FRAME_LEN_SAMPLES]) -> Result<bool> {
        if !self.inner.next_frame(frame)? {
            return Ok(false);
        }
        let k = self.frames_read as usize;
        self.frames_read += 1;
        let mut state = self.room.lock();
        if let Some(last_needed) = k.checked_sub(self.latency) {
            let deadline = Instant::now() + ROOM_WAIT;
            while !state.finished && state.frames_written <= last_needed as u64 {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                state = self
                    .room
                    .changed
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        // Input sample t hears output sample t - latency × 1920 - lag for each tap.
        let offset = self.latency * FRAME_LEN_SAMPLES;
        let end = state.first + state.played.len();
        for (i, y) in frame.iter_mut().enumerate() {
            let t = k * FRAME_LEN_SAMPLES + i;
            for &(lag, gain) in &self.taps {
                let Some(s) = t.checked_sub(offset + lag) else {
                    continue;
                };
                if s >= state.first && s < end {
                    *y += gain * state.played[s - state.first];
                }
            }
        }
        Ok(true)
    }
}

impl<K> EchoRoomSink<K> {
    /// The sink no longer reports its latency, as a device that says nothing (the echo's
    /// delay is then for the canceller alone to find).
    pub fn hiding_latency(mut self) -> Self {
        self.latency = None;
        self
    }
}

impl<K: FrameSink> FrameSink for EchoRoomSink<K> {
    /// The room's output latency (`latency_frames` × 80 ms), as a device would report it.
    fn latency(&self) -> Option<Duration> {
        self.latency
    }

    fn write_frame(&mut self, frame: &[f32]) -> Result<()> {
        self.inner.write_frame(frame)?;
        let mut state = self.room.lock();
        state.played.extend(frame.iter().copied());
        let over = state.played.len().saturating_sub(self.keep);
        state.played.drain(..over);
        state.first += over;
        state.frames_written += 1;
        state.finished = false;
        self.room.changed.notify_all();
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        let r = self.inner.finish();
        self.room.lock().finished = true;
        self.room.changed.notify_all();
        r
    }

    fn discard_queued(&mut self) {
        // What the device still held would not have been heard; the room has already
        // "played" it (its latency is modelled by the source's offset only).
        self.inner.discard_queued();
    }
}
