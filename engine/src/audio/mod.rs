//! Audio: files in and out, resampling to the model rate, live devices and the virtual
//! device that stands in for them.
//!
//! Every stage after the devices works in frames of 80 ms at 24 kHz mono
//! ([`FRAME_LEN_SAMPLES`] samples at [`SAMPLE_RATE_HZ`]). A pipeline reads its input through
//! [`FrameSource`] and writes its output through [`FrameSink`], so the microphone and the
//! speakers ([`device::MicSource`], [`device::SpeakerSink`]) and a recording played at
//! real-time pace or as fast as the models go ([`virtual_device::FileSource`],
//! [`virtual_device::RecordingSink`]) are interchangeable.

pub mod device;
pub mod echo;
pub mod file;
pub mod reopen;
pub mod resample;
pub mod virtual_device;

pub use device::{AudioEvent, AudioStats, AudioStatsSnapshot};

use crate::Result;

/// The one sample rate every model stage works at.
pub const SAMPLE_RATE_HZ: u32 = 24_000;
/// One model frame: 80 ms at 24 kHz.
pub const FRAME_LEN_SAMPLES: usize = 1920;
/// The length of one frame in time.
pub const FRAME_DURATION: std::time::Duration = std::time::Duration::from_millis(80);

/// Where 80 ms frames of 24 kHz mono audio come from (a microphone or a file).
pub trait FrameSource: Send {
    /// Blocks until the next frame and writes it into `frame`. Returns `Ok(true)` for a
    /// frame, `Ok(false)` once the input has ended (and on every later call). A live device
    /// never blocks forever: a stream that stops delivering audio is an error within the
    /// device's timeout.
    fn next_frame(&mut self, frame: &mut [f32; FRAME_LEN_SAMPLES]) -> Result<bool>;

    /// Blocks until the first `part.len()` samples (fewer than a frame) of the next frame
    /// have been heard and copies them into `part`, so that work on them can start before
    /// the frame is complete; they stay at the start of the frame the next
    /// [`Self::next_frame`] returns, which follows whenever this returned `Ok(true)`.
    /// `Ok(false)`: no part now (a source that hands out whole frames only, the default;
    /// one that has the whole frame already; or the end of the input): call
    /// `next_frame`.
    fn next_part(&mut self, _part: &mut [f32]) -> Result<bool> {
        Ok(false)
    }

    /// How long before a frame is handed out its last sample was heard, as far as the
    /// device reports it (a live device's capture latency); `None` where unknown. Echo
    /// cancellation aligns its reference with it.
    fn latency(&self) -> Option<std::time::Duration> {
        None
    }
}

/// Where the pipeline's 80 ms output frames of 24 kHz mono audio go (speakers or a
/// recording).
pub trait FrameSink: Send {
    /// Queues one frame of exactly [`FRAME_LEN_SAMPLES`] samples. A live device blocks while
    /// its queue is full (that is the pipeline's back-pressure), never longer than its
    /// timeout.
    fn write_frame(&mut self, frame: &[f32]) -> Result<()>;

    /// Ends the output: everything written is handed to the device (or the recording)
    /// before this returns. Frames written afterwards start a new stretch of output.
    fn finish(&mut self) -> Result<()>;

    /// Drops the audio written but not yet played (a cancelled reply): a live device
    /// empties its queue at its next callback. Recordings keep what they have.
    fn discard_queued(&mut self) {}

    /// How long until a frame written now starts to be heard, as far as the device
    /// reports it (a live device's queue and output latency); `None` where unknown.
    fn latency(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The error for a frame of the wrong length, shared by every [`FrameSink`].
pub(crate) fn check_frame_len(frame: &[f32], sink: &dyn std::fmt::Display) -> Result<()> {
    if frame.len() == FRAME_LEN_SAMPLES {
        Ok(())
    } else {
        Err(crate::Error::InvalidInput(format!(
            "{sink}: an output frame must hold {FRAME_LEN_SAMPLES} samples (80 ms at 24 kHz), \
             got {}",
            frame.len()
        )))
    }
}
