//! The latency harness's analysis: what a session's events and recording say about the
//! delays a person would feel.
//!
//! Times are on the input's clock: input frame `f` is complete `(f + 1) * 80 ms` after the
//! input starts. What the model emits at frame `f` is felt when that frame's processing
//! is done: `(f + 1) * 80 ms` plus the frame's latency (at real-time pace: from the frame
//! being available to its output being queued, queueing included) or, unpaced, its
//! compute alone (frames are then available at once, so their wall-clock latency would
//! count a backlog no live session has).

use serde::{Deserialize, Serialize};

use super::{
    Event, FrameMetrics, Mode, ResponseTiming, Speaker, StageTime, TurnSettings, TurnSource,
};
use crate::audio::{FRAME_LEN_SAMPLES, SAMPLE_RATE_HZ};
use crate::{Error, Result};

const FRAME_S: f64 = FRAME_LEN_SAMPLES as f64 / SAMPLE_RATE_HZ as f64;

/// A word alignment of the input (assets/make_speech.py writes them).
#[derive(Debug, Clone, Deserialize)]
pub struct Alignment {
    pub turns: Vec<AlignedTurn>,
    pub words: Vec<AlignedWord>,
    /// Pauses inside a sentence (the turn goes on after them): where an end-of-turn
    /// detector must not fire. Written by tests/reference/make_turn_set.py.
    #[serde(default)]
    pub pauses: Vec<AlignedTurn>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AlignedTurn {
    pub start_s: f64,
    pub end_s: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AlignedWord {
    pub word: String,
    pub start_s: f64,
    pub end_s: f64,
}

impl Alignment {
    /// Reads an alignment of a recording of `duration_s` seconds: every time must be a
    /// finite number within the recording (a second of slack at its end), each span's
    /// start no later than its end, the turns in order.
    pub fn load(path: &std::path::Path, duration_s: f64) -> Result<Self> {
        let bad = |reason: String| Error::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let a: Self = serde_json::from_str(&text).map_err(|e| {
            bad(format!(
                "not an alignment (a JSON object with `turns` and `words`: spans of `start_s` and `end_s`): {e}"
            ))
        })?;
        let spans = a
            .turns
            .iter()
            .map(|t| ("turn", t.start_s, t.end_s))
            .chain(a.pauses.iter().map(|t| ("pause", t.start_s, t.end_s)))
            .chain(a.words.iter().map(|w| ("word", w.start_s, w.end_s)));
        for (i, (what, start, end)) in spans.enumerate() {
            if !(start.is_finite() && end.is_finite() && 0.0 <= start && start <= end)
                || end > duration_s + 1.0
            {
                return Err(bad(format!(
                    "a {what} (span {i}) from {start} s to {end} s is not within the recording's {duration_s:.2} s (0 <= start <= end expected)"
                )));
            }
        }
        if let Some(w) = a.turns.windows(2).find(|w| w[1].start_s < w[0].start_s) {
            return Err(bad(format!(
                "the turns are not in order: one at {} s follows one at {} s",
                w[1].start_s, w[0].start_s
            )));
        }
        Ok(a)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(v: &[f64]) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let at = |q: f64| s[((q * (s.len() - 1) as f64).round() as usize).min(s.len() - 1)];
        Self {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: s[s.len() - 1],
            mean: s.iter().sum::<f64>() / s.len() as f64,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StagePercentiles {
    pub stage: &'static str,
    pub ms: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct Compute {
    /// Each stage of the mode, in pipeline order.
    pub stages: Vec<StagePercentiles>,
    /// The stages' compute once a frame was complete: its latency on the model thread.
    pub total_ms: Percentiles,
    /// Work done on frames before they were complete (their first halves, as they were
    /// heard), by stage; not in `total_ms`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub early: Vec<StagePercentiles>,
    /// Mean compute per frame (the early work included) over the 80 ms a frame lasts.
    pub real_time_factor: f64,
    pub deadline_misses: usize,
    pub frames: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct WordDelay {
    pub word: String,
    /// End of the word in the input.
    pub end_s: f64,
    /// The transcribed word it was matched to, and when that was felt.
    pub emitted: String,
    pub emitted_s: f64,
    pub delay_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TurnDelay {
    pub turn: usize,
    pub end_s: f64,
    /// When the event (end of turn detected, or the first audible reply) was felt.
    pub at_s: Option<f64>,
    pub delay_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyReport {
    pub mode: Mode,
    pub pace: String,
    pub device: String,
    pub input_s: f64,
    pub compute: Compute,
    /// Output frames written after they were due at a speaker that started one frame
    /// after the first output (unpaced: frames whose compute exceeded the budget).
    pub output_underruns: usize,
    /// Echo cancellation's CPU per captured frame (on the audio-in thread, beside the
    /// stages), when it ran.
    pub echo_cancellation_ms: Option<Percentiles>,
    /// Listen mode with an alignment: each aligned word and when its transcription was
    /// felt.
    pub words: Vec<WordDelay>,
    pub word_delay_ms: Option<Percentiles>,
    /// Listen mode: end-of-turn detection per turn.
    pub end_of_turn: Vec<TurnDelay>,
    pub end_of_turn_delay_ms: Option<Percentiles>,
    /// Each turn-taking detector alone, and the combined policy, against the alignment's
    /// turn ends and in-sentence pauses.
    pub turn_taking: Vec<TurnTakingRow>,
    /// Every turn-taking verdict the session gave, in order (what the table scores).
    pub turn_verdicts: Vec<TurnVerdict>,
    /// Duplex mode: from the end of each user turn to the first audible model output.
    pub response: Vec<TurnDelay>,
    pub response_latency_ms: Option<Percentiles>,
    /// Where the turns came from: the alignment, or the input's energy.
    pub turns_from: String,
    /// Cascade mode: each reply, with its milestones.
    pub cascade: Vec<CascadeReply>,
    /// Cascade mode: each milestone in ms after the end of the user's speech (replies
    /// matched to a turn), in the order they come.
    pub cascade_stages_ms: Vec<CascadeStage>,
}

/// One reply of the cascade.
#[derive(Debug, Clone, Serialize)]
pub struct CascadeReply {
    /// The user turn it answers (the last to end before the decision), and its end in the
    /// input, seconds.
    pub turn: Option<usize>,
    pub turn_end_s: Option<f64>,
    /// When the end of the turn was decided (felt), seconds on the input's clock.
    pub decided_s: f64,
    /// The user's turn as the LLM got it.
    pub user: String,
    /// The cascade's own milestones, ms after the decision.
    pub timing: ResponseTiming,
    /// When the reply's first audible frame went to the speaker (its write time, seconds
    /// from the session's start).
    pub heard_s: Option<f64>,
    pub cancelled: bool,
    pub failed: Option<String>,
    /// What was said (the history keeps this).
    pub spoken: String,
}

/// One cascade milestone over the replies, in ms after the end of the user's speech.
#[derive(Debug, Clone, Serialize)]
pub struct CascadeStage {
    pub milestone: &'static str,
    pub replies: usize,
    pub ms: Percentiles,
}

/// One turn-taking detector (or the combined policy) scored on an aligned recording.
#[derive(Debug, Clone, Serialize)]
pub struct TurnTakingRow {
    /// `vad`, `energy`, `smart_turn`, `stt_head`, or `policy` (the [`Event::TurnEnd`]s).
    pub detector: String,
    pub turns: usize,
    /// Turn ends it fired at (within `TURN_END_WINDOW_S` before the turn's end, or after
    /// it and before the next turn).
    pub detected: usize,
    /// From the end of the turn's last word to the decision being felt.
    pub delay_ms: Option<Percentiles>,
    pub pauses: usize,
    /// In-sentence pauses it fired in: a false end of turn.
    pub false_ends: usize,
    pub false_end_rate: f64,
}

/// One detector's verdict (`fires`: it reached that detector's threshold), or the policy's
/// turn end.
#[derive(Debug, Clone, Serialize)]
pub struct TurnVerdict {
    pub detector: String,
    pub probability: f32,
    pub fires: bool,
    /// The pause or end it is about, in input audio.
    pub time_s: f64,
    /// When it was felt.
    pub felt_s: f64,
}

/// A detection dated up to this long before a turn's labelled end (an alignment's word end
/// is not exact) still counts for that turn.
pub const TURN_END_WINDOW_S: f64 = 0.3;

/// What the harness collected.
#[derive(Debug)]
pub struct SessionRecord<'a> {
    pub mode: Mode,
    pub realtime: bool,
    pub events: &'a [Event],
    pub input_24k: &'a [f32],
    pub output_24k: &'a [f32],
    /// When each output frame was written, seconds from the session start.
    pub output_times_s: &'a [f64],
}

impl SessionRecord<'_> {
    pub fn metrics(&self) -> Vec<FrameMetrics> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Metrics(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    /// When what frame `f` produced was felt (see the module's doc).
    pub fn felt_s(&self, metrics: &[FrameMetrics], f: u64) -> f64 {
        let extra_ms = metrics.iter().find(|m| m.frame == f).map_or(0.0, |m| {
            if self.realtime {
                m.latency_ms
            } else {
                m.compute_ms()
            }
        });
        (f + 1) as f64 * FRAME_S + extra_ms / 1e3
    }
}

/// Turns of `pcm` by energy: 80 ms frames louder than a tenth of the loudest one's RMS
/// are speech; a turn ends before 0.8 s or more of non-speech.
pub fn turns_by_energy(pcm: &[f32]) -> Vec<AlignedTurn> {
    let rms: Vec<f32> = pcm
        .chunks(FRAME_LEN_SAMPLES)
        .map(|c| (c.iter().map(|v| v * v).sum::<f32>() / c.len() as f32).sqrt())
        .collect();
    let loud = rms.iter().copied().fold(0f32, f32::max) * 0.1;
    let mut turns = vec![];
    let mut cur: Option<(usize, usize)> = None;
    for (i, &r) in rms.iter().enumerate() {
        if r > loud && loud > 0.0 {
            cur = Some(match cur {
                Some((s, e)) if i - e <= 10 => (s, i),
                Some((s, e)) => {
                    turns.push((s, e));
                    (i, i)
                }
                None => (i, i),
            });
        }
    }
    turns.extend(cur);
    turns
        .into_iter()
        .map(|(s, e)| AlignedTurn {
            start_s: s as f64 * FRAME_S,
            end_s: (e + 1) as f64 * FRAME_S,
        })
        .collect()
}

fn normalise(w: &str) -> String {
    w.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

impl LatencyReport {
    pub fn compute(rec: &SessionRecord, alignment: Option<&Alignment>, device: &str) -> Self {
        let metrics = rec.metrics();
        let total: Vec<f64> = metrics.iter().map(FrameMetrics::compute_ms).collect();
        let busy: Vec<f64> = metrics
            .iter()
            .map(|m| m.compute_ms() + m.early_ms())
            .collect();
        // Each stage's percentiles over all frames, from `times` (a frame's stage times).
        let by_stage = |times: fn(&FrameMetrics) -> &[StageTime]| {
            let mut names: Vec<&'static str> = vec![];
            for m in &metrics {
                for st in times(m) {
                    if !names.contains(&st.stage) {
                        names.push(st.stage);
                    }
                }
            }
            names
                .into_iter()
                .map(|stage| {
                    let ms: Vec<f64> = metrics
                        .iter()
                        .map(|m| {
                            times(m)
                                .iter()
                                .filter(|s| s.stage == stage)
                                .map(|s| s.ms)
                                .sum()
                        })
                        .collect();
                    StagePercentiles {
                        stage,
                        ms: Percentiles::of(&ms),
                    }
                })
                .collect::<Vec<_>>()
        };
        let compute = Compute {
            stages: by_stage(|m| &m.stages),
            total_ms: Percentiles::of(&total),
            early: by_stage(|m| &m.early),
            real_time_factor: Percentiles::of(&busy).mean / (FRAME_S * 1e3),
            deadline_misses: metrics.iter().filter(|m| m.deadline_missed).count(),
            frames: metrics.len(),
        };
        let output_underruns = if rec.realtime {
            let t0 = rec.output_times_s.first().copied().unwrap_or(0.0);
            rec.output_times_s
                .iter()
                .enumerate()
                .filter(|&(i, &t)| t > t0 + (i + 1) as f64 * FRAME_S)
                .count()
        } else if rec.mode == Mode::Duplex {
            compute.deadline_misses
        } else {
            0
        };
        let (turns, turns_from) = match alignment {
            Some(a) => (a.turns.clone(), "alignment".to_string()),
            None => (turns_by_energy(rec.input_24k), "input energy".to_string()),
        };

        // Words (listen mode, with an alignment).
        let mut words = vec![];
        if let (Mode::Listen, Some(a)) = (rec.mode, alignment) {
            let emitted: Vec<(String, f64, f64, u64)> = rec
                .events
                .iter()
                .filter_map(|e| match e {
                    Event::Word {
                        speaker: Speaker::User,
                        text,
                        start_s,
                        end_s,
                        frame,
                    } => Some((text.clone(), *start_s, *end_s, *frame)),
                    _ => None,
                })
                .collect();
            for w in &a.words {
                // The same text nearby, else the transcribed word overlapping it most.
                let same = emitted.iter().find(|e| {
                    normalise(&e.0) == normalise(&w.word) && (e.1 - w.start_s).abs() < 1.0
                });
                let overlap =
                    |e: &&(String, f64, f64, u64)| (e.2.min(w.end_s) - e.1.max(w.start_s)).max(0.0);
                let best = same.or_else(|| {
                    emitted
                        .iter()
                        .filter(|e| overlap(e) > 0.0)
                        .max_by(|a, b| overlap(a).total_cmp(&overlap(b)))
                });
                if let Some(e) = best {
                    let at = rec.felt_s(&metrics, e.3);
                    words.push(WordDelay {
                        word: w.word.clone(),
                        end_s: w.end_s,
                        emitted: e.0.clone(),
                        emitted_s: at,
                        delay_ms: (at - w.end_s) * 1e3,
                    });
                }
            }
        }
        let word_delay_ms = (!words.is_empty())
            .then(|| Percentiles::of(&words.iter().map(|w| w.delay_ms).collect::<Vec<_>>()));

        // End of turn (the policy's decisions): the first felt after the turn's last
        // 0.5 s began, before the next turn starts.
        let eot_frames: Vec<u64> = rec
            .events
            .iter()
            .filter_map(|e| match e {
                Event::TurnEnd { frame, .. } => Some(*frame),
                _ => None,
            })
            .collect();
        let mut end_of_turn = vec![];
        {
            for (i, t) in turns.iter().enumerate() {
                let next = turns.get(i + 1).map_or(f64::INFINITY, |n| n.start_s);
                let at = eot_frames
                    .iter()
                    .map(|&f| rec.felt_s(&metrics, f))
                    .find(|&s| s >= t.end_s - 0.5 && s < next);
                end_of_turn.push(TurnDelay {
                    turn: i,
                    end_s: t.end_s,
                    at_s: at,
                    delay_ms: at.map(|s| (s - t.end_s) * 1e3),
                });
            }
        }
        let eot: Vec<f64> = end_of_turn.iter().filter_map(|t| t.delay_ms).collect();

        // Response latency (duplex mode): the first audible output frame at or after the
        // end of each turn.
        let mut response = vec![];
        if rec.mode == Mode::Duplex {
            let audible: Vec<bool> = rec
                .output_24k
                .chunks(FRAME_LEN_SAMPLES)
                .map(|c| (c.iter().map(|v| v * v).sum::<f32>() / c.len() as f32).sqrt() > 0.01)
                .collect();
            for (i, t) in turns.iter().enumerate() {
                // Output frame k carries what input frame k produced.
                let first =
                    (0..audible.len()).find(|&k| audible[k] && (k + 1) as f64 * FRAME_S >= t.end_s);
                let at = first.map(|k| rec.felt_s(&metrics, k as u64));
                response.push(TurnDelay {
                    turn: i,
                    end_s: t.end_s,
                    at_s: at,
                    delay_ms: at.map(|s| ((s - t.end_s) * 1e3).max(0.0)),
                });
            }
        }
        let resp: Vec<f64> = response.iter().filter_map(|t| t.delay_ms).collect();
        let verdicts = turn_verdicts(rec, &metrics);
        let cascade = cascade_replies(rec, &metrics, &turns);
        let cascade_stages_ms = cascade_stages(&cascade);
        Self {
            mode: rec.mode,
            pace: if rec.realtime { "realtime" } else { "fast" }.into(),
            device: device.into(),
            input_s: rec.input_24k.len() as f64 / SAMPLE_RATE_HZ as f64,
            compute,
            output_underruns,
            echo_cancellation_ms: {
                let aec: Vec<f64> = rec.metrics().iter().filter_map(|m| m.aec_ms).collect();
                (!aec.is_empty()).then(|| Percentiles::of(&aec))
            },
            words,
            word_delay_ms,
            end_of_turn,
            end_of_turn_delay_ms: (!eot.is_empty()).then(|| Percentiles::of(&eot)),
            turn_taking: alignment.map_or_else(Vec::new, |a| turn_taking(&verdicts, a)),
            turn_verdicts: verdicts,
            response,
            response_latency_ms: (!resp.is_empty()).then(|| Percentiles::of(&resp)),
            turns_from,
            cascade,
            cascade_stages_ms,
        }
    }

    /// The short table for the terminal.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let p = |x: &Percentiles| {
            format!(
                "{:>8.1} {:>8.1} {:>8.1} {:>8.1}",
                x.p50, x.p90, x.p99, x.max
            )
        };
        s += &format!(
            "latency harness: {} mode, {} pace, {}, {:.2} s of input, {} frames\n",
            self.mode, self.pace, self.device, self.input_s, self.compute.frames
        );
        s += &format!(
            "{:<28} {:>8} {:>8} {:>8} {:>8}\n",
            "per frame (ms)", "p50", "p90", "p99", "max"
        );
        for st in &self.compute.stages {
            s += &format!(
                "{:<28} {}\n",
                format!("  {}", stage_label(st.stage)),
                p(&st.ms)
            );
        }
        s += &format!("{:<28} {}\n", "  total", p(&self.compute.total_ms));
        if !self.compute.early.is_empty() {
            s += "before the frame was complete (its first half, not in the total):\n";
            for st in &self.compute.early {
                s += &format!(
                    "{:<28} {}\n",
                    format!("  {}", stage_label(st.stage)),
                    p(&st.ms)
                );
            }
        }
        s += &format!(
            "real-time factor {:.3}; deadline misses {} of {}; output underruns {}\n",
            self.compute.real_time_factor,
            self.compute.deadline_misses,
            self.compute.frames,
            self.output_underruns
        );
        if let Some(a) = &self.echo_cancellation_ms {
            s += &format!(
                "echo cancellation (ms per frame, audio-in thread): p50 {:.2}, p90 {:.2}, p99 {:.2}\n",
                a.p50, a.p90, a.p99
            );
        }
        if let Some(w) = &self.word_delay_ms {
            s += &format!(
                "word emission delay (ms): p50 {:.0}, p90 {:.0} over {} aligned words\n",
                w.p50,
                w.p90,
                self.words.len()
            );
        }
        if let Some(e) = &self.end_of_turn_delay_ms {
            s += &format!(
                "end-of-turn detection delay (ms): p50 {:.0}, max {:.0} ({} of {} turns detected; turns from {})\n",
                e.p50,
                e.max,
                self.end_of_turn.iter().filter(|t| t.at_s.is_some()).count(),
                self.end_of_turn.len(),
                self.turns_from
            );
        } else if !self.end_of_turn.is_empty() {
            s += &format!(
                "end of turn: not detected in {} turns\n",
                self.end_of_turn.len()
            );
        }
        if !self.turn_taking.is_empty() {
            s += &format!(
                "{:<12} {:>9} {:>9} {:>9} {:>15}\n",
                "turn-taking", "detected", "delay p50", "delay p90", "false ends"
            );
            for r in &self.turn_taking {
                let (p50, p90) = r.delay_ms.map_or(("-".into(), "-".into()), |d| {
                    (format!("{:.0}", d.p50), format!("{:.0}", d.p90))
                });
                s += &format!(
                    "{:<12} {:>9} {:>9} {:>9} {:>15}\n",
                    r.detector,
                    format!("{}/{}", r.detected, r.turns),
                    p50,
                    p90,
                    format!(
                        "{}/{} ({:.0}%)",
                        r.false_ends,
                        r.pauses,
                        r.false_end_rate * 100.0
                    )
                );
            }
        }
        if !self.cascade.is_empty() {
            s += &format!(
                "cascade: {} replies ({} cut short by the user, {} failed); ms after the end of the user's speech:\n",
                self.cascade.len(),
                self.cascade.iter().filter(|r| r.cancelled).count(),
                self.cascade.iter().filter(|r| r.failed.is_some()).count()
            );
            for st in &self.cascade_stages_ms {
                s += &format!(
                    "{:<28} {} ({} replies)\n",
                    format!("  {}", st.milestone),
                    p(&st.ms),
                    st.replies
                );
            }
        }
        if let Some(r) = &self.response_latency_ms {
            s += &format!(
                "response latency (ms, end of turn to first model audio): p50 {:.0}, max {:.0} over {} turns (turns from {})\n",
                r.p50,
                r.max,
                self.response.iter().filter(|t| t.at_s.is_some()).count(),
                self.turns_from
            );
        }
        s
    }
}

/// The cascade's replies in the events: each `ResponseStarted` (the decision) with the
/// `ResponseDone` that ends it, matched to the turn that ended last before the decision,
/// and the first audible frame the speaker got after it.
fn cascade_replies(
    rec: &SessionRecord,
    metrics: &[FrameMetrics],
    turns: &[AlignedTurn],
) -> Vec<CascadeReply> {
    if rec.mode != Mode::Cascade {
        return vec![];
    }
    let audible: Vec<bool> = rec
        .output_24k
        .chunks(FRAME_LEN_SAMPLES)
        .map(|c| (c.iter().map(|v| v * v).sum::<f32>() / c.len() as f32).sqrt() > 0.01)
        .collect();
    // Each reply: its decision, the user's turn it answers, and how it ended.
    let mut replies = vec![];
    let (mut decided, mut asked) = (None, String::new());
    for e in rec.events {
        match e {
            Event::UserTurn { text, .. } => asked = text.clone(),
            Event::ResponseStarted { frame, .. } => decided = Some(rec.felt_s(metrics, *frame)),
            Event::ResponseDone {
                cancelled,
                failed,
                spoken,
                timing,
                ..
            } => {
                if let Some(decided_s) = decided.take() {
                    replies.push((
                        decided_s,
                        std::mem::take(&mut asked),
                        *cancelled,
                        failed,
                        spoken,
                        *timing,
                    ));
                }
            }
            _ => {}
        }
    }
    let starts: Vec<f64> = replies.iter().map(|r| r.0).collect();
    replies
        .into_iter()
        .enumerate()
        .map(
            |(i, (decided_s, user, cancelled, failed, spoken, timing))| {
                let turn = turns
                    .iter()
                    .rposition(|t| t.end_s - TURN_END_WINDOW_S <= decided_s);
                // Its audio: between its decision and the next reply's, if the TTS made any
                // (a reply cut short before its first frame was never heard).
                let until = starts.get(i + 1).copied().unwrap_or(f64::INFINITY);
                let heard_s = (0..audible.len().min(rec.output_times_s.len()))
                    .filter(|_| timing.tts_first_audio_ms.is_some())
                    .map(|k| (k, rec.output_times_s[k]))
                    .find(|&(k, t)| audible[k] && t >= decided_s && t < until)
                    .map(|(_, t)| t);
                CascadeReply {
                    turn,
                    turn_end_s: turn.map(|i| turns[i].end_s),
                    decided_s,
                    user,
                    timing,
                    heard_s,
                    cancelled,
                    failed: failed.clone(),
                    spoken: spoken.clone(),
                }
            },
        )
        .collect()
}

/// Each milestone of the replies matched to a turn, in ms after the end of its speech.
fn cascade_stages(replies: &[CascadeReply]) -> Vec<CascadeStage> {
    let after = |pick: &dyn Fn(&CascadeReply, f64) -> Option<f64>| -> Vec<f64> {
        replies
            .iter()
            .filter_map(|r| {
                let end = r.turn_end_s?;
                let eot_ms = (r.decided_s - end) * 1e3;
                pick(r, eot_ms)
            })
            .collect()
    };
    let rows: [(&'static str, Vec<f64>); 5] = [
        ("end of turn detected", after(&|_, eot| Some(eot))),
        (
            "LLM first token",
            after(&|r, eot| r.timing.llm_first_token_ms.map(|m| eot + m)),
        ),
        (
            "first word complete",
            after(&|r, eot| r.timing.first_word_ms.map(|m| eot + m)),
        ),
        (
            "TTS first audio",
            after(&|r, eot| r.timing.tts_first_audio_ms.map(|m| eot + m)),
        ),
        (
            "first audio at the speaker",
            after(&|r, _| Some((r.heard_s? - r.turn_end_s?) * 1e3)),
        ),
    ];
    rows.into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(milestone, v)| CascadeStage {
            milestone,
            replies: v.len(),
            ms: Percentiles::of(&v),
        })
        .collect()
}

/// What the table calls a stage.
fn stage_label(stage: &str) -> String {
    match stage {
        "encode" => "encode (Mimi)".into(),
        "stt" => "LM step (STT)".into(),
        "lm" => "LM step".into(),
        "decode" => "decode (Mimi)".into(),
        "turn" => "turn-taking".into(),
        other => other.into(),
    }
}

/// Every turn-taking verdict in the events, with when it was felt.
fn turn_verdicts(rec: &SessionRecord, metrics: &[FrameMetrics]) -> Vec<TurnVerdict> {
    let settings = TurnSettings::default();
    let name = |s: TurnSource| {
        serde_json::to_value(s)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    };
    rec.events
        .iter()
        .filter_map(|e| match e {
            Event::TurnSignal {
                source,
                probability,
                time_s,
                frame,
            } => Some(TurnVerdict {
                detector: name(*source),
                probability: *probability,
                fires: match source {
                    TurnSource::SmartTurn => *probability >= settings.smart_turn_threshold,
                    TurnSource::SttHead => *probability >= settings.head_threshold,
                    _ => true,
                },
                time_s: *time_s,
                felt_s: rec.felt_s(metrics, *frame),
            }),
            Event::TurnEnd {
                probability,
                time_s,
                frame,
                ..
            } => Some(TurnVerdict {
                detector: "policy".into(),
                probability: *probability,
                fires: true,
                time_s: *time_s,
                felt_s: rec.felt_s(metrics, *frame),
            }),
            _ => None,
        })
        .collect()
}

/// Scores every turn-taking detector seen in the verdicts, and the policy.
fn turn_taking(verdicts: &[TurnVerdict], a: &Alignment) -> Vec<TurnTakingRow> {
    let firings: Vec<(String, f64, f64)> = verdicts
        .iter()
        .filter(|v| v.fires)
        .map(|v| (v.detector.clone(), v.time_s, v.felt_s))
        .collect();
    let mut detectors: Vec<String> = vec![];
    for (d, ..) in &firings {
        if !detectors.contains(d) {
            detectors.push(d.clone());
        }
    }
    // The policy last, whether or not it fired.
    detectors.retain(|d| d != "policy");
    detectors.push("policy".into());
    detectors
        .into_iter()
        .map(|d| {
            let mine: Vec<(f64, f64)> = firings
                .iter()
                .filter(|f| f.0 == d)
                .map(|f| (f.1, f.2))
                .collect();
            let mut delays = vec![];
            for (i, t) in a.turns.iter().enumerate() {
                let next = a.turns.get(i + 1).map_or(f64::INFINITY, |n| n.start_s);
                if let Some(&(_, felt)) = mine
                    .iter()
                    .find(|(at, _)| *at >= t.end_s - TURN_END_WINDOW_S && *at < next)
                {
                    delays.push((felt - t.end_s) * 1e3);
                }
            }
            let false_ends = a
                .pauses
                .iter()
                .filter(|p| {
                    mine.iter()
                        .any(|(at, _)| *at >= p.start_s - TURN_END_WINDOW_S && *at < p.end_s)
                })
                .count();
            TurnTakingRow {
                detector: d,
                turns: a.turns.len(),
                detected: delays.len(),
                delay_ms: (!delays.is_empty()).then(|| Percentiles::of(&delays)),
                pauses: a.pauses.len(),
                false_ends,
                false_end_rate: if a.pauses.is_empty() {
                    0.0
                } else {
                    false_ends as f64 / a.pauses.len() as f64
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(frame: u64, lm_ms: f64) -> Event {
        Event::Metrics(FrameMetrics {
            frame,
            stages: vec![
                StageTime {
                    stage: "encode",
                    ms: 10.0,
                },
                StageTime {
                    stage: "lm",
                    ms: lm_ms,
                },
            ],
            early: vec![],
            latency_ms: 500.0,
            deadline_missed: 10.0 + lm_ms > 80.0,
            done_at_s: 0.0,
            input_overruns: 0,
            output_underruns: 0,
            output_low_water_ms: None,
            aec_ms: None,
        })
    }

    #[test]
    fn word_and_turn_delays_follow_the_frame_clock() {
        // 20 frames of input; one word ending at 0.5 s emitted at frame 9; an end of turn
        // detected at frame 14 for a turn ending at 0.8 s.
        let mut events: Vec<Event> = (0..20)
            .map(|f| metrics(f, if f == 3 { 90.0 } else { 20.0 }))
            .collect();
        events.push(Event::Word {
            speaker: Speaker::User,
            text: "Hello,".into(),
            start_s: 0.1,
            end_s: 0.6,
            frame: 9,
        });
        events.push(Event::TurnEnd {
            source: TurnSource::SttHead,
            time_s: 0.9,
            probability: 0.8,
            frame: 14,
        });
        let input = vec![0f32; 20 * FRAME_LEN_SAMPLES];
        let rec = SessionRecord {
            mode: Mode::Listen,
            realtime: false,
            events: &events,
            input_24k: &input,
            output_24k: &[],
            output_times_s: &[],
        };
        let a = Alignment {
            turns: vec![AlignedTurn {
                start_s: 0.1,
                end_s: 0.8,
            }],
            words: vec![AlignedWord {
                word: "hello".into(),
                start_s: 0.1,
                end_s: 0.5,
            }],
            pauses: vec![],
        };
        let r = LatencyReport::compute(&rec, Some(&a), "test");
        assert_eq!(r.compute.frames, 20);
        assert_eq!(r.compute.deadline_misses, 1);
        // Frame 9 ends at 0.8 s; unpaced, its compute (30 ms) is added.
        assert!((r.words[0].emitted_s - 0.83).abs() < 1e-9, "{:?}", r.words);
        assert!((r.words[0].delay_ms - 330.0).abs() < 1e-6);
        let eot = r.end_of_turn[0].delay_ms.expect("detected");
        assert!((eot - (1.2 + 0.03 - 0.8) * 1e3).abs() < 1e-6, "{eot}");
        // At real-time pace the frame's measured latency counts instead.
        let rt = SessionRecord {
            realtime: true,
            ..rec
        };
        let r = LatencyReport::compute(&rt, Some(&a), "test");
        assert!((r.words[0].delay_ms - (0.8 + 0.5 - 0.5) * 1e3).abs() < 1e-6);
    }

    #[test]
    fn energy_finds_turns_separated_by_pauses() {
        let mut pcm = vec![0f32; 60 * FRAME_LEN_SAMPLES];
        for (i, v) in pcm.iter_mut().enumerate() {
            let f = i / FRAME_LEN_SAMPLES;
            if (5..15).contains(&f) || (35..40).contains(&f) {
                *v = 0.3 * ((i as f32) * 0.05).sin();
            }
        }
        let t = turns_by_energy(&pcm);
        assert_eq!(t.len(), 2, "{t:?}");
        assert!((t[0].start_s - 0.4).abs() < 1e-9 && (t[0].end_s - 1.2).abs() < 1e-9);
        assert!((t[1].end_s - 3.2).abs() < 1e-9);
    }

    #[test]
    fn response_latency_is_the_first_audible_frame_after_the_turn() {
        let events: Vec<Event> = (0..30).map(|f| metrics(f, 20.0)).collect();
        let input = vec![0f32; 30 * FRAME_LEN_SAMPLES];
        let mut out = vec![0f32; 30 * FRAME_LEN_SAMPLES];
        // Audible from output frame 20 (ends at 1.68 s).
        out[20 * FRAME_LEN_SAMPLES..]
            .iter_mut()
            .for_each(|v| *v = 0.1);
        let rec = SessionRecord {
            mode: Mode::Duplex,
            realtime: false,
            events: &events,
            input_24k: &input,
            output_24k: &out,
            output_times_s: &[],
        };
        let a = Alignment {
            turns: vec![AlignedTurn {
                start_s: 0.0,
                end_s: 1.0,
            }],
            words: vec![],
            pauses: vec![],
        };
        let r = LatencyReport::compute(&rec, Some(&a), "test");
        let d = r.response[0].delay_ms.expect("reply");
        assert!((d - (1.68 + 0.03 - 1.0) * 1e3).abs() < 1e-6, "{d}");
    }

    #[test]
    fn cascade_milestones_count_from_the_end_of_the_speech() {
        // A turn ends at 1.0 s; the end of turn is decided at frame 14 (felt at 1.2 s +
        // 30 ms of compute); the reply's first audible frame goes out at 2.5 s.
        let mut events: Vec<Event> = (0..40).map(|f| metrics(f, 20.0)).collect();
        events.push(Event::UserTurn {
            text: "What is the capital of France?".into(),
            typed: false,
            frame: 15,
        });
        events.push(Event::ResponseStarted {
            frame: 14,
            after_user_ms: None,
        });
        let timing = ResponseTiming {
            llm_first_token_ms: Some(300.0),
            first_word_ms: Some(400.0),
            tts_first_audio_ms: Some(900.0),
            first_audio_played_ms: Some(1000.0),
        };
        events.push(Event::ResponseDone {
            cancelled: false,
            failed: None,
            spoken: "Paris.".into(),
            frame: 30,
            timing,
        });
        let input = vec![0f32; 40 * FRAME_LEN_SAMPLES];
        let mut out = vec![0f32; 40 * FRAME_LEN_SAMPLES];
        out[25 * FRAME_LEN_SAMPLES..30 * FRAME_LEN_SAMPLES]
            .iter_mut()
            .for_each(|v| *v = 0.1);
        // Output frame k is written at 0.1 k s: frame 25 at 2.5 s.
        let times: Vec<f64> = (0..40).map(|k| k as f64 * 0.1).collect();
        let rec = SessionRecord {
            mode: Mode::Cascade,
            realtime: false,
            events: &events,
            input_24k: &input,
            output_24k: &out,
            output_times_s: &times,
        };
        let a = Alignment {
            turns: vec![AlignedTurn {
                start_s: 0.0,
                end_s: 1.0,
            }],
            words: vec![],
            pauses: vec![],
        };
        let r = LatencyReport::compute(&rec, Some(&a), "test");
        assert_eq!(r.cascade.len(), 1);
        let reply = &r.cascade[0];
        assert_eq!((reply.turn, reply.spoken.as_str()), (Some(0), "Paris."));
        assert_eq!(reply.user, "What is the capital of France?");
        let eot = (1.2 + 0.03 - 1.0) * 1e3;
        let want = [
            ("end of turn detected", eot),
            ("LLM first token", eot + 300.0),
            ("first word complete", eot + 400.0),
            ("TTS first audio", eot + 900.0),
            ("first audio at the speaker", 1500.0),
        ];
        assert_eq!(r.cascade_stages_ms.len(), want.len());
        for (st, (name, ms)) in r.cascade_stages_ms.iter().zip(want) {
            assert_eq!(st.milestone, name);
            assert!(
                (st.ms.p50 - ms).abs() < 1e-6,
                "{name}: {} != {ms}",
                st.ms.p50
            );
        }
        assert!(r.table().contains("first audio at the speaker"));
        // Other modes have no cascade section.
        let duplex = SessionRecord {
            mode: Mode::Duplex,
            ..rec
        };
        assert!(LatencyReport::compute(&duplex, Some(&a), "test")
            .cascade
            .is_empty());
    }
}
