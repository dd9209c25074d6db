//! Acoustic echo cancellation: Parley's own voice removed from the microphone, so that on a
//! laptop's speakers the VAD, the turn detector and the models hear the user, not Parley.
//!
//! The canceller is WebRTC's AEC3 as ported to Rust by `sonora` (the whole audio processing
//! module: AEC3, its delay estimator, the optional noise suppressor). Chosen on measurements
//! against the other pure-Rust port, `aec3` 0.4, on a synthetic room (far-end speech through
//! a 20-500 ms delay and a 250 ms decaying impulse response, the user's speech at -10, 0 and
//! +10 dB against the echo, 60 s at 24 kHz; both without noise suppression): echo return
//! loss enhancement on echo-only stretches 33-67 dB for sonora and 34-42 dB for aec3 (the
//! same at 200 ms: 32.9 vs 33.9 dB at 0 dB), the user's speech alone kept within 0.5-1.8 dB
//! by both, 3.7 ms vs 4.0 ms of CPU per 80 ms frame (release build, one core of a 2-core
//! Xeon), both pure Rust (about 30 s to build, no C++ toolchain), BSD-3-Clause (aec3: MIT or
//! BSD-3). Sonora has WebRTC's own `AudioProcessing` interface, which aec3 0.4 replaces with
//! a graph API its README calls work in progress; that decided a near tie. The C++ original
//! (`webrtc-audio-processing`, bundled) was not measured: it needs meson and abseil to build,
//! minutes of C++ in every clean CI build, for an algorithm the ports already carry.
//!
//! Where it runs: [`echo_cancelling`] wraps a session's source and sink. The sink side
//! copies every frame Parley plays (silence included) to a bounded channel; the source side,
//! on the audio-in thread, feeds those frames to the canceller as its reference and then
//! cleans each captured frame, before the frame goes to any stage. Never in a device
//! callback. The reference is handed over when it is written, ahead of when it is heard by
//! the output's queue and the devices' buffers: it is held back by the latencies the devices
//! report ([`FrameSink::latency`], [`FrameSource::latency`]: cpal's callback timestamps and
//! what the rings hold) less one frame, and AEC3's own delay estimator finds the rest (it
//! found echoes 20-500 ms after their reference in the comparison above; 1040 ms was beyond
//! it). WebRTC's stream delay hint is not used: AEC3's default configuration ignores it, and
//! sonora does not expose the one that uses it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use sonora::config::{EchoCanceller as AecConfig, NoiseSuppression};
use sonora::{AudioProcessing, Config, StreamConfig};

use super::{FrameSink, FrameSource, FRAME_DURATION, FRAME_LEN_SAMPLES, SAMPLE_RATE_HZ};
use crate::{Error, Result};

/// The canceller's block: 10 ms at 24 kHz.
const BLOCK: usize = SAMPLE_RATE_HZ as usize / 100;
/// Reference frames the channel holds (5 s): more than any output queue ahead of capture.
const REFERENCE_FRAMES: usize = 64;
/// The longest the reference is held back for the devices' reported latencies (1 s).
const MAX_HOLD_FRAMES: u64 = 12;

/// Whether echo cancellation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AecMode {
    /// On, unless the output device's name says it is a headset or headphones.
    #[default]
    Auto,
    On,
    Off,
}

impl AecMode {
    pub const ALL: [AecMode; 3] = [AecMode::Auto, AecMode::On, AecMode::Off];

    /// Whether to cancel echo for output to `output_device` (its name as the host gives it).
    pub fn enabled_for(self, output_device: &str) -> bool {
        match self {
            AecMode::On => true,
            AecMode::Off => false,
            AecMode::Auto => !looks_like_headset(output_device),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AecMode::Auto => "auto",
            AecMode::On => "on",
            AecMode::Off => "off",
        }
    }
}

impl std::fmt::Display for AecMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AecMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "unknown echo cancellation mode `{s}` (expected auto, on or off)"
                ))
            })
    }
}

/// Whether an output device's name says the sound goes to the user's ears only (a
/// headset, headphones, earbuds), where there is no echo to cancel. As far as a name can
/// tell: a device whose name says nothing counts as speakers.
pub fn looks_like_headset(device_name: &str) -> bool {
    let name = device_name.to_lowercase();
    [
        "headset",
        "headphone",
        "earphone",
        "earbud",
        "airpods",
        "buds",
        "hands-free",
        "handsfree",
        "headset_head_unit",
    ]
    .iter()
    .any(|w| name.contains(w))
}

/// The canceller's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AecSettings {
    /// WebRTC's noise suppressor after the canceller (moderate, ~12 dB). Off by default:
    /// the models were trained on unsuppressed audio.
    pub noise_suppression: bool,
}

/// WebRTC's AEC3 on 24 kHz mono 80 ms frames.
pub struct EchoCanceller {
    apm: AudioProcessing,
    settings: AecSettings,
    /// The render path's processed copy (the canceller writes one; Parley plays the
    /// original).
    scratch: [f32; BLOCK],
}

impl std::fmt::Debug for EchoCanceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoCanceller")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl EchoCanceller {
    pub fn new(settings: AecSettings) -> Self {
        let config = Config {
            echo_canceller: Some(AecConfig::default()),
            noise_suppression: settings.noise_suppression.then(NoiseSuppression::default),
            ..Default::default()
        };
        let stream = StreamConfig::new(SAMPLE_RATE_HZ, 1);
        let apm = AudioProcessing::builder()
            .config(config)
            .capture_config(stream)
            .render_config(stream)
            .build();
        Self {
            apm,
            settings,
            scratch: [0.0; BLOCK],
        }
    }

    pub fn settings(&self) -> AecSettings {
        self.settings
    }

    /// Forgets everything learnt (the echo path, the delay): a new session.
    pub fn reset(&mut self) {
        *self = Self::new(self.settings);
    }

    /// Feeds 80 ms of what is being played (24 kHz mono), in order, before the captured
    /// frames that may hold its echo.
    pub fn render(&mut self, frame: &[f32]) -> Result<()> {
        check_len(frame, "reference")?;
        for block in frame.chunks_exact(BLOCK) {
            self.apm
                .process_render_f32(&[block], &mut [&mut self.scratch])
                .map_err(|e| Error::InvalidInput(format!("echo canceller (reference): {e:?}")))?;
        }
        Ok(())
    }

    /// Removes the echo from 80 ms of captured audio (24 kHz mono), in place.
    pub fn capture(&mut self, frame: &mut [f32]) -> Result<()> {
        check_len(frame, "captured")?;
        for block in frame.chunks_exact_mut(BLOCK) {
            // WebRTC's interface asks for a delay with every capture block; AEC3's default
            // configuration does not use it (the reference is aligned before it gets here).
            let _ = self.apm.set_stream_delay_ms(0);
            self.scratch.copy_from_slice(block);
            self.apm
                .process_capture_f32(&[&self.scratch], &mut [block])
                .map_err(|e| Error::InvalidInput(format!("echo canceller (capture): {e:?}")))?;
        }
        Ok(())
    }
}

fn check_len(frame: &[f32], what: &str) -> Result<()> {
    if frame.len() == FRAME_LEN_SAMPLES {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "echo canceller: a {what} frame must hold {FRAME_LEN_SAMPLES} samples \
             (80 ms at 24 kHz), got {}",
            frame.len()
        )))
    }
}

/// What the canceller cost, readable from any thread.
#[derive(Debug, Clone, Default)]
pub struct AecStats(Arc<AecCounters>);

#[derive(Debug, Default)]
struct AecCounters {
    frames: AtomicU64,
    /// Nanoseconds of the last frame (its reference and its capture).
    last_ns: AtomicU64,
    total_ns: AtomicU64,
    /// Reference frames dropped because the channel was full (the input had stalled).
    dropped_reference: AtomicU64,
}

impl AecStats {
    /// Captured frames cleaned so far.
    pub fn frames(&self) -> u64 {
        self.0.frames.load(Ordering::Relaxed)
    }

    /// CPU time of the last frame (its reference and its capture), in ms.
    pub fn last_ms(&self) -> f64 {
        self.0.last_ns.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Mean CPU time per frame so far, in ms.
    pub fn mean_ms(&self) -> f64 {
        let n = self.frames();
        if n == 0 {
            return 0.0;
        }
        self.0.total_ns.load(Ordering::Relaxed) as f64 / 1e6 / n as f64
    }

    /// Reference frames dropped because the capture side had stopped reading.
    pub fn dropped_reference(&self) -> u64 {
        self.0.dropped_reference.load(Ordering::Relaxed)
    }
}

/// Wraps a session's input and output so that what the output plays is cancelled from
/// what the input captures (see the module's documentation). `settings` are the
/// canceller's; the stats report its cost.
pub fn echo_cancelling(
    source: Box<dyn FrameSource>,
    sink: Box<dyn FrameSink>,
    settings: AecSettings,
) -> (Box<dyn FrameSource>, Box<dyn FrameSink>, AecStats) {
    let (tx, rx) = bounded(REFERENCE_FRAMES);
    let stats = AecStats::default();
    let source = CancellingSource {
        inner: source,
        reference: rx,
        held: std::collections::VecDeque::with_capacity(REFERENCE_FRAMES),
        fed: 0,
        captured: 0,
        aec: EchoCanceller::new(settings),
        stats: stats.clone(),
    };
    let sink = ReferenceTap {
        inner: sink,
        reference: tx,
        stats: stats.clone(),
    };
    (Box::new(source), Box::new(sink), stats)
}

/// The input side of [`echo_cancelling`].
struct CancellingSource {
    inner: Box<dyn FrameSource>,
    reference: Receiver<(Vec<f32>, Option<Duration>)>,
    /// Reference frames received and not yet fed, with the output latency reported when
    /// each was handed over.
    held: std::collections::VecDeque<(Vec<f32>, Option<Duration>)>,
    /// Reference frames fed, and captured frames cleaned, so far.
    fed: u64,
    captured: u64,
    aec: EchoCanceller,
    stats: AecStats,
}

/// How many captured frames after its own the reference of output frame `m` is fed: the
/// session writes output frame `m` while capture frame `m + 1` is being recorded, and it is
/// heard `output + input` latency later, as the devices report them. One frame less than
/// that, so the echo never comes before its reference and the canceller's own estimator
/// takes the rest; 0 when the devices report nothing, at most [`MAX_HOLD_FRAMES`].
///
/// In the simulated room (`tests/echo_cancel.rs`), 960 ms of device latency plus 80 ms of
/// echo path: 43.9 dB of echo removed with the hold, 2.4 dB without it (beyond what AEC3's
/// estimator searches).
fn hold_frames(output: Option<Duration>, input: Option<Duration>) -> u64 {
    let total = output.unwrap_or_default() + input.unwrap_or_default();
    let frames = (total.as_secs_f64() / FRAME_DURATION.as_secs_f64()) as u64;
    frames.saturating_sub(1).min(MAX_HOLD_FRAMES)
}

impl FrameSource for CancellingSource {
    fn latency(&self) -> Option<Duration> {
        self.inner.latency()
    }

    fn next_frame(&mut self, frame: &mut [f32; FRAME_LEN_SAMPLES]) -> Result<bool> {
        if !self.inner.next_frame(frame)? {
            return Ok(false);
        }
        let t = Instant::now();
        while let Ok(played) = self.reference.try_recv() {
            self.held.push_back(played);
        }
        // Output frame `fed` is due once `fed + 1 + hold` capture frames have come; the
        // queue never holds more than the channel could.
        while let Some((_, output)) = self.held.front() {
            let due = self.fed + 1 + hold_frames(*output, self.inner.latency());
            if due > self.captured && self.held.len() < REFERENCE_FRAMES {
                break;
            }
            if let Some((played, _)) = self.held.pop_front() {
                self.aec.render(&played)?;
                self.fed += 1;
            }
        }
        self.captured += 1;
        self.aec.capture(frame)?;
        let ns = t.elapsed().as_nanos() as u64;
        let c = &self.stats.0;
        c.last_ns.store(ns, Ordering::Relaxed);
        c.total_ns.fetch_add(ns, Ordering::Relaxed);
        c.frames.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }
}

/// The output side of [`echo_cancelling`]: hands a copy of each frame over as the
/// canceller's reference, then plays it.
struct ReferenceTap {
    inner: Box<dyn FrameSink>,
    reference: Sender<(Vec<f32>, Option<Duration>)>,
    stats: AecStats,
}

impl FrameSink for ReferenceTap {
    fn write_frame(&mut self, frame: &[f32]) -> Result<()> {
        // The reference goes first: the canceller must never see an echo before the audio
        // that made it (a device may play the frame before `write_frame` returns). A frame
        // the sink would refuse is not a reference.
        check_len(frame, "played")?;
        match self
            .reference
            .try_send((frame.to_vec(), self.inner.latency()))
        {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                // The input has stopped reading (it ended, or stalled for seconds): the
                // canceller will resynchronise on what comes next.
                self.stats
                    .0
                    .dropped_reference
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.inner.write_frame(frame)
    }

    fn finish(&mut self) -> Result<()> {
        self.inner.finish()
    }

    fn discard_queued(&mut self) {
        self.inner.discard_queued();
    }

    fn latency(&self) -> Option<Duration> {
        self.inner.latency()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_is_held_back_by_the_reported_latency_less_a_frame() {
        let ms = Duration::from_millis;
        assert_eq!(hold_frames(None, None), 0);
        // Less than two frames in all: fed at once (the next capture frame).
        assert_eq!(hold_frames(Some(ms(100)), Some(ms(30))), 0);
        assert_eq!(hold_frames(Some(ms(160)), None), 1);
        assert_eq!(hold_frames(Some(ms(900)), Some(ms(60))), 11);
        assert_eq!(hold_frames(Some(ms(5000)), None), MAX_HOLD_FRAMES);
    }

    #[test]
    fn auto_is_off_for_headsets_only() {
        assert!(AecMode::Auto.enabled_for("default"));
        assert!(AecMode::Auto.enabled_for("Built-in Audio Analog Stereo"));
        assert!(!AecMode::Auto.enabled_for("WH-1000XM4 Headphones"));
        assert!(!AecMode::Auto.enabled_for("bluez_output.Jabra_HEADSET.1"));
        assert!(AecMode::On.enabled_for("USB Headset"));
        assert!(!AecMode::Off.enabled_for("default"));
        assert_eq!("on".parse::<AecMode>().ok(), Some(AecMode::On));
        let err = "yes".parse::<AecMode>().expect_err("unknown mode");
        assert!(
            err.to_string().contains("expected auto, on or off"),
            "{err}"
        );
    }

    #[test]
    fn frames_of_the_wrong_length_are_errors() {
        let mut aec = EchoCanceller::new(AecSettings::default());
        assert!(aec.render(&[0.0; 100]).is_err());
        let mut short = [0.0f32; 1919];
        let err = aec.capture(&mut short).expect_err("short frame");
        assert!(err.to_string().contains("1920"), "{err}");
    }
}
