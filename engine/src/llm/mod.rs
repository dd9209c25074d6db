//! The cascade's LLM: a chat model that writes the reply the TTS speaks, streamed piece by
//! piece: a GGUF model run in process by llama.cpp ([`local::LocalLlm`]; Parley writes no
//! LLM runtime of its own), or any OpenAI-compatible chat endpoint that streams
//! ([`openai::OpenAiLlm`]). [`History`] keeps the persona and the last turns.

pub mod local;
pub mod openai;

use std::collections::VecDeque;
use std::path::PathBuf;

use crate::Result;

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
