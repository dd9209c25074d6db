//! A GGUF chat model run in process by llama.cpp (the `llama-cpp-2` crate): the chat
//! template stored in the model, greedy or sampled generation, pieces streamed as they are
//! decoded. CPU by default; llama.cpp's GPU backends are cargo features of the app.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;

use super::{ChatLlm, ChatMessage, ReplyOptions};
use crate::{Error, Result};

/// The tokens a context holds (prompt and reply); the model's own limit if lower.
const CONTEXT_TOKENS: u32 = 4096;
/// Prompt tokens decoded per batch.
const BATCH_TOKENS: usize = 512;

/// llama.cpp's process-wide backend: initialised once (it may only be), its logs silenced
/// (they would interleave with Parley's output; errors come back as values).
fn backend() -> Result<&'static LlamaBackend> {
    static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let mut b = LlamaBackend::init().map_err(|e| e.to_string())?;
            b.void_logs();
            Ok(b)
        })
        .as_ref()
        .map_err(|e| Error::InvalidInput(format!("starting llama.cpp: {e}")))
}

fn llm_error(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("LLM {}: {what}", path.display()))
}

pub struct LocalLlm {
    path: PathBuf,
    model: LlamaModel,
    template: LlamaChatTemplate,
    threads: i32,
}

impl std::fmt::Debug for LocalLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalLlm({})", self.path.display())
    }
}

impl LocalLlm {
    /// Loads a GGUF chat model (its layers on a llama.cpp GPU backend when one was built
    /// in and `gpu_layers` asks for them).
    pub fn load(path: &Path, gpu_layers: u32) -> Result<Self> {
        if !path.is_file() {
            return Err(llm_error(
                path,
                "no such file (a GGUF chat model was expected)",
            ));
        }
        let mut head = [0u8; 4];
        std::io::Read::read_exact(
            &mut std::fs::File::open(path).map_err(|e| llm_error(path, e))?,
            &mut head,
        )
        .map_err(|e| llm_error(path, e))?;
        if &head != b"GGUF" {
            return Err(llm_error(
                path,
                "not a GGUF file (it does not start with `GGUF`)",
            ));
        }
        let backend = backend()?;
        let params = LlamaModelParams::default().with_n_gpu_layers(gpu_layers);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| llm_error(path, format!("llama.cpp could not load it: {e}")))?;
        let template = model.chat_template(None).map_err(|e| {
            llm_error(
                path,
                format!("no chat template in the model ({e}): not a chat model?"),
            )
        })?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
        Ok(Self {
            path: path.to_path_buf(),
            model,
            template,
            threads,
        })
    }

    /// Layers to offload: all of them where llama.cpp was built with a GPU backend (the
    /// `llm-vulkan` / `llm-metal` features) and one is present, else none.
    pub fn gpu_layers() -> u32 {
        match backend() {
            Ok(b) if b.supports_gpu_offload() => 999,
            _ => 0,
        }
    }

    /// The prompt the chat template makes of `messages`, ending with the assistant's turn.
    pub fn prompt(&self, messages: &[ChatMessage]) -> Result<String> {
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.as_str().into(), m.content.clone()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| llm_error(&self.path, format!("a message holds a NUL byte: {e}")))?;
        self.model
            .apply_chat_template(&self.template, &chat, true)
            .map_err(|e| llm_error(&self.path, format!("applying its chat template: {e}")))
    }
}

impl ChatLlm for LocalLlm {
    fn describe(&self) -> String {
        format!(
            "{} ({} parameters, llama.cpp on {} thread(s))",
            self.path.file_name().map_or_else(
                || self.path.display().to_string(),
                |n| n.to_string_lossy().into_owned()
            ),
            self.model.n_params(),
            self.threads
        )
    }

    fn reply(
        &mut self,
        messages: &[ChatMessage],
        opts: &ReplyOptions,
        on_piece: &mut dyn FnMut(&str) -> bool,
    ) -> Result<String> {
        let err = |what: String| llm_error(&self.path, what);
        let prompt = self.prompt(messages)?;
        let vocab = self.model.vocab();
        let tokens = vocab.tokenize(prompt.as_bytes(), vocab.should_add_bos(), true);
        let n_ctx = CONTEXT_TOKENS.min(self.model.n_ctx_train().max(64));
        if tokens.len() + opts.max_tokens > n_ctx as usize {
            return Err(err(format!(
                "a prompt of {} tokens and a reply of up to {} exceed its context of {n_ctx}",
                tokens.len(),
                opts.max_tokens
            )));
        }
        // A context per reply: the prompt is decoded again each turn (cheap for the short
        // histories of a spoken conversation).
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(BATCH_TOKENS as u32)
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads);
        let mut ctx = self
            .model
            .new_context(backend()?, params)
            .map_err(|e| err(format!("making a context: {e}")))?;
        let mut batch = LlamaBatch::new(BATCH_TOKENS, 1);
        for (c, chunk) in tokens.chunks(BATCH_TOKENS).enumerate() {
            batch.clear();
            let last_chunk = (c + 1) * BATCH_TOKENS >= tokens.len();
            for (i, &t) in chunk.iter().enumerate() {
                let pos = (c * BATCH_TOKENS + i) as i32;
                batch
                    .add(t, pos, &[0], last_chunk && i + 1 == chunk.len())
                    .map_err(|e| err(format!("batching the prompt: {e}")))?;
            }
            ctx.decode(&mut batch)
                .map_err(|e| err(format!("decoding the prompt: {e}")))?;
        }
        let mut sampler = if opts.temperature <= 0.0 {
            LlamaSampler::greedy()
        } else {
            LlamaSampler::chain_simple([
                LlamaSampler::top_k(40),
                LlamaSampler::top_p(0.95, 1),
                LlamaSampler::temp(opts.temperature),
                LlamaSampler::dist(opts.seed),
            ])
        };
        let mut text = String::new();
        // Bytes of a UTF-8 character split across tokens.
        let mut carry: Vec<u8> = vec![];
        for pos in (tokens.len() as i32..).take(opts.max_tokens) {
            let token = sampler.sample(&ctx, batch.n_tokens() - 1);
            sampler.accept(token);
            if vocab.is_eog(token) {
                break;
            }
            carry.extend(vocab.token_to_piece(token, false, None));
            let valid = match std::str::from_utf8(&carry) {
                Ok(s) => s.len(),
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                // Not UTF-8 at all: replaced, never stuck.
                Err(_) => {
                    let s = String::from_utf8_lossy(&carry).into_owned();
                    carry = s.into_bytes();
                    carry.len()
                }
            };
            let piece: String = String::from_utf8_lossy(&carry[..valid]).into_owned();
            carry.drain(..valid);
            if !piece.is_empty() {
                text.push_str(&piece);
                if !on_piece(&piece) {
                    return Ok(text);
                }
            }
            batch.clear();
            batch
                .add(token, pos, &[0], true)
                .map_err(|e| err(format!("batching a token: {e}")))?;
            ctx.decode(&mut batch)
                .map_err(|e| err(format!("decoding: {e}")))?;
        }
        Ok(text)
    }
}
