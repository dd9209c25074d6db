//! The engine's one error type. Every fallible engine function returns [`Result`].

use std::path::PathBuf;

/// What went wrong, naming the file, tensor or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },

    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },

    #[error("{path}: tensor `{name}` has shape {found:?}, the config expects {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{path}: tensor `{name}` has dtype {found}, expected a float type (f32, f16, bf16)")]
    BadDType {
        path: PathBuf,
        name: String,
        found: String,
    },

    #[error("{path}: {count} tensor(s) not used by the config, e.g. `{example}`: the config does not match these weights")]
    UnusedTensors {
        path: PathBuf,
        count: usize,
        example: String,
    },

    #[error("config {path}: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error(
        "{path}: tensor `{name}` of shape {shape:?} holds a non-finite value (NaN or infinity) at element {index}: the checkpoint is corrupt (a published one holds none)"
    )]
    NonFinite {
        path: PathBuf,
        name: String,
        shape: Vec<usize>,
        index: usize,
    },

    #[error("audio {path}: {reason}")]
    Audio { path: PathBuf, reason: String },

    #[error("{path}: {reason}")]
    Npy { path: PathBuf, reason: String },

    /// An input file (an alignment, a tokenizer, a voice) that is not what was expected.
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },

    /// A live audio device could not be listed, opened or driven.
    #[error("audio device `{device}`: {reason}")]
    AudioDevice { device: String, reason: String },

    /// A live audio stream stopped for good: the device disappeared, or its server went away.
    #[error("audio device `{device}` was lost: {reason}")]
    AudioDeviceLost { device: String, reason: String },

    #[error("no GPU: {0}")]
    NoGpu(String),

    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// ONNX Runtime missing, failing to load, or failing to run a model.
    #[error("ONNX Runtime: {0}")]
    OnnxRuntime(String),

    /// No preset of that name in `models/presets.json`.
    #[error("unknown model preset `{name}`; the presets are: {known}")]
    UnknownPreset { name: String, known: String },

    /// Some of a preset's files are not in the local Hugging Face cache.
    #[error(
        "model preset `{preset}` is not downloaded (missing: {missing}); pull it ({}) with `parley models pull {preset}`",
        crate::hub::format_bytes(*bytes_to_fetch)
    )]
    NotDownloaded {
        preset: String,
        missing: String,
        bytes_to_fetch: u64,
    },

    /// The Hub cannot be reached at all: no network, a name that does not resolve, a
    /// refused connection, or `HF_HUB_OFFLINE`.
    #[error(
        "{repo}: cannot download `{file}`: this machine cannot reach the Hugging Face Hub at {endpoint} ({reason}). \
         Connect to the network (or set HF_ENDPOINT to a reachable mirror), or copy the repository's files \
         from another machine into a directory and pass it with --model-dir"
    )]
    HubUnreachable {
        repo: String,
        file: String,
        endpoint: String,
        reason: String,
    },

    /// The Hub answered a request for a file with an HTTP error.
    #[error("{repo}: cannot download `{file}`: HTTP {status}: {reason} ({url})")]
    HubHttp {
        repo: String,
        file: String,
        url: String,
        status: u16,
        reason: String,
    },

    /// A download failed on the way (a broken transfer, an unexpected answer); the
    /// bytes received so far are kept and the next pull resumes after them.
    #[error("{file}: download failed: {reason}")]
    Download { file: String, reason: String },

    /// Downloaded bytes that do not hash to the Hub's ETag; they have been deleted.
    #[error(
        "{file}: the downloaded file is corrupt: its {algorithm} is {found}, the Hub says {expected}; \
         it was deleted, pull again"
    )]
    CorruptDownload {
        file: String,
        algorithm: String,
        expected: String,
        found: String,
    },

    /// A pull was cancelled; the partial file stays for the next pull.
    #[error("{file}: download cancelled; pull again to resume")]
    Cancelled { file: String },

    #[error(
        "not enough disk space in {path}: the download needs {}, {} is free",
        crate::hub::format_bytes(*needed),
        crate::hub::format_bytes(*available)
    )]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },

    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Self::Config {
            path: path.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn audio_device(device: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::AudioDevice {
            device: device.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn audio(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Self::Audio {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
