//! Any OpenAI-compatible chat endpoint that streams (Ollama, llama.cpp's server, vLLM, LM
//! Studio): `POST {base}/chat/completions` with `"stream": true`, the reply read as
//! server-sent events (parsed by the `eventsource-stream` crate) as it comes. Blocking
//! (`ureq`, with connect and read timeouts), on the cascade's LLM thread.

use std::io::Read;
use std::task::{Context, Poll};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::{ChatLlm, ChatMessage, ReplyOptions};
use crate::{Error, Result};

/// The environment variables a key is read from, in order.
pub const KEY_VARS: [&str; 2] = ["PARLEY_LLM_API_KEY", "OPENAI_API_KEY"];

pub struct OpenAiLlm {
    /// The API's base, e.g. `http://localhost:11434/v1`.
    base: String,
    model: String,
    key: Option<String>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for OpenAiLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpenAiLlm({} {})", self.base, self.model)
    }
}

fn llm_error(base: &str, what: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("LLM server {base}: {what}"))
}

impl OpenAiLlm {
    /// An endpoint at `base` (`http://` or `https://`, up to `/v1`), model `model`, the key
    /// from [`KEY_VARS`] if set; `read_timeout` bounds every wait for the server (the
    /// first token included).
    pub fn new(base: &str, model: &str, read_timeout: Duration) -> Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(llm_error(
                &base,
                "the URL must start with http:// or https://",
            ));
        }
        if model.trim().is_empty() {
            return Err(llm_error(&base, "no model name (--llm-model)"));
        }
        let key = KEY_VARS
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|k| !k.is_empty()));
        Ok(Self {
            base,
            model: model.to_string(),
            key,
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(5))
                .timeout_read(read_timeout)
                .timeout_write(read_timeout)
                .build(),
        })
    }
}

impl ChatLlm for OpenAiLlm {
    fn describe(&self) -> String {
        format!("{} at {}", self.model, self.base)
    }

    fn reply(
        &mut self,
        messages: &[ChatMessage],
        opts: &ReplyOptions,
        on_piece: &mut dyn FnMut(&str) -> bool,
    ) -> Result<String> {
        let base = self.base.clone();
        let err = |what: String| llm_error(&base, what);
        let body = json!({
            "model": self.model,
            "messages": messages.iter().map(|m| json!({"role": m.role.as_str(), "content": m.content})).collect::<Vec<_>>(),
            "stream": true,
            "max_tokens": opts.max_tokens,
            "temperature": opts.temperature,
            "seed": opts.seed,
        });
        let mut req = self
            .agent
            .post(&format!("{}/chat/completions", self.base))
            .set("Accept", "text/event-stream");
        if let Some(k) = &self.key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let resp = match req.send_json(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let mut text = String::new();
                let _ = r.into_reader().take(300).read_to_string(&mut text);
                return Err(err(format!("HTTP {code}: {}", text.trim())));
            }
            Err(e) => return Err(err(format!("not reachable: {e}"))),
        };
        // The body as a stream of chunks (each read blocks until bytes come or the read
        // timeout passes), parsed into events by the crate; polled to completion here.
        let mut reader = resp.into_reader();
        let chunks = futures_util::stream::iter(std::iter::from_fn(move || {
            let mut buf = vec![0u8; 4096];
            match reader.read(&mut buf) {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some(Ok::<Vec<u8>, std::io::Error>(buf))
                }
                Err(e) => Some(Err(e)),
            }
        }));
        let mut events = chunks.eventsource();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut text = String::new();
        loop {
            let event = match events.poll_next_unpin(&mut cx) {
                Poll::Ready(Some(Ok(e))) => e,
                Poll::Ready(Some(Err(e))) => {
                    return Err(err(format!(
                        "the stream broke after {} bytes of reply: {e}",
                        text.len()
                    )))
                }
                Poll::Ready(None) => {
                    return Err(err(format!(
                        "the connection ended before the reply did (no [DONE]) after {} bytes",
                        text.len()
                    )))
                }
                // The source is a blocking iterator: it is always ready.
                Poll::Pending => return Err(err("the event stream stalled".into())),
            };
            if event.data.trim() == "[DONE]" {
                return Ok(text);
            }
            let v: Value = serde_json::from_str(&event.data).map_err(|e| {
                err(format!(
                    "an event that is not a chat completion chunk ({e}): {:.120}",
                    event.data
                ))
            })?;
            if let Some(m) = v["error"]["message"].as_str() {
                return Err(err(format!("the server says: {m}")));
            }
            let choice = &v["choices"][0];
            // A chunk may carry no content (the role, or the finish reason before [DONE]).
            if let Some(piece) = choice["delta"]["content"].as_str() {
                if !piece.is_empty() {
                    text.push_str(piece);
                    if !on_piece(piece) {
                        return Ok(text);
                    }
                }
            }
        }
    }
}
