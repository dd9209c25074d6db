//! The cascade's reply stage: at the end of the user's turn, their words go to the LLM (on
//! a thread of its own), whose text goes word by word to the TTS worker (another thread),
//! whose audio is queued for the speaker at the frame clock. A barge-in (the user speaking
//! during a reply) cancels the LLM and the TTS and drops the queued audio; the history
//! keeps what was actually played.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::speak::{SpeakHandle, SpeakModels, SpeechEvent, TtsWorker};
use super::stage::{Frame, Outbox, Stage};
use super::{Event, ResponseTiming, Speaker};
use crate::llm::{ChatLlm, History, ReplyOptions, WordCutter};
use crate::Result;

/// Frames of reply audio queued for the speaker at most: more waits in the TTS worker,
/// so a barge-in has little to drop and memory stays bounded.
const QUEUE_AHEAD_FRAMES: usize = 25;
/// How long the end of the input waits for a reply under way.
const FINISH_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// What the cascade needs besides the listening stages.
pub struct CascadeModels {
    pub llm: Box<dyn ChatLlm>,
    pub speak: SpeakModels,
    pub history: History,
    pub reply: ReplyOptions,
    /// User turns given as text (`conversation.item.create`), as if heard.
    pub inbox: Receiver<String>,
}

impl std::fmt::Debug for CascadeModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CascadeModels({})", self.llm.describe())
    }
}

/// Where a cascade stage leaves its models when it ends, for the next session.
pub(crate) type CascadeSlot = Arc<std::sync::Mutex<Option<CascadeModels>>>;

/// Where a client sends a user turn as text (a Realtime `input_text` item).
pub type CascadeInbox = Sender<String>;

impl CascadeModels {
    /// The models with a new text inbox, and its sender.
    pub fn new(
        llm: Box<dyn ChatLlm>,
        speak: SpeakModels,
        history: History,
        reply: ReplyOptions,
    ) -> (Self, CascadeInbox) {
        let (tx, rx) = bounded(16);
        (
            Self {
                llm,
                speak,
                history,
                reply,
                inbox: rx,
            },
            tx,
        )
    }
}

enum LlmEvent {
    Piece {
        id: u64,
        text: String,
    },
    /// The reply's first complete word went to the TTS.
    FirstWord {
        id: u64,
    },
    Done {
        id: u64,
        error: Option<String>,
    },
}

struct Reply {
    id: u64,
    user: String,
    turn_end: Instant,
    timing: ResponseTiming,
    /// Words with the frame (of this reply's audio) they start in.
    words: Vec<(String, usize)>,
    /// Frames of audio queued, and queued-then-played.
    queued: usize,
    llm_done: bool,
    llm_text: String,
    /// The LLM's error, if it failed.
    error: Option<String>,
}

/// The stage; its LLM and TTS threads stop when it is dropped.
pub struct CascadeStage {
    jobs: Option<Sender<(u64, Vec<crate::llm::ChatMessage>)>>,
    llm_events: Receiver<LlmEvent>,
    speech: Receiver<SpeechEvent>,
    speak: Option<SpeakHandle>,
    tts: Option<TtsWorker>,
    llm_thread: Option<std::thread::JoinHandle<Box<dyn ChatLlm>>>,
    cancelled: Arc<AtomicU64>,
    history: History,
    inbox: Receiver<String>,
    heard: String,
    reply: Option<Reply>,
    next_id: u64,
    frame_rate: f64,
    /// What the models came with, to hand them back whole.
    reply_opts: ReplyOptions,
    give_back: Option<CascadeSlot>,
    /// The STT brings out its last words at the frame after an end of turn.
    awaits_flush: bool,
    /// An end of turn waiting for them: when and at which frame it was decided.
    pending_turn: Option<(Instant, u64)>,
}

impl CascadeStage {
    pub fn new(m: CascadeModels) -> Result<Self> {
        let frame_rate = m.speak.mimi.config().frame_rate;
        let (speech_tx, speech) = bounded(4);
        let (tts, speak) = TtsWorker::start(m.speak, speech_tx)?;
        let (jobs, job_rx) = bounded::<(u64, Vec<crate::llm::ChatMessage>)>(4);
        let (ev_tx, llm_events) = bounded(256);
        let cancelled = Arc::new(AtomicU64::new(0));
        let (c, sp, opts) = (cancelled.clone(), speak.clone(), m.reply);
        let mut llm = m.llm;
        let llm_thread = std::thread::Builder::new()
            .name("llm".into())
            .spawn(move || {
                for (id, messages) in job_rx {
                    run_llm(llm.as_mut(), id, &messages, &opts, &c, &sp, &ev_tx);
                }
                llm
            })
            .map_err(|e| crate::Error::InvalidInput(format!("starting the LLM thread: {e}")))?;
        Ok(Self {
            jobs: Some(jobs),
            llm_events,
            speech,
            speak: Some(speak),
            tts: Some(tts),
            llm_thread: Some(llm_thread),
            cancelled,
            history: m.history,
            inbox: m.inbox,
            heard: String::new(),
            reply: None,
            next_id: 0,
            frame_rate,
            reply_opts: m.reply,
            give_back: None,
            awaits_flush: false,
            pending_turn: None,
        })
    }

    /// At an end of turn, waits for the STT's flush ([`Frame::stt_flushed`], the next
    /// frame) so the reply answers the turn's last words too.
    pub(crate) fn awaiting_stt_flush(mut self) -> Self {
        self.awaits_flush = true;
        self
    }

    /// When the stage ends, its LLM and TTS (and the history) go to `slot`.
    pub(crate) fn give_back_to(mut self, slot: CascadeSlot) -> Self {
        self.give_back = Some(slot);
        self
    }

    /// Starts the reply to `user` (typed, or heard), whose turn was decided at `decided`
    /// (at frame `frame`), now at frame `now`.
    fn start_reply(
        &mut self,
        user: String,
        typed: bool,
        (decided, frame): (Instant, u64),
        now: u64,
        out: &Outbox<'_>,
    ) {
        if user.trim().is_empty() {
            return;
        }
        out.send(Event::UserTurn {
            text: user.trim().to_string(),
            typed,
            frame: now,
        });
        self.next_id += 1;
        let id = self.next_id;
        let messages = self.history.messages_for(user.trim());
        if let Some(j) = &self.jobs {
            if j.send((id, messages)).is_err() {
                out.send(Event::Error {
                    message: "the LLM thread has stopped".into(),
                    fatal: false,
                });
                return;
            }
        }
        out.send(Event::ResponseStarted {
            frame,
            after_user_ms: None,
        });
        self.reply = Some(Reply {
            id,
            user: user.trim().to_string(),
            turn_end: decided,
            timing: ResponseTiming::default(),
            words: vec![],
            queued: 0,
            llm_done: false,
            llm_text: String::new(),
            error: None,
        });
    }

    /// Ends the reply: into the history goes what was played.
    fn finish_reply(&mut self, cancelled: bool, played: usize, frame: u64, out: &Outbox<'_>) {
        let Some(r) = self.reply.take() else { return };
        let spoken: Vec<&str> = r
            .words
            .iter()
            .filter(|(_, f)| *f < played)
            .map(|(w, _)| w.as_str())
            .collect();
        let spoken = spoken.join(" ");
        self.history.push(r.user, spoken.clone());
        out.send(Event::ResponseDone {
            cancelled,
            failed: r.error,
            spoken,
            frame,
            timing: r.timing,
        });
    }

    fn barge_in(&mut self, frame: u64, out: &mut Outbox<'_>) {
        let Some(r) = &self.reply else { return };
        let id = r.id;
        self.cancelled.fetch_max(id, Ordering::SeqCst);
        if let Some(s) = &self.speak {
            s.cancel(id);
        }
        let played = r.queued.saturating_sub(out.queued_frames());
        out.cancel_reply();
        self.finish_reply(true, played, frame, out);
    }

    /// The LLM's text and the TTS's speech that have come, the speech queued for the
    /// speaker while fewer than `ahead` frames wait there.
    fn pump(&mut self, index: u64, out: &mut Outbox<'_>, ahead: usize) -> Result<()> {
        // The output clock has taken a frame of this reply: it is playing.
        let waiting = out.queued_frames();
        if let Some(r) = &mut self.reply {
            if r.queued > waiting && r.timing.first_audio_played_ms.is_none() {
                r.timing.first_audio_played_ms = Self::ms_since(r.turn_end);
            }
        }
        // The LLM's text as it comes.
        while let Ok(e) = self.llm_events.try_recv() {
            let current = self.reply.as_ref().map(|r| r.id);
            match e {
                LlmEvent::Piece { id, text } if Some(id) == current => {
                    if let Some(r) = &mut self.reply {
                        r.timing
                            .llm_first_token_ms
                            .get_or_insert_with(|| Self::ms_since(r.turn_end).unwrap_or_default());
                        r.llm_text.push_str(&text);
                    }
                    out.send(Event::ResponseText { text, frame: index });
                }
                LlmEvent::FirstWord { id } if Some(id) == current => {
                    if let Some(r) = &mut self.reply {
                        r.timing
                            .first_word_ms
                            .get_or_insert_with(|| Self::ms_since(r.turn_end).unwrap_or_default());
                    }
                }
                LlmEvent::Done { id, error } if Some(id) == current => {
                    if let Some(m) = &error {
                        out.send(Event::Error {
                            message: m.clone(),
                            fatal: false,
                        });
                    }
                    let empty = self
                        .reply
                        .as_mut()
                        .map(|r| {
                            r.llm_done = true;
                            r.error = error;
                            r.llm_text.trim().is_empty()
                        })
                        .unwrap_or(false);
                    if empty {
                        // Nothing to say: the TTS was never given a word.
                        self.finish_reply(false, 0, index, out);
                    }
                }
                _ => {}
            }
        }
        // Its speech, a bounded way ahead of the speaker.
        while out.queued_frames() < ahead {
            let Ok(e) = self.speech.try_recv() else { break };
            let current = self.reply.as_ref().map(|r| r.id);
            match e {
                SpeechEvent::Audio { id, pcm } if Some(id) == current => {
                    if let Some(r) = &mut self.reply {
                        r.timing
                            .tts_first_audio_ms
                            .get_or_insert_with(|| Self::ms_since(r.turn_end).unwrap_or_default());
                        r.queued += 1;
                    }
                    out.play(pcm)?;
                }
                SpeechEvent::Word { id, text, start_s } if Some(id) == current => {
                    if let Some(r) = &mut self.reply {
                        r.words
                            .push((text.clone(), (start_s * self.frame_rate).round() as usize));
                    }
                    out.send(Event::TextDelta {
                        speaker: Speaker::Assistant,
                        text: format!("{text} "),
                        frame: index,
                    });
                }
                SpeechEvent::Done {
                    id,
                    cancelled: false,
                    ..
                } if Some(id) == current => {
                    // Everything queued will play: the whole reply was spoken.
                    let played = self.reply.as_ref().map_or(0, |r| r.queued);
                    self.finish_reply(false, played, index, out);
                }
                SpeechEvent::Skipped { id, words } if Some(id) == current => {
                    out.send(Event::Warning {
                        message: format!(
                            "the voice skipped words its tokenizer cannot say: {}",
                            words.join(" ")
                        ),
                    });
                }
                SpeechEvent::Error { id, message } if Some(id) == current => {
                    out.send(Event::Error {
                        message: format!("speech: {message}"),
                        fatal: false,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn ms_since(t: Instant) -> Option<f64> {
        Some(t.elapsed().as_secs_f64() * 1e3)
    }
}

impl Stage for CascadeStage {
    fn name(&self) -> &'static str {
        "cascade"
    }

    fn on_frame(&mut self, frame: &mut Frame, out: &mut Outbox<'_>) -> Result<()> {
        let index = frame.index;
        if let Some(h) = &frame.heard {
            self.heard.push_str(h);
        }
        if frame.speech_started && self.reply.is_some() {
            self.barge_in(index, out);
        }
        if frame.turn_ended && self.reply.is_none() {
            self.pending_turn = Some((Instant::now(), index));
        }
        // The turn's words are all in once the STT has flushed (the frame after the end
        // of turn; a frame more if the flush did not come).
        if let Some((decided, at)) = self.pending_turn {
            if !self.awaits_flush || frame.stt_flushed || index > at + 1 {
                self.pending_turn = None;
                let user = std::mem::take(&mut self.heard);
                self.start_reply(user, false, (decided, at), index, out);
            }
        }
        while let Ok(text) = self.inbox.try_recv() {
            if self.reply.is_some() {
                self.barge_in(index, out);
            }
            self.pending_turn = None;
            self.heard.clear();
            self.start_reply(text, true, (Instant::now(), index), index, out);
        }
        self.pump(index, out, QUEUE_AHEAD_FRAMES)
    }

    /// At the end of the input, a reply under way is said to its end (the output plays
    /// it after the input), as a duplex model's delayed reply is flushed.
    fn finish(&mut self, last: u64, out: &mut Outbox<'_>) -> Result<()> {
        if let Some(decided) = self.pending_turn.take() {
            let user = std::mem::take(&mut self.heard);
            self.start_reply(user, false, decided, last, out);
        }
        while let Ok(text) = self.inbox.try_recv() {
            self.start_reply(text, true, (Instant::now(), last), last, out);
        }
        let t = Instant::now();
        // Room for the whole reply: the output thread drains the queue after this.
        let room = super::stage::PLAYOUT_MAX_FRAMES - 1;
        while self.reply.is_some() && t.elapsed() < FINISH_LIMIT {
            self.pump(last, out, room)?;
            if out.queued_frames() >= room {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if self.reply.is_some() {
            out.send(Event::Warning {
                message: "the reply under way at the end of the input was cut short".into(),
            });
            self.cancel();
        }
        Ok(())
    }

    fn cancel(&mut self) {
        if let Some(r) = &self.reply {
            self.cancelled.fetch_max(r.id, Ordering::SeqCst);
            if let Some(s) = &self.speak {
                s.cancel(r.id);
            }
        }
        self.reply = None;
    }

    fn reset(&mut self) {
        self.cancel();
        self.pending_turn = None;
        self.heard.clear();
        self.history.clear();
    }
}

impl Drop for CascadeStage {
    fn drop(&mut self) {
        self.cancelled.store(u64::MAX, Ordering::SeqCst);
        if let Some(s) = &self.speak {
            s.cancel(u64::MAX);
        }
        // Closing the job queue ends the LLM thread; dropping the handles, the TTS. Their
        // event channels are closed first (fresh receivers put in their place), so a
        // thread handing over an event cannot block the join: its send fails and it stops.
        self.jobs.take();
        self.speak.take();
        drop(std::mem::replace(&mut self.llm_events, bounded(1).1));
        drop(std::mem::replace(&mut self.speech, bounded(1).1));
        let llm = self.llm_thread.take().and_then(|t| t.join().ok());
        let speak = self.tts.take().and_then(TtsWorker::join);
        if let (Some(slot), Some(llm), Some(speak)) = (self.give_back.take(), llm, speak) {
            let (models, _) = CascadeModels::new(
                llm,
                speak,
                std::mem::replace(&mut self.history, History::new("", 1)),
                self.reply_opts,
            );
            let models = CascadeModels {
                inbox: std::mem::replace(&mut self.inbox, bounded(1).1),
                ..models
            };
            if let Ok(mut s) = slot.lock() {
                *s = Some(models);
            }
        }
    }
}

/// One reply on the LLM thread: its pieces to the stage, its whole words to the TTS.
fn run_llm(
    llm: &mut dyn ChatLlm,
    id: u64,
    messages: &[crate::llm::ChatMessage],
    opts: &ReplyOptions,
    cancelled: &AtomicU64,
    speak: &SpeakHandle,
    events: &Sender<LlmEvent>,
) {
    let stop = || cancelled.load(Ordering::SeqCst) >= id;
    if stop() {
        return;
    }
    let mut cutter = WordCutter::default();
    let mut said = false;
    let r = llm.reply(messages, opts, &mut |piece| {
        if stop() {
            return false;
        }
        let _ = events.send(LlmEvent::Piece {
            id,
            text: piece.to_string(),
        });
        let words = cutter.push(piece);
        if !words.trim().is_empty() {
            if !said {
                let _ = events.send(LlmEvent::FirstWord { id });
            }
            said = true;
            if speak.say(id, &words).is_err() {
                return false;
            }
        }
        true
    });
    let rest = cutter.finish();
    if !stop() {
        if !rest.trim().is_empty() {
            if !said {
                let _ = events.send(LlmEvent::FirstWord { id });
            }
            said = true;
            let _ = speak.say(id, &rest);
        }
        if said {
            let _ = speak.end(id);
        }
    }
    let _ = events.send(LlmEvent::Done {
        id,
        error: r.err().map(|e| e.to_string()),
    });
}
