//! The OpenAI-compatible endpoint against a fake streaming server (a socket in this test):
//! tokens that come slowly are streamed as they come; a 500, a dropped connection, a
//! garbage event and a server that is down are clear errors; a server that stalls past
//! the read timeout is an error, not a hang.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use parley_engine::llm::openai::OpenAiLlm;
use parley_engine::llm::{ChatLlm, ChatMessage, ReplyOptions, Role};

/// Serves one request: reads it (checking it asks for a stream of the model's chat), then
/// writes `parts` with `pause` between them and closes.
fn serve(parts: Vec<String>, pause: Duration) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/v1", l.local_addr().expect("addr"));
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut len = 0usize;
        let mut first = String::new();
        r.read_line(&mut first).expect("request line");
        assert!(first.starts_with("POST /v1/chat/completions"), "{first}");
        loop {
            let mut h = String::new();
            r.read_line(&mut h).expect("header");
            if h.trim().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().expect("length");
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).expect("body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json body");
        assert_eq!(v["stream"], true);
        assert_eq!(v["model"], "test-model");
        assert_eq!(v["messages"][0]["role"], "user");
        for p in parts {
            if s.write_all(p.as_bytes()).and_then(|()| s.flush()).is_err() {
                return;
            }
            std::thread::sleep(pause);
        }
    });
    url
}

fn sse_head() -> String {
    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n".into()
}

fn chunk(text: &str) -> String {
    format!(
        "data: {}\n\n",
        serde_json::json!({"choices": [{"delta": {"content": text}, "index": 0}]})
    )
}

fn ask(url: &str, timeout: Duration) -> (parley_engine::Result<String>, Vec<String>) {
    let mut llm = OpenAiLlm::new(url, "test-model", timeout).expect("llm");
    let mut pieces = vec![];
    let r = llm.reply(
        &[ChatMessage::new(
            Role::User,
            "What is the capital of France?",
        )],
        &ReplyOptions::default(),
        &mut |p| {
            pieces.push(p.to_string());
            true
        },
    );
    (r, pieces)
}

#[test]
fn slow_tokens_stream_as_they_come() {
    let mut parts = vec![sse_head()];
    // A role-only chunk first, as servers send; an event split across writes.
    parts.push("data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n".into());
    for w in ["The", " capital", " is", " Paris."] {
        let c = chunk(w);
        let (a, b) = c.split_at(c.len() / 2);
        parts.push(a.into());
        parts.push(b.into());
    }
    parts.push("data: [DONE]\n\n".into());
    let url = serve(parts, Duration::from_millis(40));
    let t = Instant::now();
    let (r, pieces) = ask(&url, Duration::from_secs(5));
    assert_eq!(r.expect("reply"), "The capital is Paris.");
    assert_eq!(pieces, ["The", " capital", " is", " Paris."]);
    assert!(t.elapsed() >= Duration::from_millis(300), "not streamed");
}

#[test]
fn failures_are_clear_errors() {
    // A 500 with its body.
    let url = serve(
        vec!["HTTP/1.1 500 Internal Server Error\r\nContent-Length: 11\r\nConnection: close\r\n\r\nmodel crash".into()],
        Duration::ZERO,
    );
    let e = ask(&url, Duration::from_secs(5))
        .0
        .expect_err("500")
        .to_string();
    assert!(
        e.contains("500") && e.contains("model crash") && e.contains(&url),
        "{e}"
    );
    // A connection dropped mid-reply: the pieces so far came, then the error.
    let url = serve(
        vec![sse_head(), chunk("The"), chunk(" capital")],
        Duration::ZERO,
    );
    let (r, pieces) = ask(&url, Duration::from_secs(5));
    let e = r.expect_err("dropped").to_string();
    assert!(e.contains("ended before the reply"), "{e}");
    assert_eq!(pieces, ["The", " capital"]);
    // A garbage event.
    let url = serve(
        vec![sse_head(), "data: {not json\n\n".into()],
        Duration::ZERO,
    );
    let e = ask(&url, Duration::from_secs(5))
        .0
        .expect_err("garbage")
        .to_string();
    assert!(e.contains("not a chat completion chunk"), "{e}");
    // A server that accepts and then says nothing: the read timeout, not a hang.
    let url = serve(vec![sse_head()], Duration::from_secs(5));
    let t = Instant::now();
    let e = ask(&url, Duration::from_millis(500))
        .0
        .expect_err("stall")
        .to_string();
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(e.contains(&url), "{e}");
    // Nobody listening.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/v1", l.local_addr().expect("addr"));
    drop(l);
    let e = ask(&url, Duration::from_secs(1))
        .0
        .expect_err("down")
        .to_string();
    assert!(e.contains("not reachable"), "{e}");
    // Bad settings.
    assert!(OpenAiLlm::new("localhost:8080", "m", Duration::from_secs(1)).is_err());
    assert!(OpenAiLlm::new("http://localhost:8080/v1", " ", Duration::from_secs(1)).is_err());
}
