//! The cascade's in-process LLM (llama.cpp through llama-cpp-2) on a real model:
//! SmolLM2-135M-Instruct (Q4_1 GGUF), which `scripts/setup.sh` fetches into
//! `~/.cache/parley/llm/`. Skips, saying why, where it is missing, unless
//! PARLEY_REQUIRE_LLM=1 (CI), where a missing model fails.

use parley_engine::llm::local::LocalLlm;
use parley_engine::llm::{test_llm, ChatLlm, ChatMessage, History, ReplyOptions, Role};

fn llm() -> Option<LocalLlm> {
    Some(LocalLlm::load(&test_llm()?, 0).expect("load"))
}

fn greedy() -> ReplyOptions {
    ReplyOptions {
        temperature: 0.0,
        max_tokens: 48,
        seed: 0,
    }
}

#[test]
fn the_real_model_answers_and_streams_what_it_returns() {
    let Some(mut m) = llm() else { return };
    let h = History::new("You are a helpful assistant.", 4);
    let msgs = h.messages_for("What is the capital of France?");
    // The model's own chat template (ChatML for SmolLM2).
    let prompt = m.prompt(&msgs).expect("prompt");
    assert!(prompt.contains("<|im_start|>user"), "{prompt}");
    assert!(
        prompt.trim_end().ends_with("<|im_start|>assistant"),
        "{prompt}"
    );
    let mut pieces = vec![];
    let text = m
        .reply(&msgs, &greedy(), &mut |p| {
            pieces.push(p.to_string());
            true
        })
        .expect("reply");
    assert!(text.contains("Paris"), "{text}");
    assert!(pieces.len() > 3, "{pieces:?}");
    assert_eq!(pieces.concat(), text);
    // Greedy is deterministic.
    let again = m.reply(&msgs, &greedy(), &mut |_| true).expect("reply");
    assert_eq!(again, text);
    assert!(m.describe().contains("SmolLM2"), "{}", m.describe());
}

#[test]
fn a_reply_stops_when_asked_and_bad_files_are_named() {
    let Some(mut m) = llm() else { return };
    let msgs = [ChatMessage::new(
        Role::User,
        "Tell me a long story about the sea.",
    )];
    let mut n = 0;
    let text = m
        .reply(&msgs, &greedy(), &mut |_| {
            n += 1;
            n < 3
        })
        .expect("reply");
    assert_eq!(n, 3, "pieces after the stop");
    assert!(!text.is_empty() && text.len() < 40, "{text}");
    // Not a GGUF file; no file at all.
    let dir = std::env::temp_dir().join(format!("parley-llm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let bad = dir.join("model.gguf");
    std::fs::write(&bad, b"not a model").expect("write");
    let err = LocalLlm::load(&bad, 0).expect_err("not gguf").to_string();
    assert!(err.contains("model.gguf") && err.contains("GGUF"), "{err}");
    let err = LocalLlm::load(&dir.join("none.gguf"), 0)
        .expect_err("missing")
        .to_string();
    assert!(err.contains("none.gguf"), "{err}");
}
