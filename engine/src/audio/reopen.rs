//! Live devices that come back: a microphone or speaker that disappears in the middle of a
//! session (a USB headset pulled, a Bluetooth one out of range, a PulseAudio sink unloaded,
//! the sound server restarted) is reopened by name when it is there again, and the session
//! goes on: the input gives silence at the frame clock meanwhile, the output drops what it
//! is given at the frame clock. Only a device that stays away longer than
//! [`ReopenOptions::give_up_after`] ends the session, with the error that lost it.
//!
//! These run on the pipeline's audio-in and audio-out threads (never in a callback): a
//! reopen attempt builds a new cpal stream (its own thread, as [`MicSource::open`] does) and
//! may take up to a second or two.

use std::thread;
use std::time::{Duration, Instant};

use super::device::{AudioEvent, DeviceOptions, Direction, MicSource, SpeakerSink};
use super::{FrameSink, FrameSource, FRAME_LEN_SAMPLES};
use crate::{Error, Result};

const FRAME: Duration = Duration::from_millis(80);

/// How a lost device is waited for.
#[derive(Debug, Clone)]
pub struct ReopenOptions {
    /// Time between attempts to open the device again.
    pub retry_every: Duration,
    /// How long a device may stay away before the session ends.
    pub give_up_after: Duration,
}

impl Default for ReopenOptions {
    fn default() -> Self {
        Self {
            retry_every: Duration::from_millis(500),
            give_up_after: Duration::from_secs(300),
        }
    }
}

/// A device lost, and being waited for.
struct Lost {
    error: Error,
    since: Instant,
    next_try: Instant,
    /// When the next placeholder frame is due (silence in, nothing out).
    next_frame: Instant,
}

/// What both directions share: the device's name, how to open it, and the state of a loss.
struct Reopener {
    name: Option<String>,
    options: DeviceOptions,
    reopen: ReopenOptions,
    direction: Direction,
    lost: Option<Lost>,
    /// After a reopen, until the new stream has moved a frame: when the loss began. A
    /// stream that fails again at once continues that loss (its time limit, its retry
    /// pace) instead of starting a new one.
    reopened_since: Option<Instant>,
}

impl Reopener {
    fn new(
        name: Option<&str>,
        options: DeviceOptions,
        reopen: ReopenOptions,
        direction: Direction,
    ) -> Self {
        Self {
            name: name.map(str::to_owned),
            options,
            reopen,
            direction,
            lost: None,
            reopened_since: None,
        }
    }

    fn label(&self) -> &str {
        self.name.as_deref().unwrap_or("default")
    }

    fn send(&self, event: AudioEvent) {
        if let Some(events) = &self.options.events {
            let _ = events.try_send(event);
        }
    }

    /// The stream failed with `error`: from now on the device is waited for. A loss that
    /// the stream's own error callback did not report (a stall) is reported here.
    fn lose(&mut self, error: Error) {
        if !matches!(error, Error::AudioDeviceLost { .. }) {
            self.send(AudioEvent::DeviceLost {
                name: self.label().to_string(),
                direction: self.direction,
                reason: error.to_string(),
            });
        }
        let now = Instant::now();
        let (since, next_try) = match self.reopened_since.take() {
            // Lost again before any audio moved: the same loss, tried again at its pace.
            Some(since) => (since, now + self.reopen.retry_every),
            None => (now, now),
        };
        self.lost = Some(Lost {
            error,
            since,
            next_try,
            next_frame: now,
        });
    }

    /// The stream moved a frame: any loss is over.
    fn moved(&mut self) {
        self.reopened_since = None;
    }

    /// While lost: an attempt to open the device when one is due (`open` gives the stream),
    /// else the error once the wait has been too long. `Ok(None)`: still lost.
    fn try_reopen<T>(
        &mut self,
        open: impl FnOnce(Option<&str>, DeviceOptions) -> Result<T>,
    ) -> Result<Option<T>> {
        let Some(lost) = &mut self.lost else {
            return Ok(None);
        };
        let now = Instant::now();
        if now.duration_since(lost.since) > self.reopen.give_up_after {
            let lost = self.lost.take().expect("lost");
            return Err(Error::AudioDeviceLost {
                device: self.label().to_string(),
                reason: format!(
                    "{} (not back after {} s of trying to reopen it)",
                    lost.error,
                    self.reopen.give_up_after.as_secs()
                ),
            });
        }
        if now < lost.next_try {
            return Ok(None);
        }
        lost.next_try = now + self.reopen.retry_every;
        match open(self.name.as_deref(), self.options.clone()) {
            Ok(stream) => {
                self.reopened_since = self.lost.take().map(|l| l.since);
                self.send(AudioEvent::Reopened {
                    name: self.label().to_string(),
                    direction: self.direction,
                });
                Ok(Some(stream))
            }
            Err(_) => Ok(None),
        }
    }

    /// Waits for the next placeholder frame's time (the frame clock while lost).
    fn pace(&mut self) {
        if let Some(lost) = &mut self.lost {
            let now = Instant::now();
            if lost.next_frame > now {
                thread::sleep(lost.next_frame - now);
            }
            lost.next_frame = lost.next_frame.max(now) + FRAME;
        }
    }
}

/// A [`MicSource`] that is reopened when its device comes back; silence at the frame clock
/// while it is away.
pub struct ReopeningMic {
    mic: Option<MicSource>,
    r: Reopener,
}

impl ReopeningMic {
    /// Opens the input device `name` (`None`: the default one); an error when it cannot be
    /// opened now (a device must be there to start).
    pub fn open(name: Option<&str>, options: DeviceOptions, reopen: ReopenOptions) -> Result<Self> {
        Ok(Self {
            mic: Some(MicSource::open(name, options.clone())?),
            r: Reopener::new(name, options, reopen, Direction::Input),
        })
    }

    /// Whether the device is away now.
    pub fn is_lost(&self) -> bool {
        self.mic.is_none()
    }
}

impl FrameSource for ReopeningMic {
    fn latency(&self) -> Option<std::time::Duration> {
        self.mic.as_ref().and_then(|m| m.latency())
    }

    /// The microphone's part, while it is there (a lost one is reopened by `next_frame`).
    fn next_part(&mut self, part: &mut [f32]) -> Result<bool> {
        let Some(mic) = &mut self.mic else {
            return Ok(false);
        };
        match mic.next_part(part) {
            Ok(more) => Ok(more),
            Err(e @ (Error::AudioDeviceLost { .. } | Error::AudioDevice { .. })) => {
                self.mic = None;
                self.r.lose(e);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn next_frame(&mut self, frame: &mut [f32; FRAME_LEN_SAMPLES]) -> Result<bool> {
        loop {
            if let Some(mic) = &mut self.mic {
                match mic.next_frame(frame) {
                    Ok(more) => {
                        self.r.moved();
                        return Ok(more);
                    }
                    Err(e @ (Error::AudioDeviceLost { .. } | Error::AudioDevice { .. })) => {
                        self.mic = None;
                        self.r.lose(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            // At most one attempt per retry interval: a stream that fails at once waits.
            match self.r.try_reopen(MicSource::open)? {
                Some(mic) => self.mic = Some(mic),
                None => break,
            }
        }
        self.r.pace();
        frame.fill(0.0);
        Ok(true)
    }
}

/// A [`SpeakerSink`] that is reopened when its device comes back; frames written while it
/// is away are dropped at the frame clock.
pub struct ReopeningSpeaker {
    speaker: Option<SpeakerSink>,
    r: Reopener,
}

impl ReopeningSpeaker {
    /// Opens the output device `name` (`None`: the default one).
    pub fn open(name: Option<&str>, options: DeviceOptions, reopen: ReopenOptions) -> Result<Self> {
        Ok(Self {
            speaker: Some(SpeakerSink::open(name, options.clone())?),
            r: Reopener::new(name, options, reopen, Direction::Output),
        })
    }

    /// Whether the device is away now.
    pub fn is_lost(&self) -> bool {
        self.speaker.is_none()
    }

    /// The output device's name as the host gives it (while it is away: the name asked
    /// for, or `default`).
    pub fn device_name(&self) -> String {
        match &self.speaker {
            Some(s) => s.info().device_name.clone(),
            None => self.r.name.as_deref().unwrap_or("default").to_string(),
        }
    }
}

impl FrameSink for ReopeningSpeaker {
    fn latency(&self) -> Option<std::time::Duration> {
        self.speaker.as_ref().and_then(|s| s.latency())
    }

    fn write_frame(&mut self, frame: &[f32]) -> Result<()> {
        loop {
            if let Some(s) = &mut self.speaker {
                match s.write_frame(frame) {
                    Ok(()) => {
                        self.r.moved();
                        return Ok(());
                    }
                    Err(e @ (Error::AudioDeviceLost { .. } | Error::AudioDevice { .. })) => {
                        self.speaker = None;
                        self.r.lose(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            match self.r.try_reopen(SpeakerSink::open)? {
                Some(s) => self.speaker = Some(s),
                None => break,
            }
        }
        self.r.pace();
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        match &mut self.speaker {
            Some(s) => s.finish(),
            // Nothing is playing: there is nothing to wait for.
            None => Ok(()),
        }
    }

    fn discard_queued(&mut self) {
        if let Some(s) = &mut self.speaker {
            s.discard_queued();
        }
    }
}
