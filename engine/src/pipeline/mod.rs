//! The live system: audio in, the models, audio out, on one 80 ms frame clock.
//!
//! A [`Session`] runs three named threads joined by bounded channels:
//! - `audio-in` pulls 80 ms frames from a [`FrameSource`] (a microphone, a file played
//!   at real-time pace or as fast as the models go, or frames from stdin);
//! - `model` owns the models and their streaming state: Mimi's `encode_step`, the LM
//!   step (CPU or GPU), and in duplex mode Mimi's `decode_step`, one frame at a time;
//! - `audio-out` hands each output frame to a [`FrameSink`] (speakers, a recording, or
//!   stdout) and blocks on the sink's back-pressure, never the model thread.
//!
//! Everything a session says goes out as [`Event`]s on one channel that the window, the
//! headless writer and the latency harness all read the same way. When the input ends the
//! model thread flushes the delays (silence through the models until every output due
//! has come out), so nothing already received is dropped.

mod io;
pub mod report;
mod session;

pub use io::{EventSink, NullSink, PcmSource};

pub use session::{Mode, Models, Session, SessionOptions, Stopper};

use serde::Serialize;

/// What a session reports, in order.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The session runs: its mode and the device line (which adapter, or the CPU).
    Started { mode: Mode, device: String },
    /// A piece of text as the model emits it: the user's words in listen mode (partial
    /// until [`Event::Word`] confirms them), the model's own words in duplex mode.
    /// `frame`: the input frame at whose step it was emitted.
    TextDelta { text: String, frame: u64 },
    /// A final transcribed word with its span in the input audio (listen mode).
    Word {
        text: String,
        start_s: f64,
        end_s: f64,
        frame: u64,
    },
    /// The user's turn has ended (listen mode: the end-of-turn head crossed 0.5), at
    /// `time_s` of input audio.
    EndOfTurn {
        time_s: f64,
        probability: f32,
        frame: u64,
    },
    /// The model started speaking after silence (duplex mode): the first audible output
    /// frame of a reply. `after_user_ms`: from the end of the user's last loud input frame
    /// to this frame being done, when the user spoke within the last 5 s.
    ResponseStarted {
        frame: u64,
        after_user_ms: Option<f64>,
    },
    /// Peak levels of this frame's input and output, 40 values each (2 ms apiece), for
    /// meters and scrolling waveforms. Only sent when the session was asked to.
    Levels {
        frame: u64,
        input: Vec<f32>,
        output: Vec<f32>,
    },
    /// One output frame of audio (80 ms, 24 kHz), for sinks that are events (headless
    /// stdin mode). Only sent when the session was asked to.
    Audio { frame: u64, pcm: Vec<f32> },
    /// Per-frame compute and its deadline.
    Metrics(FrameMetrics),
    /// Something went wrong; the session says whether it goes on.
    Error { message: String, fatal: bool },
    /// The session has flushed and stopped: frames in and out.
    Ended { frames_in: u64, frames_out: u64 },
}

/// What one frame cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FrameMetrics {
    /// Input frame index (flush frames continue the count).
    pub frame: u64,
    pub encode_ms: f64,
    pub lm_ms: f64,
    /// 0 in listen mode.
    pub decode_ms: f64,
    /// From the moment the frame was available to the moment its output was queued.
    pub latency_ms: f64,
    /// Compute (encode + LM + decode) over the 80 ms a frame lasts.
    pub deadline_missed: bool,
    /// Seconds since the session started when the frame was done.
    pub done_at_s: f64,
    /// Live devices: capture callbacks that dropped samples (the reader fell behind) and
    /// playback callbacks that ran dry (silence played), since the session started.
    pub input_overruns: u64,
    pub output_underruns: u64,
}
