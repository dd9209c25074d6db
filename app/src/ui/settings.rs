//! What the window remembers between runs (eframe storage).

use serde::{Deserialize, Serialize};

use parley_engine::audio::echo::AecMode;
use parley_engine::pipeline::Mode;

/// Where the audio comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Input {
    /// A capture device by name; None: the default.
    Device(Option<String>),
    /// The virtual device: a recording played at real-time pace (or as fast as the models
    /// go, for tests).
    File { path: String, realtime: bool },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub mode: Mode,
    /// Model directories for each mode (laid out like the Hub repository).
    pub duplex_model_dir: String,
    pub listen_model_dir: String,
    /// The text-to-speech model's directory and its voice (a `tts-voices` name or a file).
    pub tts_model_dir: String,
    pub tts_voice: String,
    /// The cascade's LLM: a GGUF chat model file, an LLM preset's name (`llm-qwen2.5-1.5b`)
    /// or an OpenAI-compatible endpoint's URL.
    pub llm: String,
    /// The model an endpoint URL serves (`--llm-model`).
    pub llm_model: String,
    /// The cascade's persona: the LLM's system prompt.
    pub persona: String,
    /// auto, gpu or cpu.
    pub device: String,
    /// auto, f32, f16, bf16, q8_0, q6 or q5 (CPU), or q4.
    pub precision: String,
    pub input: Input,
    /// Playback device by name; None: the default.
    pub output_device: Option<String>,
    /// Play the model's voice (duplex); off: the reply is computed but not played.
    pub play_output: bool,
    /// Echo cancellation on the microphone while Parley plays (auto: on unless the output
    /// device's name says headset or headphones).
    pub echo_cancellation: AecMode,
    pub muted: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            mode: Mode::Duplex,
            duplex_model_dir: String::new(),
            listen_model_dir: String::new(),
            tts_model_dir: String::new(),
            tts_voice: String::new(),
            llm: String::new(),
            llm_model: String::new(),
            persona: parley_engine::llm::DEFAULT_SYSTEM_PROMPT.into(),
            device: "auto".into(),
            precision: "auto".into(),
            input: Input::Device(None),
            output_device: None,
            play_output: true,
            echo_cancellation: AecMode::Auto,
            muted: false,
        }
    }
}

impl Settings {
    pub const KEY: &'static str = "parley.settings";

    pub fn model_dir(&self) -> &str {
        match self.mode {
            Mode::Duplex => &self.duplex_model_dir,
            Mode::Listen | Mode::Cascade => &self.listen_model_dir,
        }
    }
}
