//! The cascade's LLM: a chat model that writes the reply the TTS speaks, streamed piece by
//! piece: a GGUF model run in process by llama.cpp ([`local::LocalLlm`]; Parley writes no
//! LLM runtime of its own), or any OpenAI-compatible chat endpoint that streams
//! ([`openai::OpenAiLlm`]). [`History`] keeps the persona and the last turns.

pub mod local;
pub mod openai;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use crate::{Error, Result};

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// How a reply is generated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplyOptions {
    /// A bound on the reply's tokens (short and speakable by default).
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f32,
    pub seed: u32,
}

impl Default for ReplyOptions {
    fn default() -> Self {
        Self {
            max_tokens: 160,
            temperature: 0.7,
            seed: 0,
        }
    }
}

/// A chat model that streams its reply.
pub trait ChatLlm: Send {
    /// Generates the reply to `messages`, giving each piece of text to `on_piece` as it
    /// comes (pieces are whole UTF-8, not whole words); `on_piece` returns false to stop
    /// (a barge-in). Returns the text generated.
    fn reply(
        &mut self,
        messages: &[ChatMessage],
        opts: &ReplyOptions,
        on_piece: &mut dyn FnMut(&str) -> bool,
    ) -> Result<String>;

    /// What runs, in words (for `session.created` and the logs).
    fn describe(&self) -> String;
}

/// The persona a reply is written for by default: short, speakable answers.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are Parley, a helpful voice assistant. Your \
replies are spoken aloud: answer in one to three short sentences of plain words, with no \
lists, markdown, emoji or code.";

/// The conversation: a system prompt and the last `max_turns` exchanges (oldest dropped
/// first, counted in `dropped`).
#[derive(Debug, Clone)]
pub struct History {
    pub system: String,
    turns: VecDeque<(String, String)>,
    pub max_turns: usize,
    pub dropped: usize,
}

impl History {
    pub fn new(system: impl Into<String>, max_turns: usize) -> Self {
        Self {
            system: system.into(),
            turns: VecDeque::new(),
            max_turns: max_turns.max(1),
            dropped: 0,
        }
    }

    /// The messages for a reply to `user`: the system prompt, the kept turns, `user`.
    pub fn messages_for(&self, user: &str) -> Vec<ChatMessage> {
        let mut m = vec![];
        if !self.system.trim().is_empty() {
            m.push(ChatMessage::new(Role::System, self.system.clone()));
        }
        for (u, a) in &self.turns {
            m.push(ChatMessage::new(Role::User, u.clone()));
            m.push(ChatMessage::new(Role::Assistant, a.clone()));
        }
        m.push(ChatMessage::new(Role::User, user));
        m
    }

    /// Records an exchange: what the user said and what the assistant actually said (after a
    /// barge-in, only the words that were spoken).
    pub fn push(&mut self, user: impl Into<String>, assistant: impl Into<String>) {
        self.turns.push_back((user.into(), assistant.into()));
        while self.turns.len() > self.max_turns {
            self.turns.pop_front();
            self.dropped += 1;
        }
    }

    pub fn turns(&self) -> impl Iterator<Item = (&str, &str)> {
        self.turns.iter().map(|(u, a)| (u.as_str(), a.as_str()))
    }

    pub fn clear(&mut self) {
        self.turns.clear();
    }
}

/// Where the cascade's LLM comes from, as `--llm` (and the window's setting) says it.
#[derive(Debug, Clone, PartialEq)]
pub enum LlmSource {
    /// A GGUF chat model file, run in process by llama.cpp.
    File(PathBuf),
    /// A registry preset of mode `llm` (`parley models pull NAME` downloads it).
    Preset(String),
    /// An OpenAI-compatible chat endpoint that streams; `timeout` bounds every wait for it.
    Endpoint {
        url: String,
        model: String,
        timeout: Duration,
    },
}

impl LlmSource {
    /// Reads `--llm`: a URL (`http://`, `https://`; then `model` names what it serves), the
    /// name of an `llm` preset, or a GGUF file's path. An existing file wins over a preset
    /// of the same name.
    pub fn parse(spec: &str, model: Option<&str>, timeout: Duration) -> Result<Self> {
        let spec = spec.trim();
        if spec.starts_with("http://") || spec.starts_with("https://") {
            let Some(model) = model.map(str::trim).filter(|m| !m.is_empty()) else {
                return Err(Error::InvalidInput(format!(
                    "LLM {spec} is a URL: say which model it serves (--llm-model)"
                )));
            };
            if !(0.1..=600.0).contains(&timeout.as_secs_f64()) {
                return Err(Error::InvalidInput(format!(
                    "LLM {spec}: a timeout of {:.1} s is outside 0.1..=600",
                    timeout.as_secs_f64()
                )));
            }
            return Ok(Self::Endpoint {
                url: spec.to_string(),
                model: model.to_string(),
                timeout,
            });
        }
        if spec.is_empty() {
            return Err(Error::InvalidInput(format!(
                "no LLM given: a GGUF chat model file, an LLM preset ({}) or an endpoint's URL was expected",
                llm_presets().join(", ")
            )));
        }
        let path = PathBuf::from(spec);
        if path.is_file() {
            return Ok(Self::File(path));
        }
        if llm_presets().contains(&spec) {
            return Ok(Self::Preset(spec.to_string()));
        }
        if spec.contains(['/', '\\']) || spec.ends_with(".gguf") {
            return Err(Error::InvalidInput(format!(
                "LLM {spec}: no such file (a GGUF chat model was expected)"
            )));
        }
        Err(Error::InvalidInput(format!(
            "LLM `{spec}` is neither a file, a URL nor an LLM preset ({})",
            llm_presets().join(", ")
        )))
    }

    /// The GGUF file a `File` or pulled `Preset` runs; `None` for an endpoint.
    pub fn gguf_path(&self) -> Result<Option<PathBuf>> {
        match self {
            Self::File(p) => Ok(Some(p.clone())),
            Self::Preset(name) => {
                let preset = crate::hub::preset(name)?;
                let Some(file) = preset.gguf_file() else {
                    return Err(Error::InvalidInput(format!(
                        "preset `{name}` is not an LLM preset"
                    )));
                };
                let dir = crate::hub::Hub::from_env()?
                    .local_dir(preset)
                    .map_err(|e| {
                        Error::InvalidInput(format!(
                            "LLM preset `{name}`: run `parley models pull {name}` first ({e})"
                        ))
                    })?;
                Ok(Some(dir.join(&file.name)))
            }
            Self::Endpoint { .. } => Ok(None),
        }
    }

    /// Loads the model (llama.cpp, its GPU backend when built with one) or connects the
    /// endpoint client.
    pub fn open(&self) -> Result<Box<dyn ChatLlm>> {
        if let Self::Endpoint {
            url,
            model,
            timeout,
        } = self
        {
            return Ok(Box::new(openai::OpenAiLlm::new(url, model, *timeout)?));
        }
        let path = self.gguf_path()?.unwrap_or_default();
        Ok(Box::new(local::LocalLlm::load(
            &path,
            local::LocalLlm::gpu_layers(),
        )?))
    }
}

/// The names of the registry's LLM presets.
pub fn llm_presets() -> Vec<&'static str> {
    crate::hub::presets()
        .iter()
        .filter(|p| p.mode == crate::hub::PresetMode::Llm && p.supported)
        .map(|p| p.name.as_str())
        .collect()
}

/// Where the test LLM (SmolLM2-135M-Instruct, Q4_1) is: `PARLEY_TEST_LLM`, or where
/// `scripts/setup.sh` puts it (`~/.cache/parley/llm/`, or under `$XDG_CACHE_HOME`).
pub fn test_llm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PARLEY_TEST_LLM") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("parley/llm/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// For tests: the test LLM's path, or None (saying so on stderr) where setup has not
/// fetched it. With `PARLEY_REQUIRE_LLM` set (CI) a missing model panics instead, so a
/// test cannot pass by skipping.
pub fn test_llm() -> Option<PathBuf> {
    let path = test_llm_path();
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("PARLEY_REQUIRE_LLM").is_none(),
        "{} is missing: run scripts/setup.sh",
        path.display()
    );
    eprintln!(
        "skipping: {} is missing (scripts/setup.sh fetches it)",
        path.display()
    );
    None
}

/// Cuts text streamed in pieces into what may be spoken: whole words only (a word is
/// complete once whitespace follows it), so the TTS never starts a word that is still
/// being written. `finish` gives the last word.
#[derive(Debug, Default, Clone)]
pub struct WordCutter {
    pending: String,
}

impl WordCutter {
    /// Appends `piece`; returns the text of the words it completed (with their spaces).
    pub fn push(&mut self, piece: &str) -> String {
        self.pending.push_str(piece);
        match self.pending.rfind(char::is_whitespace) {
            Some(i) => {
                let cut = i + self.pending[i..].chars().next().map_or(1, char::len_utf8);
                let done: String = self.pending[..cut].to_string();
                self.pending.drain(..cut);
                done
            }
            None => String::new(),
        }
    }

    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llm_sources_are_told_apart_and_bad_ones_named() {
        let t = Duration::from_secs(30);
        let url = LlmSource::parse("http://localhost:11434/v1", Some("qwen"), t).expect("url");
        assert!(matches!(url, LlmSource::Endpoint { ref model, .. } if model == "qwen"));
        let err = LlmSource::parse("https://x/v1", None, t).expect_err("no model");
        assert!(err.to_string().contains("--llm-model"), "{err}");
        let err = LlmSource::parse("http://x/v1", Some("m"), Duration::ZERO).expect_err("0 s");
        assert!(err.to_string().contains("timeout"), "{err}");
        let preset = llm_presets()[0];
        assert_eq!(
            LlmSource::parse(preset, None, t).expect("preset"),
            LlmSource::Preset(preset.to_string())
        );
        let file = std::env::temp_dir().join(format!("parley-llm-{}.gguf", std::process::id()));
        std::fs::write(&file, b"GGUF").expect("write");
        let spec = file.to_string_lossy().to_string();
        assert_eq!(
            LlmSource::parse(&spec, None, t).expect("file"),
            LlmSource::File(file.clone())
        );
        std::fs::remove_file(&file).ok();
        let err = LlmSource::parse(&spec, None, t).expect_err("gone");
        assert!(err.to_string().contains("no such file"), "{err}");
        let err = LlmSource::parse("gpt-9", None, t).expect_err("unknown");
        assert!(
            err.to_string().contains("gpt-9") && err.to_string().contains(preset),
            "{err}"
        );
        assert!(LlmSource::parse(" ", None, t).is_err());
    }

    #[test]
    fn history_keeps_the_last_turns_and_counts_the_dropped() {
        let mut h = History::new("be brief", 2);
        for i in 0..4 {
            h.push(format!("q{i}"), format!("a{i}"));
        }
        assert_eq!(h.dropped, 2);
        let m = h.messages_for("q4");
        let text: Vec<&str> = m.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(text, ["be brief", "q2", "a2", "q3", "a3", "q4"]);
        assert_eq!(m[0].role, Role::System);
        assert_eq!(m.last().map(|m| m.role), Some(Role::User));
    }

    #[test]
    fn words_are_given_only_once_complete() {
        let mut c = WordCutter::default();
        assert_eq!(c.push("The cap"), "The ");
        assert_eq!(c.push("ital"), "");
        assert_eq!(c.push(" of Fr"), "capital of ");
        assert_eq!(c.push("ance is Paris."), "France is ");
        assert_eq!(c.finish(), "Paris.");
        assert_eq!(c.push("é\u{a0}x"), "é\u{a0}");
    }
}
