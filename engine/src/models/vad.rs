//! Silero VAD (v6, `models/silero-vad/`, MIT) through ONNX Runtime, and where Parley finds
//! the runtime.
//!
//! ONNX Runtime is loaded at run time (`ort`'s `load-dynamic`): from `ORT_DYLIB_PATH` when
//! set, else from the copy `scripts/setup.sh` installs in `~/.cache/parley/onnxruntime/`
//! (`$XDG_CACHE_HOME/parley/onnxruntime/`). Where it is missing, [`runtime`] says so (the
//! same error every time; callers fall back to the energy detector).
//!
//! The model is embedded in the binary (2.3 MB). It takes 16 kHz audio in chunks of 512
//! samples, each preceded by the previous chunk's last 64 samples, with a recurrent state
//! carried from call to call; it gives the probability that the chunk is speech.

use std::path::PathBuf;
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::value::Tensor;

use crate::{Error, Result};

/// The model, as shipped in `models/silero-vad/`.
const SILERO_ONNX: &[u8] = include_bytes!("../../../models/silero-vad/silero_vad.onnx");
/// Samples per second the model takes.
pub const SAMPLE_RATE: u32 = 16_000;
/// New samples per call.
pub const CHUNK: usize = 512;
/// Samples of the previous call repeated before each chunk.
const CONTEXT: usize = 64;
/// The recurrent state: [2, 1, 128].
const STATE: usize = 2 * 128;

/// `~/.cache/parley/{what}` (or `$XDG_CACHE_HOME/parley/{what}`): where
/// `scripts/fetch_onnx.py` installs the runtime and the models it fetches.
pub(crate) fn setup_cache(what: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("parley").join(what))
}

/// Where ONNX Runtime's library is looked for: `ORT_DYLIB_PATH`, else setup's copy.
pub fn runtime_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Some(PathBuf::from(p));
    }
    let name = if cfg!(target_os = "macos") {
        "libonnxruntime.dylib"
    } else {
        "libonnxruntime.so"
    };
    Some(setup_cache("onnxruntime")?.join(name))
}

/// The process's ONNX Runtime environment, loaded on first use; the same error on every
/// call when the library is missing or does not load.
pub fn runtime() -> Result<Environment> {
    static ENV: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = runtime_path().ok_or("no home directory to find it in".to_string())?;
        if !path.is_file() {
            return Err(format!(
                "{} not found (run scripts/setup.sh, or set ORT_DYLIB_PATH to \
                 libonnxruntime from the onnxruntime wheel, 1.31 or newer)",
                path.display()
            ));
        }
        ort::init_from(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .with_name("parley")
            .build()
            .map_err(|e| format!("{}: {e}", path.display()))
    })
    .clone()
    .map_err(Error::OnnxRuntime)
}

fn ort_error(what: &str) -> impl Fn(ort::Error) -> Error + '_ {
    move |e| Error::OnnxRuntime(format!("{what}: {e}"))
}

/// Silero VAD with its streaming state.
pub struct SileroVad {
    session: Session,
    state: Vec<f32>,
    context: [f32; CONTEXT],
}

impl std::fmt::Debug for SileroVad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SileroVad").finish_non_exhaustive()
    }
}

impl SileroVad {
    /// The embedded model on one thread of ONNX Runtime.
    pub fn new() -> Result<Self> {
        let env = runtime()?;
        let session = Session::builder(&env)
            .map_err(ort_error("session options"))?
            .with_intra_threads(1)
            .map_err(|e| Error::OnnxRuntime(format!("session options: {e}")))?
            .commit_from_memory(SILERO_ONNX)
            .map_err(ort_error("loading silero_vad.onnx"))?;
        Ok(Self {
            session,
            state: vec![0.0; STATE],
            context: [0.0; CONTEXT],
        })
    }

    /// Forgets the stream: the next chunk starts a new one.
    pub fn reset(&mut self) {
        self.state.iter_mut().for_each(|v| *v = 0.0);
        self.context = [0.0; CONTEXT];
    }

    /// The probability that `chunk` (512 samples at 16 kHz, after the previous call's
    /// chunk) is speech.
    pub fn probability(&mut self, chunk: &[f32]) -> Result<f32> {
        if chunk.len() != CHUNK {
            return Err(Error::InvalidInput(format!(
                "Silero VAD takes chunks of {CHUNK} samples at 16 kHz, not {}",
                chunk.len()
            )));
        }
        let mut input = Vec::with_capacity(CONTEXT + CHUNK);
        input.extend_from_slice(&self.context);
        input.extend_from_slice(chunk);
        let run = ort_error("running silero_vad.onnx");
        let input = Tensor::from_array(([1usize, CONTEXT + CHUNK], input)).map_err(&run)?;
        let state = Tensor::from_array(([2usize, 1, 128], self.state.clone())).map_err(&run)?;
        let sr = Tensor::from_array(([0usize; 0], vec![SAMPLE_RATE as i64])).map_err(&run)?;
        let outputs = self
            .session
            .run(ort::inputs!["input" => input, "state" => state, "sr" => sr])
            .map_err(&run)?;
        let (_, p) = outputs["output"]
            .try_extract_tensor::<f32>()
            .map_err(&run)?;
        let (_, s) = outputs["stateN"]
            .try_extract_tensor::<f32>()
            .map_err(&run)?;
        if s.len() != STATE || p.is_empty() {
            return Err(Error::OnnxRuntime(format!(
                "silero_vad.onnx gave {} state values and {} outputs ({STATE} and 1 expected)",
                s.len(),
                p.len()
            )));
        }
        let prob = p[0];
        self.state.copy_from_slice(s);
        self.context.copy_from_slice(&chunk[CHUNK - CONTEXT..]);
        Ok(prob)
    }
}

/// When Silero's probabilities make speech start and stop (hysteresis, in the manner of
/// the silero-vad package's `VADIterator`): speech starts once the probability has been at
/// least `start_threshold` for `min_speech_ms`, and stops once it has stayed below
/// `stop_threshold` for `min_silence_ms`. Times are whole chunks (32 ms).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadSettings {
    pub start_threshold: f32,
    /// Below the start threshold, so that a probability hovering near it does not toggle.
    pub stop_threshold: f32,
    /// Speech shorter than this (a click, a breath) starts nothing.
    pub min_speech_ms: f64,
    /// A pause shorter than this (between words) stops nothing.
    pub min_silence_ms: f64,
    /// Silence this long while speaking is reported as a pause ([`VadEvent::Paused`]),
    /// where an end-of-turn model can judge the turn before speech is called stopped
    /// (ignored when not below `min_silence_ms`).
    pub pause_ms: f64,
}

impl Default for VadSettings {
    /// The package's threshold (0.5) and its stop threshold 0.15 lower; 64 ms of speech to
    /// start; 500 ms of silence to stop, as OpenAI Realtime's server VAD (`silence_duration_ms`)
    /// by default: longer than the pause between two sentences of one turn in the
    /// project's recordings (0.29-0.32 s), shorter than the pause between turns.
    fn default() -> Self {
        Self {
            start_threshold: 0.5,
            stop_threshold: 0.35,
            min_speech_ms: 64.0,
            min_silence_ms: 500.0,
            // Smart Turn's authors pair it with a VAD that stops after 0.2 s.
            pause_ms: 200.0,
        }
    }
}

/// A decision of [`VoiceActivity`]: when (seconds from the start of the stream, at the
/// first chunk of the run that decided it) and the probability of the chunk that decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VadEvent {
    SpeechStarted {
        time_s: f64,
        probability: f32,
    },
    SpeechStopped {
        time_s: f64,
        probability: f32,
    },
    /// Silence of `pause_ms` while speaking, starting at `time_s`: speech may go on, or
    /// stop when the silence reaches `min_silence_ms`.
    Paused {
        time_s: f64,
        probability: f32,
    },
    /// Speech again after a [`VadEvent::Paused`], before it was called stopped.
    Resumed {
        time_s: f64,
        probability: f32,
    },
}

/// Seconds of 16 kHz audio [`VoiceActivity`] keeps for an end-of-turn model.
pub const HISTORY_S: usize = 8;

/// Silero VAD on the pipeline's audio: 24 kHz in (any amount, usually one 80 ms frame),
/// resampled to 16 kHz and cut into 512-sample chunks, with [`VadSettings`]' hysteresis.
pub struct VoiceActivity {
    vad: SileroVad,
    settings: VadSettings,
    resampler: crate::audio::resample::OutputResampler,
    /// 16 kHz samples waiting for a whole chunk.
    pending: Vec<f32>,
    /// Chunks run since the stream started.
    chunks: u64,
    speaking: bool,
    /// The current run of chunks on the other side of the threshold: its first chunk and
    /// its length.
    run: Option<(u64, u64)>,
    last: f32,
    /// The last [`HISTORY_S`] seconds heard, at 16 kHz.
    history: std::collections::VecDeque<f32>,
    /// 16 kHz samples heard since the stream started.
    heard: u64,
}

impl std::fmt::Debug for VoiceActivity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VoiceActivity")
            .field("settings", &self.settings)
            .field("chunks", &self.chunks)
            .field("speaking", &self.speaking)
            .finish_non_exhaustive()
    }
}

impl VoiceActivity {
    pub fn new(settings: VadSettings) -> Result<Self> {
        Ok(Self {
            vad: SileroVad::new()?,
            settings,
            // Half a frame at a time: a pipeline's early half is heard at once.
            resampler: crate::audio::resample::OutputResampler::with_chunk(
                SAMPLE_RATE,
                crate::audio::FRAME_LEN_SAMPLES / 2,
            )?,
            pending: Vec::with_capacity(2 * CHUNK),
            chunks: 0,
            speaking: false,
            run: None,
            last: 0.0,
            history: std::collections::VecDeque::with_capacity(HISTORY_S * SAMPLE_RATE as usize),
            heard: 0,
        })
    }

    /// Whether speech is going on, as decided so far.
    pub fn speaking(&self) -> bool {
        self.speaking
    }

    /// The probability of the last chunk run.
    pub fn last_probability(&self) -> f32 {
        self.last
    }

    /// Starts a new stream.
    pub fn reset(&mut self) {
        self.vad.reset();
        // Dropping what the resampler holds: the next stream starts clean.
        let _ = self.resampler.flush();
        self.pending.clear();
        self.chunks = 0;
        self.speaking = false;
        self.run = None;
        self.last = 0.0;
        self.history.clear();
        self.heard = 0;
    }

    /// The audio heard from `time_s` (seconds from the stream's start) to now, 16 kHz, at
    /// most the last [`HISTORY_S`] seconds.
    pub fn heard_since_16k(&self, time_s: f64) -> Vec<f32> {
        let first = self.heard - self.history.len() as u64;
        let from = ((time_s.max(0.0) * SAMPLE_RATE as f64) as u64).clamp(first, self.heard);
        self.history
            .iter()
            .skip((from - first) as usize)
            .copied()
            .collect()
    }

    /// Feeds 24 kHz audio; returns the decisions it led to, in order.
    pub fn push_24k(&mut self, pcm: &[f32]) -> Result<Vec<VadEvent>> {
        let fresh = self.resampler.process(pcm)?;
        let cap = HISTORY_S * SAMPLE_RATE as usize;
        let keep = fresh.len().min(cap);
        let over = (self.history.len() + keep).saturating_sub(cap);
        self.history.drain(..over);
        self.history.extend(&fresh[fresh.len() - keep..]);
        self.heard += fresh.len() as u64;
        self.pending.extend_from_slice(fresh);
        let mut events = vec![];
        let whole = self.pending.len() / CHUNK * CHUNK;
        for c in 0..whole / CHUNK {
            let p = self
                .vad
                .probability(&self.pending[c * CHUNK..(c + 1) * CHUNK])?;
            if let Some(e) = self.decide(p) {
                events.push(e);
            }
        }
        self.pending.drain(..whole);
        Ok(events)
    }

    /// One chunk's probability through the hysteresis.
    fn decide(&mut self, p: f32) -> Option<VadEvent> {
        let index = self.chunks;
        self.chunks += 1;
        self.last = p;
        let s = self.settings;
        let against = if self.speaking {
            p < s.stop_threshold
        } else {
            p >= s.start_threshold
        };
        let chunk_ms = CHUNK as f64 * 1000.0 / SAMPLE_RATE as f64;
        let reached = |ms: f64, n: u64| (n as f64) * chunk_ms + 1e-9 >= ms;
        if !against {
            let paused = self.speaking
                && s.pause_ms < s.min_silence_ms
                && self.run.is_some_and(|(_, n)| reached(s.pause_ms, n));
            self.run = None;
            return paused.then_some(VadEvent::Resumed {
                time_s: index as f64 * chunk_ms / 1000.0,
                probability: p,
            });
        }
        let (first, len) = self.run.map_or((index, 1), |(f, n)| (f, n + 1));
        self.run = Some((first, len));
        if self.speaking
            && s.pause_ms < s.min_silence_ms
            && reached(s.pause_ms, len)
            && !reached(s.pause_ms, len - 1)
        {
            return Some(VadEvent::Paused {
                time_s: first as f64 * chunk_ms / 1000.0,
                probability: p,
            });
        }
        let needed = if self.speaking {
            s.min_silence_ms
        } else {
            s.min_speech_ms
        };
        if (len as f64) * chunk_ms + 1e-9 < needed {
            return None;
        }
        self.speaking = !self.speaking;
        self.run = None;
        let time_s = first as f64 * chunk_ms / 1000.0;
        Some(if self.speaking {
            VadEvent::SpeechStarted {
                time_s,
                probability: p,
            }
        } else {
            VadEvent::SpeechStopped {
                time_s,
                probability: p,
            }
        })
    }
}
