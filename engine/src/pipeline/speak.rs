//! Speech on demand: the TTS and Mimi's decoder on a thread of their own ([`TtsWorker`]),
//! text in (whole, or in pieces as an LLM writes it) and 80 ms frames of speech out with
//! the words as their audio comes. The headless `speak` mode drives it from
//! `conversation.item.create`; the cascade will drive it from its LLM.
//!
//! Responses are numbered by the caller and said in order. A cancelled response stops
//! within one step (an atomic checked between steps, and a command that wakes a worker
//! waiting for words); what it had said so far is reported.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

use crate::compute::gpu::{select_device, Backend, DeviceChoice, GpuFormat};
use crate::compute::Dtype;
use crate::models::kyutai_config::ModelDir;
use crate::models::mimi::gpu::GpuMimi;
use crate::models::mimi::FrameDecoder;
use crate::models::mimi::Mimi;
use crate::models::tokenizer::TextTokenizer;
use crate::models::tts::{Step, TtsDecoder, TtsModel, TtsOptions, TtsStream, Voice, WordFeed};
use crate::{Error, Result};

/// What the worker needs: the model conditioned on its voice, Mimi with the codebooks
/// generated, the tokenizer, how to generate.
pub struct SpeakModels {
    pub tts: TtsModel,
    pub mimi: Mimi,
    /// The same codec on the TTS's GPU, where it runs on one (the decoder used then).
    pub gpu_mimi: Option<GpuMimi>,
    pub tokenizer: TextTokenizer,
    pub opts: TtsOptions,
    /// Which device and weights run, in words.
    pub description: String,
}

impl SpeakModels {
    /// Loads a directory laid out like kyutai/tts-1.6b-en_fr, conditioned on `voice` (a
    /// file or a `tts-voices` name) with guidance `cfg`, on `device` in `precision`,
    /// generating `codebooks` codebooks (None: all).
    pub fn load(
        dir: &Path,
        voice: &str,
        cfg: &str,
        device: DeviceChoice,
        precision: Dtype,
        codebooks: Option<usize>,
    ) -> Result<Self> {
        let d = ModelDir::open(dir)?;
        let lm_cfg = d.lm_config()?;
        if !lm_cfg.is_tts() {
            return Err(Error::InvalidInput(format!(
                "{} is not a text-to-speech model (its config.json says model_type {:?})",
                dir.display(),
                lm_cfg.other.get("model_type")
            )));
        }
        let voice = Voice::load(&Voice::resolve(voice)?)?;
        let tokenizer = d.load_tokenizer()?;
        let dep_q = lm_cfg.dep_q;
        let codebooks = checked_codebooks(codebooks, dep_q)?;
        let weights = d.lm_weights()?;
        let (mut tts, description, gpu) = place(device, precision, codebooks, |p| {
            TtsModel::load(&weights, lm_cfg.clone(), p)
        })?;
        tts.condition(&[&voice], cfg)?;
        let mut mimi = d.load_mimi()?;
        mimi.set_num_codebooks(codebooks)?;
        mimi.set_weight_precision(precision.mimi_precision())?;
        let (gpu_mimi, codec) = GpuMimi::beside(gpu.as_ref(), &mimi);
        let description = format!("{description}; {codec}");
        Ok(Self {
            tts,
            mimi,
            gpu_mimi,
            tokenizer,
            opts: TtsOptions {
                codebooks,
                ..TtsOptions::default()
            },
            description,
        })
    }
}

impl SpeakModels {
    /// The published architecture `preset` (tts-1.6b-en_fr) at full size with random
    /// weights, a random voice and the published Mimi's shape, saying text through the
    /// SentencePiece model `tokenizer`: for the latency harness, whose timings do not
    /// depend on the values (its speech is noise).
    pub fn random(
        preset: &str,
        tokenizer: &Path,
        device: DeviceChoice,
        precision: Dtype,
        codebooks: Option<usize>,
    ) -> Result<Self> {
        use crate::models::lm::LmConfig;
        use crate::models::mimi::MimiConfig;
        use crate::models::weights::Weights;
        let cfg = LmConfig::preset(preset)
            .filter(LmConfig::is_tts)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "`{preset}` is not a text-to-speech preset (tts-1.6b-en_fr is)"
                ))
            })?;
        let codebooks = checked_codebooks(codebooks, cfg.dep_q)?;
        let tokenizer = TextTokenizer::load(tokenizer)?;
        let (mut tts, description, gpu) = place(device, precision, codebooks, |p| {
            TtsModel::random(cfg.clone(), p)
        })?;
        // A fixed pseudo-random latent of the published shape.
        let mut seed = 11u32;
        let latent: Vec<f32> = (0..crate::models::tts::VOICE_DIM
            * crate::models::tts::VOICE_FRAMES)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        tts.condition(&[&Voice::from_latent(&latent)?], "2.0")?;
        let mut mimi = Mimi::from_weights(&Weights::random(1), MimiConfig::default(), codebooks)?;
        mimi.set_weight_precision(precision.mimi_precision())?;
        let (gpu_mimi, codec) = GpuMimi::beside(gpu.as_ref(), &mimi);
        Ok(Self {
            tts,
            mimi,
            gpu_mimi,
            tokenizer,
            opts: TtsOptions {
                codebooks,
                ..TtsOptions::default()
            },
            description: format!("{description}; {codec}; random weights ({preset})"),
        })
    }
}

/// The codebooks asked for (all `dep_q` when None), within what the model generates.
fn checked_codebooks(codebooks: Option<usize>, dep_q: usize) -> Result<usize> {
    let codebooks = codebooks.unwrap_or(dep_q);
    if codebooks == 0 || codebooks > dep_q {
        return Err(Error::InvalidInput(format!(
            "{codebooks} codebooks: this model generates 1 to {dep_q}"
        )));
    }
    Ok(codebooks)
}

/// The TTS `make` builds (in the host precision it is given) on `device`: on the CPU in
/// `precision`, or moved to the GPU in its format; with the line saying where it runs.
fn place(
    device: DeviceChoice,
    precision: Dtype,
    codebooks: usize,
    make: impl Fn(crate::compute::cpu::WeightPrecision) -> Result<TtsModel>,
) -> Result<(TtsModel, String, Option<Arc<crate::compute::gpu::Gpu>>)> {
    let (backend, line) = select_device(device)?;
    match &backend {
        Backend::Cpu => {
            let p = precision.cpu()?;
            Ok((make(p)?, format!("{line}; weights: {p}"), None))
        }
        Backend::Gpu(g) => {
            let f = precision.gpu()?;
            let host = match f {
                GpuFormat::F32 | GpuFormat::F16 => crate::compute::cpu::WeightPrecision::F32,
                _ => crate::compute::cpu::WeightPrecision::Bf16,
            };
            let mut m = make(host)?;
            m.to_gpu(g, f, codebooks)?;
            Ok((
                m,
                format!("{line}; weights: {f:?} on the GPU"),
                Some(g.clone()),
            ))
        }
    }
}

/// How often a worker waiting for words looks at the cancel flag.
const WAIT_TICK: std::time::Duration = std::time::Duration::from_millis(50);

enum Command {
    /// More text of response `id` (pieces may split words: a word is said once whole).
    Say { id: u64, text: String },
    /// Response `id` has all its text.
    End { id: u64 },
    /// Wakes a worker waiting for words after a cancel.
    Wake,
}

/// What the worker says.
#[derive(Debug, Clone, PartialEq)]
pub enum SpeechEvent {
    /// Response `id` started (its first step ran).
    Started { id: u64 },
    /// One 80 ms frame of response `id`'s speech (1920 samples at 24 kHz).
    Audio { id: u64, pcm: Vec<f32> },
    /// A word whose audio starts in the frame just sent, `start_s` into the response.
    Word { id: u64, text: String, start_s: f64 },
    /// Response `id` ended; `spoken`: the words whose audio was produced.
    Done {
        id: u64,
        cancelled: bool,
        /// The response failed (an `Error` event came before): nothing or only part of it
        /// was said.
        failed: bool,
        spoken: String,
        frames: usize,
    },
    /// Words of response `id` the tokenizer cannot say, skipped.
    Skipped { id: u64, words: Vec<String> },
    /// Response `id` failed (bad text, for example); the worker goes on.
    Error { id: u64, message: String },
}

/// Asks the worker for speech; clonable, shareable between threads.
#[derive(Clone)]
pub struct SpeakHandle {
    commands: Sender<Command>,
    /// Responses up to this id are cancelled.
    cancelled: Arc<AtomicU64>,
}

impl SpeakHandle {
    /// Text of response `id` (ids increase from 1; a new id starts a new response once the
    /// ones before are done).
    pub fn say(&self, id: u64, text: &str) -> Result<()> {
        self.send(Command::Say {
            id,
            text: text.to_string(),
        })
    }

    /// Response `id` has all its text.
    pub fn end(&self, id: u64) -> Result<()> {
        self.send(Command::End { id })
    }

    /// Stops response `id` (and every earlier one) now.
    pub fn cancel(&self, id: u64) {
        self.cancelled.fetch_max(id, Ordering::SeqCst);
        let _ = self.commands.try_send(Command::Wake);
    }

    /// A canceller that does not keep the worker alive (for a signal handler).
    pub fn canceller(&self) -> SpeechCanceller {
        SpeechCanceller {
            cancelled: self.cancelled.clone(),
        }
    }

    fn send(&self, c: Command) -> Result<()> {
        self.commands
            .send(c)
            .map_err(|_| Error::InvalidInput("the speech worker has stopped".into()))
    }
}

/// Cancels from anywhere without keeping the worker alive; a worker waiting for words
/// notices within 50 ms.
#[derive(Clone)]
pub struct SpeechCanceller {
    cancelled: Arc<AtomicU64>,
}

impl SpeechCanceller {
    /// Stops what is being said and everything given so far.
    pub fn cancel_all(&self) {
        self.cancelled.store(u64::MAX, Ordering::SeqCst);
    }
}

/// The TTS on a thread of its own. It says what it is given and stops once every
/// [`SpeakHandle`] is gone.
pub struct TtsWorker {
    thread: JoinHandle<SpeakModels>,
}

impl TtsWorker {
    /// Starts the worker; its events go to `events` (bounded: a slow reader slows it).
    pub fn start(models: SpeakModels, events: Sender<SpeechEvent>) -> Result<(Self, SpeakHandle)> {
        let (tx, rx) = bounded::<Command>(1024);
        let cancelled = Arc::new(AtomicU64::new(0));
        let c = cancelled.clone();
        let thread = std::thread::Builder::new()
            .name("tts".into())
            .spawn(move || run(models, rx, c, events))
            .map_err(|e| Error::InvalidInput(format!("starting the speech worker: {e}")))?;
        Ok((
            Self { thread },
            SpeakHandle {
                commands: tx,
                cancelled,
            },
        ))
    }

    /// Waits for the worker to say everything it was given (every handle must be gone);
    /// gives its models back for another worker (none if it panicked).
    pub fn join(self) -> Option<SpeakModels> {
        self.thread.join().ok()
    }
}

/// Commands of later responses that arrived while one was being said.
struct Inbox {
    rx: Receiver<Command>,
    later: VecDeque<Command>,
}

impl Inbox {
    fn next(&mut self) -> Option<Command> {
        self.later.pop_front().or_else(|| self.rx.recv().ok())
    }
}

fn run(
    mut m: SpeakModels,
    rx: Receiver<Command>,
    cancelled: Arc<AtomicU64>,
    events: Sender<SpeechEvent>,
) -> SpeakModels {
    let mut inbox = Inbox {
        rx,
        later: VecDeque::new(),
    };
    let mut done_up_to = 0u64;
    while let Some(c) = inbox.next() {
        let (id, text) = match c {
            Command::Say { id, text } if id > done_up_to => (id, text),
            Command::End { id } if id > done_up_to => {
                // A response ended before any text: it has no words (an error below).
                inbox.later.push_front(Command::End { id });
                (id, String::new())
            }
            _ => continue,
        };
        done_up_to = id;
        let r = respond(&mut m, &mut inbox, &cancelled, &events, id, text);
        if let Err(e) = r {
            let _ = events.send(SpeechEvent::Error {
                id,
                message: e.to_string(),
            });
            let _ = events.send(SpeechEvent::Done {
                id,
                cancelled: false,
                failed: true,
                spoken: String::new(),
                frames: 0,
            });
        }
    }
    m
}

/// Says response `id`, starting with `first`, taking its further text from the inbox.
fn respond(
    m: &mut SpeakModels,
    inbox: &mut Inbox,
    cancelled: &AtomicU64,
    events: &Sender<SpeechEvent>,
    id: u64,
    first: String,
) -> Result<()> {
    let frame_rate = m.mimi.config().frame_rate;
    // Text from an LLM: a word the tokenizer cannot say is respelt or skipped, not fatal.
    let mut feed = WordFeed::lenient();
    let mut stream = TtsStream::new(&mut m.tts, frame_rate, &m.opts)?;
    let (delays, delay_steps) = (stream.output().delays.clone(), stream.output().delay_steps);
    // The decoded frames dropped at the start (the acoustic codebooks' delay).
    let drop = delays.iter().skip(1).copied().max().unwrap_or(0);
    let codec: &mut dyn FrameDecoder = match m.gpu_mimi.as_mut() {
        Some(g) => g,
        None => &mut m.mimi,
    };
    let mut decoder = TtsDecoder::new(codec, delay_steps, &delays);
    let mut input_done = false;
    let mut words_in = 0usize;
    let tok = &m.tokenizer;
    let skipped = |feed: &mut WordFeed| {
        let words = feed.take_skipped();
        if !words.is_empty() {
            let _ = events.send(SpeechEvent::Skipped { id, words });
        }
    };
    let mut take = |c: Command,
                    stream: &mut TtsStream,
                    feed: &mut WordFeed,
                    input_done: &mut bool,
                    later: &mut VecDeque<Command>|
     -> Result<()> {
        match c {
            Command::Say { id: i, text } if i == id && !*input_done => {
                let e = feed.push(tok, &text, frame_rate)?;
                skipped(feed);
                words_in += e.len();
                stream.push(e);
            }
            Command::End { id: i } if i == id && !*input_done => {
                let e = feed.finish(tok, frame_rate)?;
                skipped(feed);
                words_in += e.len();
                if words_in == 0 {
                    return Err(Error::InvalidInput(
                        "a response with no words to say".into(),
                    ));
                }
                stream.push(e);
                stream.finish_input();
                *input_done = true;
            }
            Command::Wake => {}
            c @ (Command::Say { .. } | Command::End { .. }) => {
                if !matches!(&c, Command::Say { id: i, .. } | Command::End { id: i } if *i <= id) {
                    later.push_back(c);
                }
            }
        }
        Ok(())
    };
    take(
        Command::Say { id, text: first },
        &mut stream,
        &mut feed,
        &mut input_done,
        &mut inbox.later,
    )?;
    // What came for this response while the one before was being said.
    let mut earlier = std::mem::take(&mut inbox.later);
    while let Some(c) = earlier.pop_front() {
        if let Err(e) = take(c, &mut stream, &mut feed, &mut input_done, &mut inbox.later) {
            // Later responses' commands stay queued.
            inbox.later.extend(earlier);
            return Err(e);
        }
    }
    let mut frames = 0usize;
    let mut spoken: Vec<String> = vec![];
    let mut started = false;
    let is_cancelled = || cancelled.load(Ordering::SeqCst) >= id;
    loop {
        while let Ok(c) = inbox.rx.try_recv() {
            take(c, &mut stream, &mut feed, &mut input_done, &mut inbox.later)?;
        }
        if is_cancelled() {
            break;
        }
        match stream.step()? {
            Step::Stepped { frame } => {
                if !started {
                    started = true;
                    let _ = events.send(SpeechEvent::Started { id });
                }
                let Some(f) = frame else { continue };
                let Some(pcm) = decoder.push(&f)? else {
                    continue;
                };
                if events.send(SpeechEvent::Audio { id, pcm }).is_err() {
                    return Ok(());
                }
                // Words whose audio starts in this frame: fed at step s, heard from
                // output frame s - drop.
                for (text, s) in stream.transcript().iter().skip(spoken.len()) {
                    if s.saturating_sub(drop) > frames {
                        break;
                    }
                    let _ = events.send(SpeechEvent::Word {
                        id,
                        text: text.clone(),
                        start_s: s.saturating_sub(drop) as f64 / frame_rate,
                    });
                    spoken.push(text.clone());
                }
                frames += 1;
            }
            Step::NeedWords => match inbox.rx.recv_timeout(WAIT_TICK) {
                Ok(c) => take(c, &mut stream, &mut feed, &mut input_done, &mut inbox.later)?,
                Err(RecvTimeoutError::Timeout) => {}
                // Every handle is gone: what was given is all there is.
                Err(RecvTimeoutError::Disconnected) => take(
                    Command::End { id },
                    &mut stream,
                    &mut feed,
                    &mut input_done,
                    &mut inbox.later,
                )?,
            },
            Step::Done => break,
        }
    }
    let _ = events.send(SpeechEvent::Done {
        id,
        cancelled: is_cancelled(),
        failed: false,
        spoken: spoken.join(" "),
        frames,
    });
    Ok(())
}
