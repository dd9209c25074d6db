//! The cascade's flags, shared by `parley headless` and `parley bench latency`: the
//! speech model and its voice, the LLM and its persona.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use parley_engine::compute::gpu::DeviceChoice;
use parley_engine::compute::Dtype;
use parley_engine::llm::{History, LlmSource, ReplyOptions};
use parley_engine::pipeline::speak::SpeakModels;
use parley_engine::pipeline::{CascadeInbox, CascadeModels};

/// The text-to-speech model (the speak mode's, and the cascade's voice).
#[derive(Debug, Args)]
pub struct SpeechArgs {
    /// The text-to-speech model's directory (laid out like kyutai/tts-1.6b-en_fr).
    #[arg(long)]
    pub tts_model_dir: Option<PathBuf>,
    /// The TTS's voice: a file from kyutai/tts-voices or the name of a pulled one.
    #[arg(long)]
    pub voice: Option<String>,
    /// The TTS's guidance value ("1.0" to "4.0" by 0.5 for the published model).
    #[arg(long, default_value = "2.0")]
    pub cfg: String,
    /// Audio codebooks the TTS generates (all by default; 24 is faster).
    #[arg(long)]
    pub codebooks: Option<usize>,
    /// The TTS's temperature (0: greedy).
    #[arg(long, default_value_t = 0.6)]
    pub temp: f32,
}

/// The cascade's LLM and the conversation it keeps.
#[derive(Debug, Args)]
pub struct LlmArgs {
    /// The cascade's LLM: a GGUF chat model file or a pulled LLM preset (`parley models
    /// list`), run in process by llama.cpp, or the URL of an OpenAI-compatible chat
    /// endpoint that streams (`http://localhost:11434/v1`; with --llm-model; a key from
    /// PARLEY_LLM_API_KEY or OPENAI_API_KEY).
    #[arg(long)]
    pub llm: Option<String>,
    /// The model an --llm URL serves.
    #[arg(long)]
    pub llm_model: Option<String>,
    /// Seconds an --llm URL may keep the cascade waiting for its next bytes.
    #[arg(long, default_value_t = 30.0)]
    pub llm_timeout_s: f64,
    /// The cascade's persona (the LLM's system prompt).
    #[arg(long, default_value = parley_engine::llm::DEFAULT_SYSTEM_PROMPT)]
    pub system_prompt: String,
    /// The cascade's LLM temperature (0: greedy).
    #[arg(long, default_value_t = 0.7)]
    pub llm_temp: f32,
    /// Past exchanges the cascade's LLM sees (older ones are dropped first).
    #[arg(long, default_value_t = 8)]
    pub history_turns: usize,
}

impl LlmArgs {
    /// Opens the LLM the flags name.
    fn open(&self) -> Result<Box<dyn parley_engine::llm::ChatLlm>> {
        let Some(llm) = &self.llm else {
            bail!("--mode cascade needs --llm (a GGUF chat model file, an LLM preset, or an OpenAI-compatible endpoint's URL)");
        };
        if !(0.0..=10.0).contains(&self.llm_temp) {
            bail!("--llm-temp {} is outside 0..=10", self.llm_temp);
        }
        let timeout = Duration::try_from_secs_f64(self.llm_timeout_s).unwrap_or_default();
        Ok(LlmSource::parse(llm, self.llm_model.as_deref(), timeout)?.open()?)
    }

    /// The conversation and reply settings the flags give.
    fn conversation(&self) -> (History, ReplyOptions) {
        (
            History::new(self.system_prompt.clone(), self.history_turns),
            ReplyOptions {
                temperature: self.llm_temp,
                ..ReplyOptions::default()
            },
        )
    }
}

/// The cascade's LLM and TTS from the flags (the TTS from its directory).
pub fn cascade_models(
    speech: &SpeechArgs,
    llm: &LlmArgs,
    device: DeviceChoice,
    precision: Dtype,
) -> Result<(CascadeModels, CascadeInbox)> {
    let Some(tts_dir) = &speech.tts_model_dir else {
        bail!("--mode cascade needs --tts-model-dir (a directory like kyutai/tts-1.6b-en_fr)");
    };
    let Some(voice) = &speech.voice else {
        bail!("--mode cascade needs --voice (a file from kyutai/tts-voices, or a pulled voice's name)");
    };
    let chat = llm.open()?;
    let speak = SpeakModels::load(
        tts_dir,
        voice,
        &speech.cfg,
        device,
        precision,
        speech.codebooks,
    )?;
    with_speech(chat, speak, speech, llm)
}

/// The cascade from an open LLM and loaded speech, with the flags' settings.
pub fn with_speech(
    chat: Box<dyn parley_engine::llm::ChatLlm>,
    mut speak: SpeakModels,
    speech: &SpeechArgs,
    llm: &LlmArgs,
) -> Result<(CascadeModels, CascadeInbox)> {
    if !(0.0..=10.0).contains(&speech.temp) {
        bail!("--temp {} is outside 0..=10", speech.temp);
    }
    speak.opts.temp = speech.temp;
    let (history, reply) = llm.conversation();
    Ok(CascadeModels::new(chat, speak, history, reply))
}

/// The cascade for the latency harness: the TTS from --tts-model-dir, or the published
/// architecture `tts_preset` with random weights (speaking through `tts_tokenizer`).
pub fn harness_cascade(
    speech: &SpeechArgs,
    llm: &LlmArgs,
    tts_preset: Option<&str>,
    tts_tokenizer: Option<&std::path::Path>,
    device: DeviceChoice,
    precision: Dtype,
) -> Result<(CascadeModels, CascadeInbox)> {
    let Some(preset) = tts_preset else {
        return cascade_models(speech, llm, device, precision);
    };
    let Some(tokenizer) = tts_tokenizer else {
        bail!("--tts-preset needs --tts-tokenizer (a SentencePiece model, such as tests/fixtures/tts-tiny/tokenizer.model)");
    };
    let chat = llm.open()?;
    let speak = SpeakModels::random(preset, tokenizer, device, precision, speech.codebooks)?;
    with_speech(chat, speak, speech, llm)
}
