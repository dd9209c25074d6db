//! The live system: audio in, the models, audio out, on one 80 ms frame clock.
//!
//! A [`Session`] runs three named threads joined by bounded channels:
//! - `audio-in` pulls 80 ms frames from a [`FrameSource`](crate::audio::FrameSource) (a
//!   microphone, a file played at real-time pace or as fast as the models go, or frames
//!   from stdin);
//! - `model` drives the frame clock: each frame goes down the mode's [`Stage`]s (for
//!   example Mimi's encoder, the STT, turn-taking), which [`Models::compose`] builds;
//! - `audio-out` runs the output clock: for every frame of the input clock it takes one
//!   frame of queued audio ([`Playout`]) or plays silence, and after the input has ended
//!   it plays what is still queued, so a reply may be longer or shorter than the input
//!   that caused it. A cancelled reply's queued audio is dropped at once.
//!
//! Stages whose work comes in bursts run on their own threads ([`Worker`]): Smart Turn's
//! verdicts today, the LLM of the cascade to come.
//!
//! Everything a session says goes out as [`Event`]s on one channel that the window, the
//! headless writer and the latency harness all read the same way. When the input ends the
//! model thread flushes the delays (silence through the models until every output due
//! has come out), so nothing already received is dropped.

mod cascade;
mod io;
mod models;
pub mod report;
mod session;
pub mod speak;
mod stage;
mod stages;
pub mod turn;

pub use cascade::{CascadeInbox, CascadeModels};
pub use io::{EventSink, NullSink, PcmSource};
pub use models::{DuplexModel, ListenModel, Mode, Models};
pub use session::{Canceller, Session, SessionOptions, Stopper};
pub use stage::{Composition, Frame, Outbox, Playout, Stage, Worker, PLAYOUT_MAX_FRAMES};
pub use turn::{TurnModels, TurnSettings, TurnStage};

use serde::Serialize;

/// When a cascade reply's milestones came, in ms after the end of the user's turn was
/// detected (None: not reached).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ResponseTiming {
    /// The LLM's first piece of text arrived.
    pub llm_first_token_ms: Option<f64>,
    /// The LLM's first complete word went to the TTS.
    pub first_word_ms: Option<f64>,
    /// The TTS's first frame of speech arrived.
    pub tts_first_audio_ms: Option<f64>,
    /// The output clock took the reply's first frame for the speaker (seen at the next
    /// frame; None when the reply was queued after the input ended).
    pub first_audio_played_ms: Option<f64>,
}

/// Who is speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Speaker {
    /// The person at the microphone.
    User,
    /// The model (duplex) or the cascade's voice.
    Assistant,
}

/// What decided something about the user's turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnSource {
    /// Silero VAD: speech stopped for the configured silence.
    Vad,
    /// The loudness of 80 ms frames (where ONNX Runtime is missing, and as a baseline).
    Energy,
    /// Smart Turn v3.2 on the last 8 s at a pause.
    SmartTurn,
    /// The STT's semantic end-of-turn head.
    SttHead,
    /// A pause long enough that the turn is over whatever the models said.
    Silence,
}

/// What a session reports, in order.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The session runs: its mode and the device line (which adapter, or the CPU).
    Started { mode: Mode, device: String },
    /// Something works less well than it could (a model missing, a fallback taken); said
    /// once per session.
    Warning { message: String },
    /// A piece of text as a model emits it: the user's words as transcribed (partial until
    /// [`Event::Word`] confirms them), or the assistant's own words.
    /// `frame`: the input frame at whose step it was emitted.
    TextDelta {
        speaker: Speaker,
        text: String,
        frame: u64,
    },
    /// A final transcribed word with its span in the input audio.
    Word {
        speaker: Speaker,
        text: String,
        start_s: f64,
        end_s: f64,
        frame: u64,
    },
    /// The user started speaking at `time_s` of input audio (decided at `frame`).
    SpeechStarted {
        time_s: f64,
        frame: u64,
        source: TurnSource,
    },
    /// The user stopped speaking at `time_s` (decided at `frame`, after the configured
    /// silence). Not yet the end of the turn: see [`Event::TurnEnd`].
    SpeechStopped {
        time_s: f64,
        frame: u64,
        source: TurnSource,
    },
    /// One detector's own verdict at a pause (every one, for analysis): the turn is over
    /// when `probability` reaches that detector's threshold.
    TurnSignal {
        source: TurnSource,
        probability: f32,
        time_s: f64,
        frame: u64,
    },
    /// The turn-taking policy's decision: the user's turn has ended at `time_s` of input
    /// audio, decided at `frame` by `source` with `probability`. One per user turn.
    TurnEnd {
        source: TurnSource,
        probability: f32,
        time_s: f64,
        frame: u64,
    },
    /// The assistant started speaking after silence: the first audible output frame of a
    /// reply. `after_user_ms`: from the end of the user's last loud input frame to this
    /// frame being done, when the user spoke within the last 5 s.
    ResponseStarted {
        frame: u64,
        after_user_ms: Option<f64>,
    },
    /// The user's turn the cascade answers, as the LLM gets it: the STT's words up to the
    /// end of the turn (its last ones brought out at once by the flush), or a typed item.
    UserTurn {
        text: String,
        typed: bool,
        frame: u64,
    },
    /// A piece of the text the cascade's LLM is writing (not yet spoken).
    ResponseText { text: String, frame: u64 },
    /// The cascade's reply ended: completed, cancelled by a barge-in, or failed (the LLM's
    /// error; what it wrote before is still spoken); `spoken`: the words whose audio
    /// played (what the history keeps).
    ResponseDone {
        cancelled: bool,
        failed: Option<String>,
        spoken: String,
        frame: u64,
        timing: ResponseTiming,
    },
    /// The reply was cancelled (barge-in, or the client asked): `dropped_frames` of audio
    /// that were queued for the speaker will not play.
    ReplyCancelled { dropped_frames: usize },
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

/// The time one stage took on the model thread for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StageTime {
    pub stage: &'static str,
    pub ms: f64,
}

/// What one frame cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrameMetrics {
    /// Input frame index (flush frames continue the count).
    pub frame: u64,
    /// Each stage's compute, in the order the stages ran.
    pub stages: Vec<StageTime>,
    /// Work done on the frame before it was complete, as soon as its first half was heard
    /// ([`stage::Stage::on_early`]: Mimi's encoder on the CPU), by stage: part of the
    /// frame's share of the CPU, not of its latency.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub early: Vec<StageTime>,
    /// From the moment the frame was available to the moment its output was queued.
    pub latency_ms: f64,
    /// Compute (all stages, the early work included) over the 80 ms a frame lasts.
    pub deadline_missed: bool,
    /// Seconds since the session started when the frame was done.
    pub done_at_s: f64,
    /// Live devices: capture callbacks that dropped samples (the reader fell behind) and
    /// playback callbacks that ran dry (silence played), since the session started.
    pub input_overruns: u64,
    pub output_underruns: u64,
    /// Live speaker: the least audio (ms) its ring held beyond what a callback took, since
    /// the session started (how close output came to running dry; absent without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_low_water_ms: Option<f64>,
    /// Echo cancellation's CPU for the latest captured frame (its reference and its
    /// capture, on the audio-in thread, not one of the stages); absent when it is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aec_ms: Option<f64>,
}

impl FrameMetrics {
    /// All stages' compute once the frame was complete (what its latency is made of).
    pub fn compute_ms(&self) -> f64 {
        self.stages.iter().map(|s| s.ms).sum()
    }

    /// The work done on the frame before it was complete.
    pub fn early_ms(&self) -> f64 {
        self.early.iter().map(|s| s.ms).sum()
    }
}
