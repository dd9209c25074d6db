//! Turn-taking: when the user speaks, pauses, and has finished.
//!
//! Three signals, combined by one policy ([`TurnStage`], settings in [`TurnSettings`]):
//! - **Silero VAD** (through ONNX Runtime) on every frame, resampled to 16 kHz: speech
//!   starts and stops with hysteresis ([`VadSettings`]), and a short silence while
//!   speaking is a *pause*. Where ONNX Runtime or the model is missing, an **energy**
//!   detector (80 ms RMS with hysteresis) stands in, and a warning says so once.
//! - **Smart Turn v3.2** at every pause, on the open turn's audio (from 0.5 s before its
//!   speech began, at most the last 8 s), on its own thread
//!   (`smart-turn`, a [`Worker`]): the probability that the turn is complete.
//! - The STT's **end-of-turn head** (listen mode with a checkpoint that has it).
//!
//! The policy: the user's turn ends (one [`Event::TurnEnd`] per turn, naming its source)
//! at the first of
//! 1. Smart Turn's verdict on the current pause reaching `smart_turn_threshold`;
//! 2. the end-of-turn head reaching `head_threshold` while the user is pausing or silent;
//! 3. the silence since the pause began reaching `max_pause_ms` (the user has stopped,
//!    whatever the models think);
//! 4. without Smart Turn: the VAD (or energy) calling speech stopped.
//!
//! Speech starting again before any of these cancels the pause (and after a turn end, it
//! reopens the turn: that end was premature, and a reply to it should be cancelled by the
//! mode that made one). Every detector's own
//! verdicts also go out as [`Event::TurnSignal`]s (the energy detector's too, as a
//! baseline), so the harness can score each alone.

use std::time::Duration;

use super::stage::{FlushRequest, Frame, Outbox, Stage, Worker};
use super::stages::rms;
use super::{Event, TurnSource};
use crate::audio::FRAME_LEN_SAMPLES;
use crate::models::smart_turn::SmartTurn;
use crate::models::vad::{VadEvent, VadSettings, VoiceActivity};
use crate::Result;

const FRAME_MS: f64 = 80.0;

/// Smart Turn hears the open turn from this long before its speech began (at most its
/// last 8 s), as pipecat's analyzer feeds it (`pre_speech_ms`, 500 ms), not what came
/// before the turn.
pub const SMART_TURN_PRE_SPEECH_S: f64 = 0.5;

/// The turn-taking policy's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TurnSettings {
    /// Silero VAD's thresholds and timings (its `pause_ms` triggers Smart Turn).
    pub vad: VadSettings,
    /// Smart Turn's probability at which the turn is complete (the model's own 0.5).
    pub smart_turn_threshold: f32,
    /// The end-of-turn head's probability at which the turn is complete (the reference's
    /// 0.5).
    pub head_threshold: f32,
    /// Silence after which the turn is over whatever the models said.
    pub max_pause_ms: f64,
    /// The energy detector: speech starts at this 80 ms RMS (-34 dBFS)...
    pub energy_start_rms: f32,
    /// ...and stops after `vad.min_silence_ms` below this one (-40 dBFS).
    pub energy_stop_rms: f32,
    /// Take Smart Turn's verdict in the frame that asked for it, waiting for its thread
    /// (as if it ran within the frame, as it does live: tens of ms). For input faster
    /// than real time (the harness's fast pace), where otherwise the frame a verdict
    /// lands on depends on how the threads were scheduled.
    pub verdict_in_frame: bool,
}

impl Default for TurnSettings {
    fn default() -> Self {
        Self {
            vad: VadSettings::default(),
            smart_turn_threshold: 0.5,
            head_threshold: 0.5,
            max_pause_ms: 2000.0,
            energy_start_rms: 0.02,
            energy_stop_rms: 0.01,
            verdict_in_frame: false,
        }
    }
}

/// The turn-taking models of a session (see the module's doc).
pub struct TurnModels {
    pub vad: Option<VoiceActivity>,
    pub smart_turn: Option<SmartTurn>,
    pub settings: TurnSettings,
    /// What is missing and what stands in, said once by the next session.
    notes: Vec<String>,
}

impl std::fmt::Debug for TurnModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnModels")
            .field("vad", &self.vad.is_some())
            .field("smart_turn", &self.smart_turn.is_some())
            .field("settings", &self.settings)
            .finish()
    }
}

impl TurnModels {
    /// Silero VAD and Smart Turn where ONNX Runtime and the models are found; what is
    /// missing is noted for the next session's warning, never an error.
    pub fn load() -> Self {
        Self::with_settings(TurnSettings::default())
    }

    pub fn with_settings(settings: TurnSettings) -> Self {
        let mut notes = vec![];
        let vad = VoiceActivity::new(settings.vad)
            .map_err(|e| {
                notes.push(format!(
                    "turn-taking: Silero VAD is not available ({e}); the energy detector stands in"
                ))
            })
            .ok();
        let smart_turn = if vad.is_some() {
            SmartTurn::new()
                .map_err(|e| {
                    notes.push(format!(
                        "turn-taking: Smart Turn is not available ({e}); turns end on the VAD's silence alone"
                    ))
                })
                .ok()
        } else {
            None
        };
        Self {
            vad,
            smart_turn,
            settings,
            notes,
        }
    }

    /// Only the energy detector (tests, or a user who wants no ONNX models).
    pub fn energy_only(settings: TurnSettings) -> Self {
        Self {
            vad: None,
            smart_turn: None,
            settings,
            notes: vec![],
        }
    }

    pub fn reset(&mut self) {
        if let Some(v) = &mut self.vad {
            v.reset();
        }
    }

    /// The notes not yet said.
    pub fn take_notes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notes)
    }
}

/// Speech by loudness: 80 ms frames, with hysteresis.
#[derive(Debug, Default)]
struct EnergyActivity {
    frames: u64,
    speaking: bool,
    /// Quiet frames in a row while speaking, and the first of them.
    quiet: Option<(u64, u64)>,
}

impl EnergyActivity {
    fn push(&mut self, pcm: &[f32], s: &TurnSettings) -> Option<VadEvent> {
        let index = self.frames;
        self.frames += 1;
        let level = rms(pcm);
        let at = |f: u64| f as f64 * FRAME_LEN_SAMPLES as f64 / 24_000.0;
        if !self.speaking {
            if level >= s.energy_start_rms {
                self.speaking = true;
                self.quiet = None;
                return Some(VadEvent::SpeechStarted {
                    time_s: at(index),
                    probability: 1.0,
                });
            }
            return None;
        }
        if level >= s.energy_stop_rms {
            self.quiet = None;
            return None;
        }
        let (first, n) = self.quiet.map_or((index, 1), |(f, n)| (f, n + 1));
        self.quiet = Some((first, n));
        if n as f64 * FRAME_MS + 1e-9 >= s.vad.min_silence_ms {
            self.speaking = false;
            self.quiet = None;
            return Some(VadEvent::SpeechStopped {
                time_s: at(first),
                probability: 0.0,
            });
        }
        None
    }
}

/// A pause being judged.
#[derive(Debug, Clone, Copy)]
struct Pause {
    id: u64,
    /// Where the silence began, in input audio.
    time_s: f64,
    /// The frame at which it was noticed.
    frame: u64,
}

/// A pause to judge: its id, where it began, and the turn's audio up to now (16 kHz).
type Job = (u64, f64, Vec<f32>);
/// Smart Turn's verdict on a pause: its id, where it began, the probability.
type Verdict = (u64, f64, Result<f32>);

/// The turn-taking policy (see the module's doc).
pub struct TurnStage<'a> {
    models: &'a mut TurnModels,
    smart: Option<Worker<Job, Verdict, SmartTurn>>,
    energy: EnergyActivity,
    /// The VAD (or the energy detector standing in) says the user is speaking.
    speaking: bool,
    /// The user has spoken since the last turn end.
    turn_open: bool,
    /// Where the open turn's speech began, in input audio (what Smart Turn hears starts
    /// [`SMART_TURN_PRE_SPEECH_S`] before it).
    turn_start_s: f64,
    pause: Option<Pause>,
    pauses: u64,
    /// Verdicts asked for and not yet received.
    waiting: usize,
    /// The head may fire (re-armed by text).
    head_armed: bool,
    /// What this frame decided, for the stages after this one.
    started_now: bool,
    ended_now: bool,
    /// Where an end of turn asks the STT to bring out its last words (the cascade).
    flush: Option<FlushRequest>,
    /// Samples of the frame in progress the VAD has heard early ([`Stage::on_early`]),
    /// and the decisions they led to, reported with the frame.
    early_samples: usize,
    early_events: Vec<VadEvent>,
}

impl<'a> TurnStage<'a> {
    pub fn new(models: &'a mut TurnModels) -> Result<Self> {
        let smart = match models.smart_turn.take() {
            Some(model) => Some(Worker::spawn(
                "smart-turn",
                2,
                model,
                |m: &mut SmartTurn, (id, time_s, audio): Job| (id, time_s, m.probability(&audio)),
            )?),
            None => None,
        };
        Ok(Self {
            models,
            smart,
            energy: EnergyActivity::default(),
            speaking: false,
            turn_open: false,
            turn_start_s: 0.0,
            pause: None,
            pauses: 0,
            waiting: 0,
            head_armed: true,
            started_now: false,
            ended_now: false,
            flush: None,
            early_samples: 0,
            early_events: vec![],
        })
    }

    /// At each end of turn, asks the STT stage through `flush` for the words it still
    /// holds (the cascade, which answers the turn's whole text).
    pub fn flushing_stt(mut self, flush: FlushRequest) -> Self {
        self.flush = Some(flush);
        self
    }

    /// Takes every verdict Smart Turn still owes, waiting for each (5 s at most).
    fn wait_verdicts(&mut self, frame: u64, out: &mut Outbox<'_>) {
        while self.waiting > 0 {
            let Some(v) = self
                .smart
                .as_ref()
                .and_then(|w| w.wait_result(Duration::from_secs(5)))
            else {
                break;
            };
            self.on_verdict(v, frame, out);
        }
    }

    fn settings(&self) -> TurnSettings {
        self.models.settings
    }

    fn end_turn(
        &mut self,
        source: TurnSource,
        probability: f32,
        time_s: f64,
        frame: u64,
        out: &Outbox<'_>,
    ) {
        if !self.turn_open {
            return;
        }
        self.turn_open = false;
        self.pause = None;
        self.ended_now = true;
        if let Some(f) = &self.flush {
            // The silence heard since `time_s`, up to the end of this frame.
            let heard_to_s = (frame + 1) as f64 * FRAME_MS / 1e3;
            f.request(heard_to_s - time_s);
        }
        out.send(Event::TurnEnd {
            source,
            probability,
            time_s,
            frame,
        });
    }

    /// A pause began at `time_s`: Smart Turn is asked about it.
    fn on_pause(&mut self, time_s: f64, frame: u64) {
        if self.pause.is_some() {
            return;
        }
        self.pauses += 1;
        let p = Pause {
            id: self.pauses,
            time_s,
            frame,
        };
        self.pause = Some(p);
        if let (Some(w), Some(vad)) = (&self.smart, &self.models.vad) {
            let audio = vad.heard_since_16k(self.turn_start_s - SMART_TURN_PRE_SPEECH_S);
            if w.try_submit((p.id, time_s, audio)) {
                self.waiting += 1;
            }
        }
    }

    fn on_verdict(&mut self, v: Verdict, frame: u64, out: &mut Outbox<'_>) {
        self.waiting = self.waiting.saturating_sub(1);
        let (id, time_s, p) = v;
        match p {
            Ok(p) => {
                out.send(Event::TurnSignal {
                    source: TurnSource::SmartTurn,
                    probability: p,
                    time_s,
                    frame,
                });
                let current = self.pause.is_some_and(|q| q.id == id);
                if current && p >= self.settings().smart_turn_threshold {
                    self.end_turn(TurnSource::SmartTurn, p, time_s, frame, out);
                }
            }
            Err(e) => {
                out.send(Event::Warning {
                    message: format!(
                        "turn-taking: Smart Turn failed ({e}); turns end on the VAD's silence alone"
                    ),
                });
                if let Some(w) = self.smart.take() {
                    self.models.smart_turn = w.close();
                }
            }
        }
    }

    fn on_activity(&mut self, e: VadEvent, source: TurnSource, frame: u64, out: &mut Outbox<'_>) {
        match e {
            VadEvent::SpeechStarted { time_s, .. } => {
                self.speaking = true;
                if !self.turn_open {
                    self.turn_start_s = time_s;
                }
                self.turn_open = true;
                self.pause = None;
                self.started_now = true;
                out.send(Event::SpeechStarted {
                    time_s,
                    frame,
                    source,
                });
            }
            VadEvent::Paused { time_s, .. } => self.on_pause(time_s, frame),
            // The pause was inside the turn: a verdict on it no longer counts, and a turn
            // ended there goes on (the end was premature).
            VadEvent::Resumed { time_s, .. } => {
                self.pause = None;
                if !self.turn_open {
                    self.turn_start_s = time_s;
                }
                self.turn_open = true;
            }
            VadEvent::SpeechStopped {
                time_s,
                probability,
            } => {
                self.speaking = false;
                out.send(Event::SpeechStopped {
                    time_s,
                    frame,
                    source,
                });
                out.send(Event::TurnSignal {
                    source,
                    probability: 1.0 - probability,
                    time_s,
                    frame,
                });
                if self.turn_open {
                    self.on_pause(time_s, frame);
                }
                if self.smart.is_none() {
                    self.end_turn(source, 1.0 - probability, time_s, frame, out);
                }
            }
        }
    }
}

impl Stage for TurnStage<'_> {
    fn name(&self) -> &'static str {
        "turn"
    }

    fn on_frame(&mut self, frame: &mut Frame, out: &mut Outbox<'_>) -> Result<()> {
        if !frame.reported {
            return Ok(());
        }
        let s = self.settings();
        let index = frame.index;
        // The energy detector always runs: the baseline, or the stand-in.
        let energy = self.energy.push(&frame.input, &s);
        let early = std::mem::take(&mut self.early_samples).min(frame.input.len());
        let vad_events = match &mut self.models.vad {
            Some(v) => {
                let mut events = std::mem::take(&mut self.early_events);
                events.extend(v.push_24k(&frame.input[early..])?);
                Some(events)
            }
            None => None,
        };
        match vad_events {
            Some(events) => {
                if let Some(VadEvent::SpeechStopped {
                    time_s,
                    probability,
                }) = energy
                {
                    out.send(Event::TurnSignal {
                        source: TurnSource::Energy,
                        probability: 1.0 - probability,
                        time_s,
                        frame: index,
                    });
                }
                for e in events {
                    self.on_activity(e, TurnSource::Vad, index, out);
                }
            }
            None => {
                if let Some(e) = energy {
                    self.on_activity(e, TurnSource::Energy, index, out);
                }
            }
        }
        if s.verdict_in_frame {
            self.wait_verdicts(index, out);
        }
        while let Some(v) = self.smart.as_ref().and_then(Worker::try_result) {
            self.on_verdict(v, index, out);
        }
        if frame.text.is_some() {
            self.head_armed = true;
        }
        if let Some(h) = frame.end_of_turn {
            if h.probability > s.head_threshold && self.head_armed {
                self.head_armed = false;
                out.send(Event::TurnSignal {
                    source: TurnSource::SttHead,
                    probability: h.probability,
                    time_s: h.time_s,
                    frame: index,
                });
                if self.pause.is_some() || !self.speaking {
                    self.end_turn(TurnSource::SttHead, h.probability, h.time_s, index, out);
                }
            }
        }
        if let Some(p) = self.pause {
            if (index - p.frame) as f64 * FRAME_MS >= s.max_pause_ms - (s.vad.pause_ms) {
                self.end_turn(TurnSource::Silence, 1.0, p.time_s, index, out);
            }
        }
        frame.speech_started = std::mem::take(&mut self.started_now);
        frame.turn_ended = std::mem::take(&mut self.ended_now);
        Ok(())
    }

    fn finish(&mut self, last: u64, out: &mut Outbox<'_>) -> Result<()> {
        // A verdict on the last pause still comes out before the session ends.
        self.wait_verdicts(last, out);
        Ok(())
    }

    /// Silero VAD hears the frame's first half now (the decisions are those of the whole
    /// frame: its 32 ms windows are cut from the stream whatever the pieces).
    fn on_early(&mut self, part: &[f32]) -> Result<bool> {
        let Some(v) = &mut self.models.vad else {
            return Ok(false);
        };
        self.early_events.extend(v.push_24k(part)?);
        self.early_samples += part.len();
        Ok(true)
    }

    fn reset(&mut self) {
        self.models.reset();
        self.early_samples = 0;
        self.early_events.clear();
        self.energy = EnergyActivity::default();
        self.speaking = false;
        self.turn_open = false;
        self.pause = None;
        self.head_armed = true;
        // Verdicts on the old stream's pauses no longer apply.
        self.pauses += 1;
    }
}

impl Drop for TurnStage<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.smart.take() {
            self.models.smart_turn = w.close();
        }
    }
}
