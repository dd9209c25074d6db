//! Live audio devices through cpal: listing them, and capture and playback streams at each
//! device's own default configuration (any rate, any channel count, any sample format).
//!
//! Who runs what:
//!
//! - **The real-time callbacks** (cpal's stream threads, `cpal_alsa_in`/`cpal_alsa_out` on
//!   Linux) run a [`CaptureProcessor`] or a [`PlaybackProcessor`]: convert the device's
//!   samples to or from f32, downmix to mono or copy mono to every channel, and move them
//!   through a preallocated lock-free ring (`ringbuf`'s SPSC `HeapRb`). They never allocate,
//!   lock, block or log; shortfalls are counted in [`AudioStats`]' atomics (overruns when the
//!   capture ring is full, underruns when the playback ring runs dry, which plays silence).
//!   In debug builds every callback runs inside `assert_no_alloc`, which aborts the process on
//!   an allocation when the binary's global allocator is `assert_no_alloc::AllocDisabler`.
//! - **A stream-owner thread per stream** (`parley-audio-in`, `parley-audio-out`): cpal
//!   streams are not `Send`, so each is built, started and dropped on a thread of its own,
//!   which otherwise sleeps until the [`MicSource`] or [`SpeakerSink`] is dropped.
//! - **The caller's thread** (the pipeline's audio-in and audio-out threads): a
//!   [`MicSource`] pops the capture ring and resamples to 80 ms frames at 24 kHz; a
//!   [`SpeakerSink`] resamples 24 kHz frames to the device rate and pushes them into the
//!   playback ring. These block (polling the ring, never longer than
//!   [`DeviceOptions::timeout`] without progress, [`DeviceOptions::start_timeout`] before the
//!   stream's first audio).
//! - **cpal's error callback** (same thread as the data callback on ALSA) reports a device
//!   that went away: it marks the stream lost, so the next `next_frame` or `write_frame`
//!   fails with [`Error::AudioDeviceLost`], and sends an [`AudioEvent`] on the bounded
//!   channel given in [`DeviceOptions::events`] (dropped, never waited on, when it is full).

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use cpal::{FromSample, Sample, SampleFormat, SizedSample};
use crossbeam_channel::{Receiver, Sender};
use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

use super::resample::{InputResampler, OutputResampler};
use super::{check_frame_len, FrameSink, FrameSource, FRAME_LEN_SAMPLES, SAMPLE_RATE_HZ};
use crate::{Error, Result};

/// How many events the channel from [`event_channel`] holds before new ones are dropped.
pub const EVENT_CHANNEL_CAPACITY: usize = 32;
/// The smallest ring a stream gets, whatever [`DeviceOptions::ring_ms`] says.
const MIN_RING_MS: u32 = 100;
/// How long a stream may fail without moving audio before it counts as lost.
const LOST_AFTER_ERRORS_FOR: Duration = Duration::from_millis(500);
/// How long opening a stream may take before it is an error.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The callbacks' mono staging buffer, in frames (one sample per channel).
const SCRATCH_FRAMES: usize = 1024;

// ---------------------------------------------------------------------------------------
// Listing

/// One device as the host names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The name to pass to [`MicSource::open`] or [`SpeakerSink::open`].
    pub name: String,
    /// Whether this is the host's default device for its direction.
    pub is_default: bool,
}

/// The devices of the default host (ALSA on Linux, CoreAudio, WASAPI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceList {
    /// The host's name, e.g. `ALSA`.
    pub host: String,
    pub inputs: Vec<DeviceInfo>,
    pub outputs: Vec<DeviceInfo>,
}

/// Lists the default host's input and output devices.
pub fn list_devices() -> Result<DeviceList> {
    let host = cpal::default_host();
    let host_name = host.id().name().to_string();
    let default_in = host.default_input_device().and_then(|d| d.name().ok());
    let default_out = host.default_output_device().and_then(|d| d.name().ok());
    let mark = |names: Vec<String>, default: &Option<String>| -> Vec<DeviceInfo> {
        names
            .into_iter()
            .map(|name| DeviceInfo {
                is_default: default.as_deref() == Some(name.as_str()),
                name,
            })
            .collect()
    };
    let inputs = device_names(&host, Direction::Input)?;
    let outputs = device_names(&host, Direction::Output)?;
    Ok(DeviceList {
        inputs: mark(inputs, &default_in),
        outputs: mark(outputs, &default_out),
        host: host_name,
    })
}

fn devices(host: &cpal::Host, direction: Direction) -> Result<Vec<cpal::Device>> {
    let listed = match direction {
        Direction::Input => host.input_devices().map(|d| d.collect()),
        Direction::Output => host.output_devices().map(|d| d.collect()),
    };
    listed.map_err(|e| {
        Error::audio_device(
            host.id().name(),
            format!("cannot list the {direction} devices: {e}"),
        )
    })
}

fn device_names(host: &cpal::Host, direction: Direction) -> Result<Vec<String>> {
    Ok(devices(host, direction)?
        .iter()
        .filter_map(|d| d.name().ok())
        .collect())
}

/// The device called `name`, or the default one; an unknown name is an error that lists the
/// names there are.
fn find_device(
    host: &cpal::Host,
    name: Option<&str>,
    direction: Direction,
) -> Result<cpal::Device> {
    let Some(name) = name else {
        let device = match direction {
            Direction::Input => host.default_input_device(),
            Direction::Output => host.default_output_device(),
        };
        return device.ok_or_else(|| {
            Error::audio_device(
                "default",
                format!(
                    "the {} host has no default {direction} device",
                    host.id().name()
                ),
            )
        });
    };
    let mut others = Vec::new();
    for device in devices(host, direction)? {
        match device.name() {
            Ok(n) if n == name => return Ok(device),
            Ok(n) => others.push(n),
            Err(_) => {}
        }
    }
    let available = if others.is_empty() {
        "(none)".to_string()
    } else {
        others.join(", ")
    };
    Err(Error::audio_device(
        name,
        format!("no such {direction} device; the {direction} devices are: {available}"),
    ))
}

// ---------------------------------------------------------------------------------------
// Events, statistics, options

/// Which way audio flows through a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Input,
    Output,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Input => "input",
            Direction::Output => "output",
        })
    }
}

/// What a stream reports from cpal's error callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudioEvent {
    /// The device disappeared (unplugged, or its sound server stopped). The stream is dead:
    /// its source or sink returns [`Error::AudioDeviceLost`] from now on.
    DeviceLost {
        name: String,
        direction: Direction,
        reason: String,
    },
    /// The backend reported an error the stream may survive (at most one per second is
    /// sent; [`AudioStatsSnapshot::stream_errors`] counts them all).
    StreamError {
        name: String,
        direction: Direction,
        reason: String,
    },
    /// A lost device is back and its stream reopened ([`super::reopen`]).
    Reopened { name: String, direction: Direction },
}

/// A bounded channel for [`AudioEvent`]s, to put in [`DeviceOptions::events`].
pub fn event_channel() -> (Sender<AudioEvent>, Receiver<AudioEvent>) {
    crossbeam_channel::bounded(EVENT_CHANNEL_CAPACITY)
}

#[derive(Debug)]
struct Counters {
    capture_callbacks: AtomicU64,
    captured_samples: AtomicU64,
    overrun_samples: AtomicU64,
    overrun_events: AtomicU64,
    playback_callbacks: AtomicU64,
    played_samples: AtomicU64,
    underrun_samples: AtomicU64,
    underrun_events: AtomicU64,
    /// What the devices report in their callbacks' timestamps, in microseconds (0: not
    /// reported): from capture to the capture callback, and from the playback callback to
    /// the moment its first sample is played.
    capture_device_latency_us: AtomicU64,
    playback_device_latency_us: AtomicU64,
    /// The longest capture callback in microseconds (0: not measured): how unevenly
    /// captured audio arrives, which playback's margin allows for.
    capture_chunk_us: AtomicU64,
    /// The least audio, in microseconds, a playback callback left in the ring once it had
    /// taken what it needed (`u64::MAX`: none measured yet).
    playback_low_water_us: AtomicU64,
    stream_errors: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        let zero = || AtomicU64::new(0);
        Self {
            capture_callbacks: zero(),
            captured_samples: zero(),
            overrun_samples: zero(),
            overrun_events: zero(),
            playback_callbacks: zero(),
            played_samples: zero(),
            underrun_samples: zero(),
            underrun_events: zero(),
            capture_chunk_us: zero(),
            capture_device_latency_us: zero(),
            playback_device_latency_us: zero(),
            playback_low_water_us: AtomicU64::new(u64::MAX),
            stream_errors: zero(),
        }
    }
}

/// Counters the real-time callbacks keep, readable from any thread. Cloning shares them:
/// give one `AudioStats` to a capture and a playback stream to count both in one place.
///
/// Samples are counted per channel-frame, that is as mono samples at the device's rate.
#[derive(Debug, Clone, Default)]
pub struct AudioStats(Arc<Counters>);

/// The counters of an [`AudioStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AudioStatsSnapshot {
    /// Capture callbacks run.
    pub capture_callbacks: u64,
    /// Samples the capture device delivered (kept or dropped).
    pub captured_samples: u64,
    /// Captured samples dropped because the capture ring was full.
    pub overrun_samples: u64,
    /// Capture callbacks that dropped samples.
    pub overrun_events: u64,
    /// Playback callbacks run.
    pub playback_callbacks: u64,
    /// Samples taken from the playback ring and played.
    pub played_samples: u64,
    /// Samples of silence played because the ring ran dry while output was expected
    /// (between a sink's first `write_frame` and its `finish`).
    pub underrun_samples: u64,
    /// Playback callbacks that ran dry while output was expected.
    pub underrun_events: u64,
    /// How close playback came to running dry: the least audio (microseconds) a callback
    /// left in the ring after taking what it needed, while output was expected; `None`
    /// before the first such callback, or for a processor that was given no sample rate.
    pub playback_low_water_us: Option<u64>,
    /// Errors reported by cpal's error callback.
    pub stream_errors: u64,
}

impl AudioStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Data callbacks run so far in `direction`.
    fn callbacks(&self, direction: Direction) -> u64 {
        match direction {
            Direction::Input => self.0.capture_callbacks.load(Ordering::Relaxed),
            Direction::Output => self.0.playback_callbacks.load(Ordering::Relaxed),
        }
    }

    /// The capture device's latency as its callbacks report it (`None` until one does).
    pub fn capture_device_latency(&self) -> Option<Duration> {
        let us = self.0.capture_device_latency_us.load(Ordering::Relaxed);
        (us > 0).then(|| Duration::from_micros(us))
    }

    /// The playback device's latency as its callbacks report it (`None` until one does).
    pub fn playback_device_latency(&self) -> Option<Duration> {
        let us = self.0.playback_device_latency_us.load(Ordering::Relaxed);
        (us > 0).then(|| Duration::from_micros(us))
    }

    /// Reads every counter (each exact; the set is not one atomic snapshot).
    pub fn snapshot(&self) -> AudioStatsSnapshot {
        let c = &self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AudioStatsSnapshot {
            capture_callbacks: get(&c.capture_callbacks),
            captured_samples: get(&c.captured_samples),
            overrun_samples: get(&c.overrun_samples),
            overrun_events: get(&c.overrun_events),
            playback_callbacks: get(&c.playback_callbacks),
            played_samples: get(&c.played_samples),
            underrun_samples: get(&c.underrun_samples),
            underrun_events: get(&c.underrun_events),
            playback_low_water_us: Some(get(&c.playback_low_water_us)).filter(|&us| us != u64::MAX),
            stream_errors: get(&c.stream_errors),
        }
    }
}

/// How a live stream is opened.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// The ring between the callback and the caller's thread, in milliseconds of audio at
    /// the device's rate (at least 100). For capture, how long the reader may fall behind
    /// before samples are dropped; for playback, how far ahead of the device a writer may
    /// get before `write_frame` blocks.
    pub ring_ms: u32,
    /// How long `next_frame`, `write_frame` and `finish` wait without the device moving any
    /// audio before they give up with an error, once the stream has started moving audio.
    pub timeout: Duration,
    /// The same, before the stream's first audio: devices can be slow to start (a Bluetooth
    /// headset switching profiles; PulseAudio's null sink renders in blocks of up to 2 s
    /// while idle).
    pub start_timeout: Duration,
    /// Where the callbacks count (shared when cloned).
    pub stats: AudioStats,
    /// Where device errors are reported; see [`event_channel`].
    pub events: Option<Sender<AudioEvent>>,
    /// Playback's jitter margin: silence played ahead of the first frame (and again after a
    /// cancelled reply is dropped), so that a frame written a little late still plays on
    /// time. Added to one block of the output device and one of the input device sharing
    /// [`stats`](Self::stats) (measured from their callbacks: devices that move audio in
    /// large blocks need more), it is output latency. [`DEFAULT_OUTPUT_MARGIN`] unless set.
    pub output_margin: Duration,
}

/// The playback margin a [`DeviceOptions`] has by default, beyond the devices' blocks:
/// the waits of the threads that poll the rings ([`poll_wait`], at most 5 ms) and
/// scheduling. With no margin at all, a one-hour soak through PulseAudio
/// (`scripts/soak.sh`; its ALSA plug-in moves audio in blocks of ~25 ms each way) ran the
/// speaker dry 5 times in 45,000 frames although every frame was computed within a few ms.
/// The soak's `output_low_water_ms` shows the slack that remains.
pub const DEFAULT_OUTPUT_MARGIN: Duration = Duration::from_millis(15);

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            ring_ms: 500,
            timeout: Duration::from_secs(2),
            start_timeout: Duration::from_secs(10),
            stats: AudioStats::new(),
            events: None,
            output_margin: DEFAULT_OUTPUT_MARGIN,
        }
    }
}

/// The configuration a stream runs at: the device's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub device_name: String,
    pub direction: Direction,
    pub sample_rate_hz: u32,
    pub channels: u16,
    /// cpal's name for the sample format: `f32`, `i16`, `u16`, ...
    pub sample_format: String,
}

impl StreamInfo {
    fn new(
        device_name: String,
        direction: Direction,
        config: &cpal::SupportedStreamConfig,
    ) -> Self {
        Self {
            device_name,
            direction,
            sample_rate_hz: config.sample_rate().0,
            channels: config.channels(),
            sample_format: config.sample_format().to_string(),
        }
    }
}

impl fmt::Display for StreamInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} `{}`: {} Hz, {} channel(s), {}",
            self.direction,
            self.device_name,
            self.sample_rate_hz,
            self.channels,
            self.sample_format
        )
    }
}

/// A latency a callback reported, in microseconds (real-time thread: one atomic store).
fn store_latency(slot: &AtomicU64, latency: Option<Duration>) {
    if let Some(d) = latency {
        slot.store(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }
}

fn ring_capacity(sample_rate_hz: u32, ring_ms: u32) -> usize {
    let ms = ring_ms.max(MIN_RING_MS) as u64;
    (sample_rate_hz as u64 * ms).div_ceil(1000) as usize
}

// ---------------------------------------------------------------------------------------
// The real-time processors

/// The capture callback's state: moved into cpal's input callback, where it runs.
///
/// Built on the main thread by [`CaptureProcessor::with_ring`] (which also returns the
/// reading end of its ring); every method runs on the real-time thread.
pub struct CaptureProcessor {
    producer: HeapProd<f32>,
    channels: usize,
    /// Mono staging between conversion and the ring, sized once.
    mono: Box<[f32]>,
    stats: AudioStats,
    /// The device rate, to measure each callback's length (0: not measured).
    sample_rate_hz: u32,
    /// Callbacks run: the first, which delivers what built up while the stream started, is
    /// not a measure of the device's block.
    callbacks: u64,
}

impl CaptureProcessor {
    /// A processor for interleaved input of `channels` channels, and the consumer end of its
    /// ring of `capacity_samples` mono samples. Main thread.
    pub fn with_ring(
        channels: u16,
        capacity_samples: usize,
        stats: AudioStats,
    ) -> Result<(Self, HeapCons<f32>)> {
        if channels == 0 || capacity_samples == 0 {
            return Err(Error::InvalidInput(format!(
                "a capture ring needs at least one channel and one sample \
                 (got {channels} channel(s), {capacity_samples} samples)"
            )));
        }
        let (producer, consumer) = HeapRb::<f32>::new(capacity_samples).split();
        let processor = Self {
            producer,
            channels: channels as usize,
            mono: vec![0.0; SCRATCH_FRAMES].into_boxed_slice(),
            stats,
            sample_rate_hz: 0,
            callbacks: 0,
        };
        Ok((processor, consumer))
    }

    /// Keeps the capture latency the device reported for this callback (real-time thread:
    /// one atomic store).
    pub fn note_device_latency(&self, latency: Option<Duration>) {
        store_latency(&self.stats.0.capture_device_latency_us, latency);
    }

    /// Measures each callback's length at `sample_rate_hz` (the device's rate) into the
    /// stats, where a playback processor sharing them sizes its margin. Main thread.
    pub fn with_rate(mut self, sample_rate_hz: u32) -> Self {
        self.sample_rate_hz = sample_rate_hz;
        self
    }

    /// The body of the cpal callback: [`process`](Self::process) inside
    /// `assert_no_alloc` (which checks in debug builds whose global allocator is
    /// `AllocDisabler`, and does nothing otherwise). Runs on the real-time thread.
    pub fn process_callback<T>(&mut self, interleaved: &[T])
    where
        T: Sample,
        f32: FromSample<T>,
    {
        assert_no_alloc::assert_no_alloc(|| self.process(interleaved));
    }

    /// Converts interleaved samples of any format to f32, averages the channels, and pushes
    /// the mono samples into the ring; those that do not fit are dropped and counted as an
    /// overrun. A trailing partial frame is ignored. Runs on the real-time thread: no
    /// allocation, no lock, no I/O.
    pub fn process<T>(&mut self, interleaved: &[T])
    where
        T: Sample,
        f32: FromSample<T>,
    {
        let channels = self.channels;
        let scale = 1.0 / channels as f32;
        let mut captured = 0usize;
        let mut dropped = 0usize;
        for block in interleaved.chunks(channels * self.mono.len()) {
            let mut frames = 0;
            for (dst, frame) in self.mono.iter_mut().zip(block.chunks_exact(channels)) {
                let mut sum = 0.0f32;
                for &s in frame {
                    sum += f32::from_sample(s);
                }
                *dst = sum * scale;
                frames += 1;
            }
            let pushed = self.producer.push_slice(&self.mono[..frames]);
            captured += frames;
            dropped += frames - pushed;
        }
        let c = &self.stats.0;
        c.capture_callbacks.fetch_add(1, Ordering::Relaxed);
        c.captured_samples
            .fetch_add(captured as u64, Ordering::Relaxed);
        self.callbacks += 1;
        if self.sample_rate_hz > 0 && self.callbacks > 1 {
            let us = captured as u64 * 1_000_000 / self.sample_rate_hz as u64;
            // The largest block seen: blocks vary (a short one after an overrun), and a
            // margin sized from a short one would be too small.
            c.capture_chunk_us.fetch_max(us, Ordering::Relaxed);
        }
        if dropped > 0 {
            c.overrun_samples
                .fetch_add(dropped as u64, Ordering::Relaxed);
            c.overrun_events.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The playback callback's state: moved into cpal's output callback, where it runs.
///
/// Built on the main thread by [`PlaybackProcessor::with_ring`], which also returns the
/// [`PlaybackFeed`] that fills its ring; every method runs on the real-time thread.
pub struct PlaybackProcessor {
    consumer: HeapCons<f32>,
    channels: usize,
    /// Mono staging between the ring and conversion, sized once.
    mono: Box<[f32]>,
    stats: AudioStats,
    /// Whether output is expected now, so that running dry is an underrun.
    active: Arc<AtomicBool>,
    /// Set by [`PlaybackFeed::discard_queued`]: the next callback empties the ring first.
    discard: Arc<AtomicBool>,
    /// Silence played ahead of the ring's audio when a run of output starts, beyond the
    /// devices' blocks (samples).
    margin: usize,
    /// The last callback's request (samples): the device's block. Not the first callback's,
    /// which fills the device's whole buffer at the start.
    last_request: usize,
    /// Callbacks run.
    callbacks: u64,
    /// Whether the current run of output has started (audio arrived after the start or a
    /// discard); until it has, an empty ring is idle, not an underrun.
    started: bool,
    /// Margin silence still to play before the ring's audio.
    lead_in: usize,
    /// The device rate, for the low-water mark (0: not measured).
    sample_rate_hz: u32,
}

/// The writing end of a playback ring (main or pipeline thread).
pub struct PlaybackFeed {
    producer: HeapProd<f32>,
    active: Arc<AtomicBool>,
    discard: Arc<AtomicBool>,
    /// Samples pushed over the feed's life.
    pushed: u64,
}

impl PlaybackProcessor {
    /// A processor for interleaved output of `channels` channels, and the feed for its ring
    /// of `capacity_samples` mono samples. Main thread.
    pub fn with_ring(
        channels: u16,
        capacity_samples: usize,
        stats: AudioStats,
    ) -> Result<(Self, PlaybackFeed)> {
        if channels == 0 || capacity_samples == 0 {
            return Err(Error::InvalidInput(format!(
                "a playback ring needs at least one channel and one sample \
                 (got {channels} channel(s), {capacity_samples} samples)"
            )));
        }
        let (producer, consumer) = HeapRb::<f32>::new(capacity_samples).split();
        let active = Arc::new(AtomicBool::new(false));
        let discard = Arc::new(AtomicBool::new(false));
        let processor = Self {
            consumer,
            channels: channels as usize,
            mono: vec![0.0; SCRATCH_FRAMES].into_boxed_slice(),
            stats,
            active: active.clone(),
            discard: discard.clone(),
            margin: 0,
            last_request: 0,
            callbacks: 0,
            started: false,
            lead_in: 0,
            sample_rate_hz: 0,
        };
        let feed = PlaybackFeed {
            producer,
            active,
            discard,
            pushed: 0,
        };
        Ok((processor, feed))
    }

    /// Plays `margin` of silence, plus a block of this device and one of the capture
    /// device sharing its stats, ahead of each run of output (see
    /// [`DeviceOptions::output_margin`]), and measures the low-water mark at `sample_rate_hz`
    /// (the device's rate). Main thread, before the processor moves into the callback.
    pub fn with_margin(mut self, margin: Duration, sample_rate_hz: u32) -> Self {
        self.margin = (margin.as_secs_f64() * sample_rate_hz as f64).round() as usize;
        self.sample_rate_hz = sample_rate_hz;
        self
    }

    /// Keeps the output latency the device reported for this callback (real-time thread:
    /// one atomic store).
    pub fn note_device_latency(&self, latency: Option<Duration>) {
        store_latency(&self.stats.0.playback_device_latency_us, latency);
    }

    /// The body of the cpal callback: [`process`](Self::process) inside
    /// `assert_no_alloc`. Runs on the real-time thread.
    pub fn process_callback<T>(&mut self, interleaved: &mut [T])
    where
        T: Sample + FromSample<f32>,
    {
        assert_no_alloc::assert_no_alloc(|| self.process(interleaved));
    }

    /// The silence ahead of a run of output: the margin, one block of this device (the
    /// ring is read a block at a time, so the audio's phase against the blocks moves the
    /// slack by up to one) and one block of the capture device sharing the stats (a frame
    /// is whole only when the block holding its end arrives, up to one block after its
    /// time). `needed` is this callback's request, used when no earlier one is known.
    fn run_margin(&self, needed: usize) -> usize {
        if self.sample_rate_hz == 0 {
            return 0; // no margin asked for (`with_margin` not called)
        }
        let block = if self.last_request > 0 {
            self.last_request
        } else {
            needed
        };
        let capture_us = self.stats.0.capture_chunk_us.load(Ordering::Relaxed);
        let capture = (capture_us * self.sample_rate_hz as u64).div_ceil(1_000_000) as usize;
        self.margin + block + capture
    }

    /// The next `frames` mono samples into `self.mono[..frames]`: margin silence first,
    /// then the ring's audio. Returns (samples from the ring, silence the ring could not
    /// fill). Real-time thread.
    fn take(&mut self, frames: usize) -> (usize, usize) {
        let lead = self.lead_in.min(frames);
        self.mono[..lead].fill(0.0);
        self.lead_in -= lead;
        let got = self.consumer.pop_slice(&mut self.mono[lead..frames]);
        self.mono[lead + got..frames].fill(0.0);
        (got, frames - lead - got)
    }

    /// Fills the device's interleaved buffer: pops mono samples from the ring, converts
    /// them to the device's format and writes each to every channel. Samples the ring does
    /// not have play as silence, counted as an underrun when output is expected. Runs on the
    /// real-time thread: no allocation, no lock, no I/O.
    pub fn process<T>(&mut self, interleaved: &mut [T])
    where
        T: Sample + FromSample<f32>,
    {
        let channels = self.channels;
        if self.discard.swap(false, Ordering::Acquire) {
            // A cancelled reply: what was queued is dropped, not played, and the next audio
            // starts a new run with its margin.
            self.consumer.clear();
            self.started = false;
        }
        let needed = interleaved.len() / channels;
        if !self.started && !self.consumer.is_empty() {
            self.started = true;
            self.lead_in = self.run_margin(needed);
        }
        self.callbacks += 1;
        if self.callbacks > 1 {
            self.last_request = needed;
        }
        let queued = self.consumer.occupied_len() + self.lead_in;
        let mut played = 0usize;
        let mut missing = 0usize;
        for block in interleaved.chunks_mut(channels * self.mono.len()) {
            let frames = block.len() / channels;
            let (got, short) = self.take(frames);
            for (frame, &x) in block.chunks_exact_mut(channels).zip(self.mono.iter()) {
                frame.fill(T::from_sample(x));
            }
            // A trailing partial frame (cpal never sends one) is silence.
            block[frames * channels..].fill(T::EQUILIBRIUM);
            played += got;
            missing += short;
        }
        let c = &self.stats.0;
        c.playback_callbacks.fetch_add(1, Ordering::Relaxed);
        c.played_samples.fetch_add(played as u64, Ordering::Relaxed);
        // Before a run of output starts (nothing written yet, or a discard), an empty ring
        // is idle; after `finish` too.
        if !self.started || !self.active.load(Ordering::Relaxed) {
            return;
        }
        if missing > 0 {
            c.underrun_samples
                .fetch_add(missing as u64, Ordering::Relaxed);
            c.underrun_events.fetch_add(1, Ordering::Relaxed);
        }
        if self.sample_rate_hz > 0 {
            let spare = queued.saturating_sub(needed) as u64;
            let us = spare * 1_000_000 / self.sample_rate_hz as u64;
            c.playback_low_water_us.fetch_min(us, Ordering::Relaxed);
        }
    }
}

impl PlaybackFeed {
    /// Pushes as many of `pcm` (mono, device rate) as fit; returns how many.
    pub fn push(&mut self, pcm: &[f32]) -> usize {
        let n = self.producer.push_slice(pcm);
        self.pushed += n as u64;
        n
    }

    /// Whether the callback has taken any sample from the ring yet.
    pub fn has_moved(&self) -> bool {
        self.pushed > self.queued_samples() as u64
    }

    /// Says whether output is expected from now on: while it is, a callback that finds the
    /// ring short counts an underrun. Idle silence (before the first frame, after `finish`)
    /// is not one.
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Relaxed);
    }

    /// Asks the callback to drop everything queued, at its next run (a cancelled reply).
    pub fn discard_queued(&self) {
        self.discard.store(true, Ordering::Release);
    }

    /// Whether a [`discard_queued`](Self::discard_queued) waits for the next callback.
    pub fn discard_pending(&self) -> bool {
        self.discard.load(Ordering::Acquire)
    }

    /// Samples queued and not yet taken by the callback.
    pub fn queued_samples(&self) -> usize {
        self.producer.occupied_len()
    }

    /// Room left in the ring.
    pub fn free_samples(&self) -> usize {
        self.producer.vacant_len()
    }
}

// ---------------------------------------------------------------------------------------
// Stream plumbing

/// Set from cpal's error callback, read by the thread that uses the stream.
#[derive(Debug, Default)]
struct StreamHealth {
    lost: AtomicBool,
    reason: OnceLock<String>,
}

impl StreamHealth {
    fn lost_error(&self, device: &str) -> Option<Error> {
        if !self.lost.load(Ordering::Acquire) {
            return None;
        }
        let reason = self
            .reason
            .get()
            .cloned()
            .unwrap_or_else(|| "the stream stopped".to_string());
        Some(Error::AudioDeviceLost {
            device: device.to_string(),
            reason,
        })
    }
}

/// cpal's error callback for one stream. It runs on cpal's stream thread but is not the data
/// callback: it may allocate to format a reason, and never blocks (every send is a
/// `try_send`).
///
/// The stream is declared lost on `DeviceNotAvailable`, or when errors keep coming for
/// [`LOST_AFTER_ERRORS_FOR`] with no data callback of this direction in between: cpal's ALSA
/// backend reports a vanished device (an unplugged card, a sound server that died) only as a
/// backend error, again and again in a tight loop. Once lost, the owner thread is told to
/// drop the stream, which ends that loop.
fn error_callback(
    name: String,
    direction: Direction,
    health: Arc<StreamHealth>,
    stats: AudioStats,
    events: Option<Sender<AudioEvent>>,
    stop_stream: Sender<()>,
) -> impl FnMut(cpal::StreamError) + Send + 'static {
    let mut last_report: Option<Instant> = None;
    // When the current run of errors began, and the data callbacks counted then.
    let mut streak: Option<(Instant, u64)> = None;
    move |err: cpal::StreamError| {
        stats.0.stream_errors.fetch_add(1, Ordering::Relaxed);
        if health.lost.load(Ordering::Relaxed) {
            return; // Reported once already.
        }
        let now = Instant::now();
        let callbacks = stats.callbacks(direction);
        let failing_for = match streak {
            Some((since, at)) if at == callbacks => now - since,
            _ => {
                streak = Some((now, callbacks));
                Duration::ZERO
            }
        };
        let device_gone = matches!(err, cpal::StreamError::DeviceNotAvailable);
        if device_gone || failing_for >= LOST_AFTER_ERRORS_FOR {
            let reason = if device_gone {
                err.to_string()
            } else {
                format!(
                    "{err} (errors for {} ms with no audio moving)",
                    failing_for.as_millis()
                )
            };
            let _ = health.reason.set(reason.clone());
            health.lost.store(true, Ordering::Release);
            if let Some(events) = &events {
                let _ = events.try_send(AudioEvent::DeviceLost {
                    name: name.clone(),
                    direction,
                    reason,
                });
            }
            let _ = stop_stream.try_send(());
        } else if last_report.is_none_or(|t| now - t >= Duration::from_secs(1)) {
            last_report = Some(now);
            if let Some(events) = &events {
                let _ = events.try_send(AudioEvent::StreamError {
                    name: name.clone(),
                    direction,
                    reason: err.to_string(),
                });
            }
        }
    }
}

/// A cpal stream kept alive on a thread of its own (cpal streams are not `Send`) until this
/// handle is dropped, or until the stream's error callback finds the device lost.
struct StreamThread {
    stop: Sender<()>,
    join: Option<JoinHandle<()>>,
}

impl StreamThread {
    /// Runs `build` on a new thread named `thread_name`; once it has returned a started
    /// stream, hands back its result and keeps the stream until a message on the stop
    /// channel (whose sender `build` gets, for the error callback) or the handle's drop.
    fn spawn<R, F>(thread_name: &str, device: &str, build: F) -> Result<(Self, R)>
    where
        R: Send + 'static,
        F: FnOnce(Sender<()>) -> Result<(cpal::Stream, R)> + Send + 'static,
    {
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<R>>(1);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let stop_for_build = stop_tx.clone();
        let join = thread::Builder::new()
            .name(thread_name.to_string())
            .spawn(move || match build(stop_for_build) {
                Ok((stream, ready)) => {
                    if ready_tx.send(Ok(ready)).is_ok() {
                        let _ = stop_rx.recv();
                    }
                    drop(stream);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| {
                Error::audio_device(device, format!("cannot start thread {thread_name}: {e}"))
            })?;
        match ready_rx.recv_timeout(OPEN_TIMEOUT) {
            Ok(Ok(ready)) => Ok((
                Self {
                    stop: stop_tx,
                    join: Some(join),
                },
                ready,
            )),
            Ok(Err(e)) => {
                let _ = join.join();
                Err(e)
            }
            // The thread is left to finish opening; it drops the stream when it sees that
            // nobody waits for it any more.
            Err(_) => Err(Error::audio_device(
                device,
                format!(
                    "opening the stream did not finish within {} s",
                    OPEN_TIMEOUT.as_secs()
                ),
            )),
        }
    }
}

impl Drop for StreamThread {
    fn drop(&mut self) {
        // Full only if the error callback has asked already; either way the thread wakes.
        let _ = self.stop.try_send(());
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }
}

fn unsupported_format(info: &StreamInfo) -> Error {
    Error::audio_device(
        &info.device_name,
        format!(
            "its default sample format {} is not supported",
            info.sample_format
        ),
    )
}

fn build_capture_stream<E>(
    device: &cpal::Device,
    config: &cpal::SupportedStreamConfig,
    info: &StreamInfo,
    processor: CaptureProcessor,
    on_error: E,
) -> Result<cpal::Stream>
where
    E: FnMut(cpal::StreamError) + Send + 'static,
{
    fn build<T, E>(
        device: &cpal::Device,
        config: &cpal::StreamConfig,
        mut processor: CaptureProcessor,
        on_error: E,
    ) -> std::result::Result<cpal::Stream, cpal::BuildStreamError>
    where
        T: SizedSample,
        f32: FromSample<T>,
        E: FnMut(cpal::StreamError) + Send + 'static,
    {
        device.build_input_stream(
            config,
            move |data: &[T], info: &cpal::InputCallbackInfo| {
                let t = info.timestamp();
                processor.note_device_latency(t.callback.duration_since(&t.capture));
                processor.process_callback(data)
            },
            on_error,
            None,
        )
    }
    let c = &config.config();
    let p = processor;
    let e = on_error;
    let built = match config.sample_format() {
        SampleFormat::F32 => build::<f32, E>(device, c, p, e),
        SampleFormat::I16 => build::<i16, E>(device, c, p, e),
        SampleFormat::U16 => build::<u16, E>(device, c, p, e),
        SampleFormat::I8 => build::<i8, E>(device, c, p, e),
        SampleFormat::U8 => build::<u8, E>(device, c, p, e),
        SampleFormat::I24 => build::<cpal::I24, E>(device, c, p, e),
        SampleFormat::I32 => build::<i32, E>(device, c, p, e),
        SampleFormat::U32 => build::<u32, E>(device, c, p, e),
        SampleFormat::I64 => build::<i64, E>(device, c, p, e),
        SampleFormat::U64 => build::<u64, E>(device, c, p, e),
        SampleFormat::F64 => build::<f64, E>(device, c, p, e),
        _ => return Err(unsupported_format(info)),
    };
    built.map_err(|e| Error::audio_device(&info.device_name, format!("cannot open {info}: {e}")))
}

fn build_playback_stream<E>(
    device: &cpal::Device,
    config: &cpal::SupportedStreamConfig,
    info: &StreamInfo,
    processor: PlaybackProcessor,
    on_error: E,
) -> Result<cpal::Stream>
where
    E: FnMut(cpal::StreamError) + Send + 'static,
{
    fn build<T, E>(
        device: &cpal::Device,
        config: &cpal::StreamConfig,
        mut processor: PlaybackProcessor,
        on_error: E,
    ) -> std::result::Result<cpal::Stream, cpal::BuildStreamError>
    where
        T: SizedSample + FromSample<f32>,
        E: FnMut(cpal::StreamError) + Send + 'static,
    {
        device.build_output_stream(
            config,
            move |data: &mut [T], info: &cpal::OutputCallbackInfo| {
                let t = info.timestamp();
                processor.note_device_latency(t.playback.duration_since(&t.callback));
                processor.process_callback(data)
            },
            on_error,
            None,
        )
    }
    let c = &config.config();
    let p = processor;
    let e = on_error;
    let built = match config.sample_format() {
        SampleFormat::F32 => build::<f32, E>(device, c, p, e),
        SampleFormat::I16 => build::<i16, E>(device, c, p, e),
        SampleFormat::U16 => build::<u16, E>(device, c, p, e),
        SampleFormat::I8 => build::<i8, E>(device, c, p, e),
        SampleFormat::U8 => build::<u8, E>(device, c, p, e),
        SampleFormat::I24 => build::<cpal::I24, E>(device, c, p, e),
        SampleFormat::I32 => build::<i32, E>(device, c, p, e),
        SampleFormat::U32 => build::<u32, E>(device, c, p, e),
        SampleFormat::I64 => build::<i64, E>(device, c, p, e),
        SampleFormat::U64 => build::<u64, E>(device, c, p, e),
        SampleFormat::F64 => build::<f64, E>(device, c, p, e),
        _ => return Err(unsupported_format(info)),
    };
    built.map_err(|e| Error::audio_device(&info.device_name, format!("cannot open {info}: {e}")))
}

/// How long to sleep while waiting for `samples` more samples to move at `rate_hz`: half
/// that time, within 1-5 ms, so a frame is picked up soon after it completes.
fn poll_wait(samples: usize, rate_hz: u32) -> Duration {
    let secs = samples as f64 / rate_hz.max(1) as f64 / 2.0;
    Duration::from_secs_f64(secs).clamp(Duration::from_millis(1), Duration::from_millis(5))
}

/// How long a blocked call may wait without progress.
#[derive(Debug, Clone, Copy)]
struct Patience {
    timeout: Duration,
    start_timeout: Duration,
}

impl Patience {
    fn new(options: &DeviceOptions) -> Self {
        Self {
            timeout: options.timeout,
            start_timeout: options.start_timeout.max(options.timeout),
        }
    }

    /// The limit once the stream has moved audio (`moving`), or before.
    fn limit(&self, moving: bool) -> Duration {
        if moving {
            self.timeout
        } else {
            self.start_timeout
        }
    }
}

// ---------------------------------------------------------------------------------------
// The microphone

/// A live capture stream as a [`FrameSource`]: 80 ms frames of 24 kHz mono from an input
/// device running at its own default configuration.
///
/// `next_frame` runs on the caller's thread: it pops the capture ring, resamples, and sleeps
/// in short steps until a whole frame is there. Audio captured before the first
/// `next_frame` is discarded, so the first frame is fresh rather than up to
/// [`DeviceOptions::ring_ms`] old. Dropping the source stops the stream.
pub struct MicSource {
    info: StreamInfo,
    consumer: HeapCons<f32>,
    resampler: InputResampler,
    scratch: Vec<f32>,
    health: Arc<StreamHealth>,
    stats: AudioStats,
    patience: Patience,
    /// Whether `next_frame` has run (and dropped the audio captured before it).
    started: bool,
    /// Whether any audio has come out of the ring yet.
    moving: bool,
    _stream: StreamThread,
}

impl MicSource {
    /// Opens the input device called `device_name` (`None`: the default one) and starts
    /// capturing. An unknown name is an error listing the input devices there are.
    pub fn open(device_name: Option<&str>, options: DeviceOptions) -> Result<Self> {
        let label = device_name.unwrap_or("default").to_string();
        let health = Arc::new(StreamHealth::default());
        let wanted = device_name.map(str::to_owned);
        let (thread_health, stats, events, ring_ms) = (
            health.clone(),
            options.stats.clone(),
            options.events.clone(),
            options.ring_ms,
        );
        let (stream, (info, consumer)) =
            StreamThread::spawn("parley-audio-in", &label, move |stop_stream| {
                let host = cpal::default_host();
                let device = find_device(&host, wanted.as_deref(), Direction::Input)?;
                let name = device
                    .name()
                    .unwrap_or_else(|_| wanted.unwrap_or_else(|| "default".into()));
                let config = device.default_input_config().map_err(|e| {
                    Error::audio_device(&name, format!("no default input configuration: {e}"))
                })?;
                let info = StreamInfo::new(name, Direction::Input, &config);
                let capacity = ring_capacity(info.sample_rate_hz, ring_ms);
                let (processor, consumer) =
                    CaptureProcessor::with_ring(info.channels, capacity, stats.clone())?;
                let processor = processor.with_rate(info.sample_rate_hz);
                let on_error = error_callback(
                    info.device_name.clone(),
                    Direction::Input,
                    thread_health,
                    stats,
                    events,
                    stop_stream,
                );
                let stream = build_capture_stream(&device, &config, &info, processor, on_error)?;
                stream.play().map_err(|e| {
                    Error::audio_device(&info.device_name, format!("cannot start {info}: {e}"))
                })?;
                Ok((stream, (info, consumer)))
            })?;
        let resampler = InputResampler::new(info.sample_rate_hz)?;
        let scratch = vec![0.0; consumer.capacity().get()];
        Ok(Self {
            info,
            consumer,
            resampler,
            scratch,
            health,
            patience: Patience::new(&options),
            stats: options.stats,
            started: false,
            moving: false,
            _stream: stream,
        })
    }

    /// The device and the configuration it captures at.
    pub fn info(&self) -> &StreamInfo {
        &self.info
    }

    /// The stream's counters (shared with [`DeviceOptions::stats`]).
    pub fn stats(&self) -> AudioStats {
        self.stats.clone()
    }

    /// Captured device-rate samples waiting in the ring: how far the reader is behind.
    pub fn queued_samples(&self) -> usize {
        self.consumer.occupied_len()
    }
}

impl FrameSource for MicSource {
    /// The device's reported capture latency, plus what waits in the ring behind the
    /// frame just handed out.
    fn latency(&self) -> Option<Duration> {
        let device = self.stats.capture_device_latency()?;
        let rate = self.info.sample_rate_hz.max(1) as f64;
        Some(device + Duration::from_secs_f64(self.consumer.occupied_len() as f64 / rate))
    }

    fn next_frame(&mut self, frame: &mut [f32; FRAME_LEN_SAMPLES]) -> Result<bool> {
        self.wait_for(FRAME_LEN_SAMPLES)?;
        Ok(self.resampler.pop_frame(frame))
    }

    fn next_part(&mut self, part: &mut [f32]) -> Result<bool> {
        if part.is_empty()
            || part.len() >= FRAME_LEN_SAMPLES
            || self.resampler.ready_samples() >= FRAME_LEN_SAMPLES
        {
            return Ok(false);
        }
        self.wait_for(part.len())?;
        Ok(self.resampler.peek(part))
    }
}

impl MicSource {
    /// Blocks until `samples` (at most a frame) of 24 kHz audio are ready.
    fn wait_for(&mut self, samples: usize) -> Result<()> {
        if !self.started {
            self.started = true;
            self.moving |= self.consumer.clear() > 0;
        }
        let mut last_progress = Instant::now();
        loop {
            if self.resampler.ready_samples() >= samples {
                return Ok(());
            }
            let n = self.consumer.pop_slice(&mut self.scratch);
            if n > 0 {
                self.resampler.push(&self.scratch[..n])?;
                last_progress = Instant::now();
                self.moving = true;
                continue;
            }
            if let Some(err) = self.health.lost_error(&self.info.device_name) {
                return Err(err);
            }
            let limit = self.patience.limit(self.moving);
            if last_progress.elapsed() >= limit {
                return Err(Error::audio_device(
                    &self.info.device_name,
                    format!(
                        "no audio captured for {} ms; the input stream has stopped",
                        limit.as_millis()
                    ),
                ));
            }
            let missing_24k = samples - self.resampler.ready_samples();
            thread::sleep(poll_wait(missing_24k, SAMPLE_RATE_HZ));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The speakers

/// A live playback stream as a [`FrameSink`]: 80 ms frames of 24 kHz mono, resampled and
/// played on an output device at its own default configuration (the same sample on every
/// channel).
///
/// `write_frame` runs on the caller's thread and blocks while the ring is full, which paces
/// a writer faster than real time. Dropping the sink stops the stream at once; call
/// [`finish`](FrameSink::finish) first to let queued audio play out.
pub struct SpeakerSink {
    info: StreamInfo,
    feed: PlaybackFeed,
    resampler: OutputResampler,
    health: Arc<StreamHealth>,
    stats: AudioStats,
    patience: Patience,
    _stream: StreamThread,
}

impl SpeakerSink {
    /// Opens the output device called `device_name` (`None`: the default one) and starts
    /// playing (silence until the first frame). An unknown name is an error listing the
    /// output devices there are.
    pub fn open(device_name: Option<&str>, options: DeviceOptions) -> Result<Self> {
        let label = device_name.unwrap_or("default").to_string();
        let health = Arc::new(StreamHealth::default());
        let wanted = device_name.map(str::to_owned);
        let (thread_health, stats, events, ring_ms, margin) = (
            health.clone(),
            options.stats.clone(),
            options.events.clone(),
            options.ring_ms,
            options.output_margin,
        );
        let (stream, (info, feed)) =
            StreamThread::spawn("parley-audio-out", &label, move |stop_stream| {
                let host = cpal::default_host();
                let device = find_device(&host, wanted.as_deref(), Direction::Output)?;
                let name = device
                    .name()
                    .unwrap_or_else(|_| wanted.unwrap_or_else(|| "default".into()));
                let config = device.default_output_config().map_err(|e| {
                    Error::audio_device(&name, format!("no default output configuration: {e}"))
                })?;
                let info = StreamInfo::new(name, Direction::Output, &config);
                let capacity = ring_capacity(info.sample_rate_hz, ring_ms);
                let capacity = capacity
                    + ring_capacity(info.sample_rate_hz, 0)
                        .min((margin.as_secs_f64() * info.sample_rate_hz as f64).ceil() as usize);
                let (processor, feed) =
                    PlaybackProcessor::with_ring(info.channels, capacity, stats.clone())?;
                let processor = processor.with_margin(margin, info.sample_rate_hz);
                let on_error = error_callback(
                    info.device_name.clone(),
                    Direction::Output,
                    thread_health,
                    stats,
                    events,
                    stop_stream,
                );
                let stream = build_playback_stream(&device, &config, &info, processor, on_error)?;
                stream.play().map_err(|e| {
                    Error::audio_device(&info.device_name, format!("cannot start {info}: {e}"))
                })?;
                Ok((stream, (info, feed)))
            })?;
        let resampler = OutputResampler::new(info.sample_rate_hz)?;
        Ok(Self {
            info,
            feed,
            resampler,
            health,
            patience: Patience::new(&options),
            stats: options.stats,
            _stream: stream,
        })
    }

    /// The device and the configuration it plays at.
    pub fn info(&self) -> &StreamInfo {
        &self.info
    }

    /// The stream's counters (shared with [`DeviceOptions::stats`]).
    pub fn stats(&self) -> AudioStats {
        self.stats.clone()
    }

    /// Device-rate samples queued and not yet taken by the device: the output latency the
    /// ring adds.
    pub fn queued_samples(&self) -> usize {
        self.feed.queued_samples()
    }
}

/// Pushes all of `pcm` into the playback ring, waiting for room; fails when the stream is
/// lost or takes nothing for the patience's limit.
fn push_blocking(
    feed: &mut PlaybackFeed,
    mut pcm: &[f32],
    health: &StreamHealth,
    info: &StreamInfo,
    patience: Patience,
) -> Result<()> {
    let mut last_progress = Instant::now();
    loop {
        let n = feed.push(pcm);
        pcm = &pcm[n..];
        if pcm.is_empty() {
            return Ok(());
        }
        if n > 0 {
            last_progress = Instant::now();
        }
        if let Some(err) = health.lost_error(&info.device_name) {
            return Err(err);
        }
        let limit = patience.limit(feed.has_moved());
        if last_progress.elapsed() >= limit {
            return Err(Error::audio_device(
                &info.device_name,
                format!(
                    "the output stream took no audio for {} ms; it has stopped",
                    limit.as_millis()
                ),
            ));
        }
        thread::sleep(poll_wait(pcm.len(), info.sample_rate_hz));
    }
}

impl FrameSink for SpeakerSink {
    fn discard_queued(&mut self) {
        self.feed.discard_queued();
    }

    /// What the ring holds ahead of a new frame (nothing while a discard is pending: the
    /// callback is about to drop it), plus the device's reported output latency (`None`
    /// until a callback has reported it). The margin of silence a run of output starts
    /// with is not counted.
    fn latency(&self) -> Option<Duration> {
        let device = self.stats.playback_device_latency()?;
        let rate = self.info.sample_rate_hz.max(1) as f64;
        let queued = if self.feed.discard_pending() {
            0
        } else {
            self.feed.queued_samples()
        };
        Some(device + Duration::from_secs_f64(queued as f64 / rate))
    }

    fn write_frame(&mut self, frame: &[f32]) -> Result<()> {
        check_frame_len(frame, &format_args!("speaker `{}`", self.info.device_name))?;
        if let Some(err) = self.health.lost_error(&self.info.device_name) {
            return Err(err);
        }
        self.feed.set_active(true);
        let pcm = self.resampler.process(frame)?;
        push_blocking(&mut self.feed, pcm, &self.health, &self.info, self.patience)
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(err) = self.health.lost_error(&self.info.device_name) {
            return Err(err);
        }
        let tail = self.resampler.flush()?;
        push_blocking(
            &mut self.feed,
            tail,
            &self.health,
            &self.info,
            self.patience,
        )?;
        // Running dry from here on is the end of the output, not an underrun.
        self.feed.set_active(false);
        let mut last_progress = Instant::now();
        let mut queued = self.feed.queued_samples();
        while queued > 0 {
            if let Some(err) = self.health.lost_error(&self.info.device_name) {
                return Err(err);
            }
            let limit = self.patience.limit(self.feed.has_moved());
            if last_progress.elapsed() >= limit {
                return Err(Error::audio_device(
                    &self.info.device_name,
                    format!(
                        "{queued} samples still queued after {} ms without progress; \
                         the output stream has stopped",
                        limit.as_millis()
                    ),
                ));
            }
            thread::sleep(poll_wait(queued, self.info.sample_rate_hz));
            let now = self.feed.queued_samples();
            if now < queued {
                last_progress = Instant::now();
            }
            queued = now;
        }
        Ok(())
    }
}
