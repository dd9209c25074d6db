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

    #[error("audio {path}: {reason}")]
    Audio { path: PathBuf, reason: String },

    #[error("{path}: {reason}")]
    Npy { path: PathBuf, reason: String },

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

    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
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
