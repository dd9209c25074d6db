//! The `parley` binary end to end: real processes, real files, exit codes and messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn parley(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(args)
        .output()
        .expect("run parley")
}

/// Runs parley and requires success, showing its stderr otherwise.
fn parley_ok(args: &[&str]) -> Output {
    let out = parley(args);
    assert!(
        out.status.success(),
        "parley {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mimi-tiny")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("parley-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    dir.join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Fails unless the command failed cleanly: non-zero exit, no panic, and a message that
/// names `culprit`.
fn assert_clean_failure(out: &Output, culprit: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert!(
        stderr.contains(culprit),
        "message should name {culprit}: {stderr}"
    );
}

#[test]
fn model_dir_encode_matches_reference_and_decodes() {
    let codes = tmp("tiny_codes.npy");
    let wav = tmp("tiny_out.wav");
    let dir = fixtures();
    parley_ok(&[
        "mimi",
        "encode",
        s(&dir.join("input.wav")),
        "--model-dir",
        s(&dir),
        "--out",
        s(&codes),
    ]);
    let got = candle_core::Tensor::read_npy(&codes).expect("npy");
    let want = candle_core::Tensor::read_npy(dir.join("ref_codes_offline.npy")).expect("npy");
    // The reference ran on whole frames; the CLI pads the last partial frame with silence.
    let (got, want) = (
        got.to_vec2::<i64>().expect("i64"),
        want.to_vec2::<i64>().expect("i64"),
    );
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.len(), w.len() + 1);
        assert_eq!(g[..w.len()], w[..]);
    }

    parley_ok(&[
        "mimi",
        "decode",
        s(&codes),
        "--model-dir",
        s(&dir),
        "--out",
        s(&wav),
    ]);
    let reader = hound::WavReader::open(&wav).expect("wav");
    assert_eq!(reader.spec().sample_rate, 24_000);
    assert_eq!(reader.len() as usize, got[0].len() * 1920);
}

#[test]
fn full_size_random_mimi_round_trips_a_recording() {
    let weights = tmp("mimi_full_bf16.safetensors");
    let codes = tmp("full_codes.npy");
    let wav = tmp("full_out.wav");
    parley_ok(&["mimi", "random-weights", "--out", s(&weights)]);
    // A 44.1 kHz stereo recording: exercises the downmix and the resampler too.
    let input = tmp("stereo44k.wav");
    let spec = hound::WavSpec {
        channels: 2,
        sample_rate: 44_100,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&input, spec).expect("wav");
    for i in 0..(44_100 * 2) {
        let v = ((i as f32 * 0.05).sin() * 6000.0) as i16;
        w.write_sample(v).expect("l");
        w.write_sample(-v).expect("r");
    }
    w.finalize().expect("finalize");

    parley_ok(&[
        "mimi",
        "encode",
        s(&input),
        "--weights",
        s(&weights),
        "--codebooks",
        "32",
        "--out",
        s(&codes),
    ]);
    let t = candle_core::Tensor::read_npy(&codes).expect("npy");
    assert_eq!(t.dims(), [32, 25], "2 s at 12.5 Hz, 32 codebooks");
    parley_ok(&[
        "mimi",
        "decode",
        s(&codes),
        "--weights",
        s(&weights),
        "--out",
        s(&wav),
    ]);
    let samples: Vec<f32> = hound::WavReader::open(&wav)
        .expect("wav")
        .into_samples::<f32>()
        .collect::<Result<_, _>>()
        .expect("samples");
    assert_eq!(samples.len(), 25 * 1920);
    assert!(samples.iter().all(|x| x.is_finite()));
    assert!(samples.iter().any(|&x| x != 0.0));
    let _ = std::fs::remove_file(&weights);
}

#[test]
fn bad_inputs_fail_cleanly_and_say_what_is_wrong() {
    let dir = fixtures();
    let codes = tmp("bad_codes.npy");

    let corrupt = tmp("corrupt.wav");
    std::fs::write(
        &corrupt,
        b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00garbage",
    )
    .expect("write");
    let out = parley(&[
        "mimi",
        "encode",
        s(&corrupt),
        "--model-dir",
        s(&dir),
        "--out",
        s(&codes),
    ]);
    assert_clean_failure(&out, "corrupt.wav");

    let truncated = tmp("truncated.safetensors");
    let bytes = std::fs::read(dir.join("mimi.safetensors")).expect("read");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let out = parley(&[
        "mimi",
        "encode",
        s(&dir.join("input.wav")),
        "--weights",
        s(&truncated),
        "--config",
        s(&dir.join("mimi_config.json")),
        "--out",
        s(&codes),
    ]);
    assert_clean_failure(&out, "truncated.safetensors");

    // The tiny checkpoint with the published config: a tensor and both shapes are named.
    let out = parley(&[
        "mimi",
        "encode",
        s(&dir.join("input.wav")),
        "--weights",
        s(&dir.join("mimi.safetensors")),
        "--out",
        s(&codes),
    ]);
    assert_clean_failure(&out, "the config expects");

    let bad_cfg = tmp("bad_config.json");
    std::fs::write(&bad_cfg, r#"{"sample_rate": 24000, "channels": 1}"#).expect("write");
    let out = parley(&[
        "mimi",
        "encode",
        s(&dir.join("input.wav")),
        "--weights",
        s(&dir.join("mimi.safetensors")),
        "--config",
        s(&bad_cfg),
        "--out",
        s(&codes),
    ]);
    assert_clean_failure(&out, "bad_config.json");

    let garbage = tmp("garbage.npy");
    std::fs::write(&garbage, b"not an npy file at all").expect("write");
    let out = parley(&[
        "mimi",
        "decode",
        s(&garbage),
        "--model-dir",
        s(&dir),
        "--out",
        s(&tmp("x.wav")),
    ]);
    assert_clean_failure(&out, "garbage.npy");

    let out = parley(&[
        "mimi",
        "encode",
        s(&dir.join("input.wav")),
        "--out",
        s(&codes),
    ]);
    assert_clean_failure(&out, "--model-dir");
}

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

#[test]
fn stt_transcribes_a_recording_with_word_times() {
    let dir = fixture_dir("stt-tiny");
    let input = fixtures().join("input.wav");
    let tokens = tmp("stt_tokens.npy");
    let out = parley_ok(&[
        "stt",
        s(&input),
        "--model-dir",
        s(&dir),
        "--json",
        "--vad",
        "--dump-tokens",
        s(&tokens),
    ]);
    // 1 s of silence prefix (13 frames), 59 frames of audio, 0.5 s of delay flush (7).
    let t = candle_core::Tensor::read_npy(&tokens).expect("npy");
    assert_eq!(t.dims(), [13 + 59 + 7]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut words = 0;
    for line in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("one JSON object per line");
        if v["type"] == "word" {
            let (a, b) = (
                v["start"].as_f64().expect("start"),
                v["end"].as_f64().expect("end"),
            );
            assert!(0.0 <= a && a <= b && b <= 4.7, "{line}");
            assert!(!v["text"].as_str().expect("text").trim().is_empty());
            words += 1;
        }
    }
    assert!(words > 0, "no words in {stdout}");
}

#[test]
fn moshi_replies_with_audio_and_tokens() {
    let dir = fixture_dir("moshi-tiny");
    let input = fixtures().join("input.wav");
    let (wav, tokens, tokens2) = (
        tmp("reply.wav"),
        tmp("moshi_tokens.npy"),
        tmp("moshi_tokens2.npy"),
    );
    for t in [&tokens, &tokens2] {
        parley_ok(&[
            "moshi",
            s(&input),
            "--model-dir",
            s(&dir),
            "--out",
            s(&wav),
            "--dump-tokens",
            s(t),
            "--temp",
            "0.8",
            "--temp-text",
            "0.7",
            "--seed",
            "5",
        ]);
    }
    let a = candle_core::Tensor::read_npy(&tokens).expect("npy");
    // 59 frames, the first max(delays) = 1 held back: [1 + dep_q, 58].
    assert_eq!(a.dims(), [9, 58]);
    let b = candle_core::Tensor::read_npy(&tokens2).expect("npy");
    assert_eq!(
        a.to_vec2::<i64>().expect("a"),
        b.to_vec2::<i64>().expect("b"),
        "same seed, same reply"
    );
    let reader = hound::WavReader::open(&wav).expect("wav");
    assert_eq!(reader.len(), 59 * 1920);
}

#[test]
fn lm_commands_reject_bad_model_directories() {
    let input = fixtures().join("input.wav");
    // A codec-only directory: its config.json describes no language model.
    let out = parley(&["stt", s(&input), "--model-dir", s(&fixtures())]);
    assert_clean_failure(&out, "num_layers is 0 or missing");
    let broken = tmp("broken-model");
    std::fs::create_dir_all(&broken).expect("dir");
    for f in [
        "mimi.safetensors",
        "mimi_config.json",
        "tokenizer.model",
        "model.safetensors",
    ] {
        std::fs::copy(fixture_dir("stt-tiny").join(f), broken.join(f)).expect("copy");
    }
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("stt-tiny").join("config.json")).expect("config"),
    )
    .expect("json");
    cfg["num_layers"] = serde_json::json!(3);
    std::fs::write(broken.join("config.json"), cfg.to_string()).expect("write");
    let out = parley(&["stt", s(&input), "--model-dir", s(&broken)]);
    assert_clean_failure(&out, "transformer.layers.2");
    let out = parley(&[
        "moshi",
        s(&input),
        "--model-dir",
        s(&fixture_dir("stt-tiny")),
        "--out",
        s(&tmp("x.wav")),
    ]);
    assert_clean_failure(&out, "parley stt");
}

/// `--device gpu` runs the LM on wgpu (lavapipe in CI): the same transcript and tokens as
/// `--device cpu` with f32 weights; greedy Moshi replies are identical too (Mimi on the GPU,
/// its audio within 1e-4 of the CPU codec's). Skips, saying why, where no GPU adapter exists.
#[test]
fn gpu_device_gives_the_cpu_transcript_and_reply() {
    let input = fixtures().join("input.wav");
    let stt = fixture_dir("stt-tiny");
    let run = |device: &str, tokens: &Path| {
        parley(&[
            "stt",
            s(&input),
            "--model-dir",
            s(&stt),
            "--json",
            "--vad",
            "--device",
            device,
            "--precision",
            "f32",
            "--dump-tokens",
            s(tokens),
        ])
    };
    let (tc, tg) = (tmp("stt_cpu.npy"), tmp("stt_gpu.npy"));
    let gpu = run("gpu", &tg);
    let stderr = String::from_utf8_lossy(&gpu.stderr);
    if !gpu.status.success() && stderr.contains("no GPU") {
        eprintln!("skipping: {stderr}");
        return;
    }
    assert!(gpu.status.success(), "{stderr}");
    assert!(stderr.contains("device: GPU"), "no adapter line: {stderr}");
    let cpu = run("cpu", &tc);
    assert!(cpu.status.success());
    assert_eq!(
        String::from_utf8_lossy(&cpu.stdout),
        String::from_utf8_lossy(&gpu.stdout)
    );
    let read = |p: &Path| {
        candle_core::Tensor::read_npy(p)
            .expect("npy")
            .to_vec1::<i64>()
            .expect("tokens")
    };
    assert_eq!(read(&tc), read(&tg));

    let moshi = fixture_dir("moshi-tiny");
    let reply = |device: &str, tokens: &Path| {
        let out = parley_ok(&[
            "moshi",
            s(&input),
            "--model-dir",
            s(&moshi),
            "--out",
            s(&tmp(&format!("reply_{device}.wav"))),
            "--dump-tokens",
            s(tokens),
            "--temp",
            "0",
            "--temp-text",
            "0",
            "--device",
            device,
            "--precision",
            "f32",
        ]);
        let wav = tmp(&format!("reply_{device}.wav"));
        (
            candle_core::Tensor::read_npy(tokens)
                .expect("npy")
                .to_vec2::<i64>()
                .expect("tokens"),
            String::from_utf8_lossy(&out.stderr).to_string(),
            parley_engine::audio::file::read_audio_24k(&wav).expect("reply"),
        )
    };
    let (cpu_tokens, _, cpu_wav) = reply("cpu", &tmp("m_cpu.npy"));
    let (gpu_tokens, gpu_log, gpu_wav) = reply("gpu", &tmp("m_gpu.npy"));
    assert_eq!(cpu_tokens, gpu_tokens);
    // Mimi ran on the GPU too, and decoded what the CPU's does.
    assert!(gpu_log.contains("Mimi on the GPU"), "{gpu_log}");
    assert_eq!(cpu_wav.len(), gpu_wav.len());
    let e = cpu_wav
        .iter()
        .zip(&gpu_wav)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(e < 1e-4, "the replies differ by {e}");
    // PARLEY_MIMI=cpu keeps the codec on the CPU beside the GPU's LM, and says so.
    let out = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args([
            "moshi",
            s(&input),
            "--model-dir",
            s(&moshi),
            "--out",
            s(&tmp("reply_gpu_cpu_mimi.wav")),
            "--temp",
            "0",
            "--temp-text",
            "0",
            "--device",
            "gpu",
            "--precision",
            "f32",
        ])
        .env("PARLEY_MIMI", "cpu")
        .output()
        .expect("run");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("Mimi on the CPU (PARLEY_MIMI=cpu)"), "{log}");
}

/// The latency harness streams the generated dialogue through the pipeline on the
/// virtual device in both modes and writes its report and plot.
#[test]
fn latency_harness_reports_and_plots_both_modes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let wav = root.join("assets/speech/dialogue.wav");
    let align = root.join("assets/speech/dialogue.json");
    for (mode, model) in [("listen", "stt-tiny"), ("duplex", "moshi-tiny")] {
        let (report, plot) = (
            tmp(&format!("lat_{mode}.json")),
            tmp(&format!("lat_{mode}.png")),
        );
        let out = parley_ok(&[
            "bench",
            "latency",
            s(&wav),
            "--model-dir",
            s(&fixture_dir(model)),
            "--mode",
            mode,
            "--alignment",
            s(&align),
            "--pace",
            "fast",
            "--device",
            "cpu",
            "--report",
            s(&report),
            "--plot",
            s(&plot),
        ]);
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(
            table.contains("LM step") && table.contains("real-time factor"),
            "{table}"
        );
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
        // 11.16 s of input is 140 frames; the flush adds the model's delays.
        let frames = r["compute"]["frames"].as_u64().expect("frames");
        assert!(frames >= 140, "{frames} frames");
        let stages = r["compute"]["stages"].as_array().expect("stages");
        let lm = if mode == "duplex" { "lm" } else { "stt" };
        let mut checked = 0;
        for st in stages {
            let (k, p) = (&st["stage"], &st["ms"]);
            assert!(p["max"].as_f64() >= p["p99"].as_f64(), "{k}: {p}");
            if *k == "encode" || *k == lm {
                assert!(p["p50"].as_f64().expect("p50") > 0.0, "{k}: {p}");
                checked += 1;
            }
        }
        assert_eq!(checked, 2, "encode and {lm} among {stages:?}");
        assert!(r["compute"]["total_ms"]["p50"].as_f64().expect("total") > 0.0);
        assert_eq!(r["turns_from"], "alignment");
        if mode == "duplex" {
            assert_eq!(r["response"].as_array().expect("response").len(), 2);
        } else {
            assert_eq!(r["end_of_turn"].as_array().expect("eot").len(), 2);
        }
        let png = std::fs::read(&plot).expect("plot");
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 20_000,
            "plot of {} bytes",
            png.len()
        );
    }
}

/// `--echo-room-ms`: the duplex fixture's voice comes back into its input through a
/// simulated room; the report gives echo cancellation's CPU per frame, absent with
/// `--aec off`; a room in listen mode (nothing played) or of a negative delay is refused.
#[test]
fn latency_harness_runs_a_room_with_echo_cancellation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let wav = root.join("assets/speech/dialogue.wav");
    for aec in ["on", "off"] {
        let report = tmp(&format!("lat_room_{aec}.json"));
        let out = parley_ok(&[
            "bench",
            "latency",
            s(&wav),
            "--model-dir",
            s(&fixture_dir("moshi-tiny")),
            "--mode",
            "duplex",
            "--pace",
            "fast",
            "--device",
            "cpu",
            "--echo-room-ms",
            "120",
            "--aec",
            aec,
            "--report",
            s(&report),
        ]);
        let table = String::from_utf8_lossy(&out.stdout);
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
        let aec_ms = &r["echo_cancellation_ms"];
        if aec == "on" {
            assert!(table.contains("echo cancellation (ms per frame"), "{table}");
            assert!(
                aec_ms["p50"].as_f64().is_some_and(|ms| ms > 0.0),
                "{aec_ms}"
            );
        } else {
            assert!(aec_ms.is_null(), "{aec_ms}");
        }
    }
    for (mode, model, ms) in [
        ("listen", "stt-tiny", "120"),
        ("duplex", "moshi-tiny", "2000"),
    ] {
        let out = parley(&[
            "bench",
            "latency",
            s(&wav),
            "--model-dir",
            s(&fixture_dir(model)),
            "--mode",
            mode,
            "--device",
            "cpu",
            "--echo-room-ms",
            ms,
            "--report",
            s(&tmp("lat_room_bad.json")),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{mode} {ms} was accepted");
        assert!(err.contains("--echo-room-ms"), "{err}");
        assert!(!tmp("lat_room_bad.json").exists());
    }
}

/// The harness runs the cascade on the recording (fixture STT and TTS, the test LLM) and
/// reports each reply's milestones after the end of the user's speech.
#[test]
fn latency_harness_reports_the_cascade_stages() {
    let Some(llm) = parley_engine::llm::test_llm() else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tts = fixture_dir("tts-tiny");
    let report = tmp("lat_cascade.json");
    let out = parley_ok(&[
        "bench",
        "latency",
        s(&root.join("assets/speech/dialogue.wav")),
        "--alignment",
        s(&root.join("assets/speech/dialogue.json")),
        "--mode",
        "cascade",
        "--stt-model-dir",
        s(&fixture_dir("stt-tiny")),
        "--tts-model-dir",
        s(&tts),
        "--voice",
        s(&tts.join("voice_a.safetensors")),
        "--llm",
        s(&llm),
        "--llm-temp",
        "0",
        "--pace",
        "fast",
        "--device",
        "cpu",
        "--precision",
        "f32",
        "--report",
        s(&report),
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("LLM first token"), "{table}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
    // The recording's turns get replies, matched to their turns. A reply may be cut short
    // (by the second turn, or by the user going on after a premature end) before the LLM
    // wrote anything (then it has no milestones and was never heard); a reply that ran
    // to its end has the LLM's.
    let replies = r["cascade"].as_array().expect("cascade");
    let completed = replies.iter().filter(|r| r["cancelled"] == false).count();
    assert!(completed >= 1, "{r}");
    for reply in replies {
        // A reply to a premature end (Smart Turn calling a mid-turn pause complete; the
        // user then went on and cancelled it) answers no aligned turn.
        assert!(
            reply["turn"].as_u64().is_some() || reply["cancelled"] == true,
            "{reply}"
        );
        if reply["cancelled"] == false {
            assert!(
                reply["timing"]["llm_first_token_ms"].as_f64().is_some(),
                "{reply}"
            );
        }
        if reply["timing"]["tts_first_audio_ms"].is_null() {
            assert!(reply["heard_s"].is_null(), "{reply}");
        }
    }
    let milestones: Vec<&str> = r["cascade_stages_ms"]
        .as_array()
        .expect("stages")
        .iter()
        .filter_map(|m| m["milestone"].as_str())
        .collect();
    assert!(
        milestones.starts_with(&["end of turn detected", "LLM first token"]),
        "{milestones:?}"
    );
}

/// `parley` with no command opens the real window: under a virtual X server (Xvfb) it
/// draws its first frame. Skips, saying why, where Xvfb is not installed.
#[test]
fn the_window_opens_under_xvfb() {
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};
    let display = format!(":{}", 90 + std::process::id() % 500);
    let xvfb = Command::new("Xvfb")
        .args([
            display.as_str(),
            "-screen",
            "0",
            "1280x800x24",
            "-nolisten",
            "tcp",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut xvfb) = xvfb else {
        eprintln!("skipping: Xvfb is not installed (scripts/setup.sh installs it)");
        return;
    };
    std::thread::sleep(Duration::from_millis(800));
    let config = tmp("xdg-config");
    let mut app = Command::new(env!("CARGO_BIN_EXE_parley"))
        .env("DISPLAY", &display)
        .env("XDG_DATA_HOME", &config)
        .env("XDG_CONFIG_HOME", &config)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run parley");
    let stderr = app.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    let mut seen = vec![];
    let mut ready = false;
    while start.elapsed() < Duration::from_secs(60) && !ready {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            ready = line.contains("window ready");
            seen.push(line);
        }
        if let Ok(Some(status)) = app.try_wait() {
            panic!("parley exited with {status}: {seen:?}");
        }
    }
    let _ = app.kill();
    let _ = app.wait();
    let _ = xvfb.kill();
    let _ = xvfb.wait();
    assert!(ready, "no first frame within 60 s: {seen:?}");
}

/// `parley vad` on the dialogue: its two turns, as JSON Lines with OpenAI Realtime's names
/// (needs ONNX Runtime: skipped with the reason where it is missing, unless
/// `PARLEY_REQUIRE_ORT=1`).
#[test]
fn vad_finds_the_dialogues_two_turns() {
    if let Err(e) = parley_engine::models::vad::runtime() {
        assert_ne!(
            std::env::var("PARLEY_REQUIRE_ORT").as_deref(),
            Ok("1"),
            "PARLEY_REQUIRE_ORT=1 and {e}"
        );
        eprintln!("skipped: {e}");
        return;
    }
    let wav = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/speech/dialogue.wav");
    let out = parley_ok(&["vad", s(&wav), "--json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let kinds: Vec<&str> = lines
        .iter()
        .map(|l| l["type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        kinds,
        [
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped"
        ]
    );
    // The turns of assets/speech/dialogue.json: 0.50-3.76 s and 5.76-9.16 s.
    let t: Vec<i64> = lines
        .iter()
        .map(|l| {
            l["audio_start_ms"]
                .as_i64()
                .or(l["audio_end_ms"].as_i64())
                .expect("ms")
        })
        .collect();
    for (got, want) in t.iter().zip([500, 3756, 5756, 9163]) {
        assert!((got - want).abs() <= 100, "{t:?}");
    }
    let text = parley_ok(&["vad", s(&wav)]);
    assert_eq!(String::from_utf8_lossy(&text.stdout).lines().count(), 2);
    // With Smart Turn, every stop says whether the turn is complete; the dialogue's last
    // one is (the model gives 0.97 there, and moves by 0.005 under noise of 1e-5 on its
    // features: tests/fixtures/smart_turn/cuts.json).
    let judged = parley_ok(&["vad", s(&wav), "--json", "--smart-turn"]);
    let stops: Vec<f64> = String::from_utf8_lossy(&judged.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
        .filter(|l| l["type"] == "input_audio_buffer.speech_stopped")
        .map(|l| l["turn_complete_probability"].as_f64().expect("smart turn"))
        .collect();
    assert_eq!(stops.len(), 2, "{stops:?}");
    assert!(stops.iter().all(|p| (0.0..=1.0).contains(p)), "{stops:?}");
    assert!(stops[1] > 0.5, "{stops:?}");
    let bad = parley(&["vad", s(&wav), "--threshold", "2"]);
    assert_clean_failure(&bad, "--threshold");
}

fn tts_args<'a>(dir: &'a str, voice: &'a str) -> Vec<&'a str> {
    vec![
        "--model-dir",
        dir,
        "--voice",
        voice,
        "--temp",
        "0",
        "--precision",
        "f32",
        "--device",
        "cpu",
    ]
}

fn wav_i16(path: &Path) -> Vec<i16> {
    let mut r = hound::WavReader::open(path).expect("wav");
    match r.spec().sample_format {
        hound::SampleFormat::Int => r.samples::<i16>().map(|s| s.expect("sample")).collect(),
        hound::SampleFormat::Float => r
            .samples::<f32>()
            .map(|s| (s.expect("sample") * 32767.0).round() as i16)
            .collect(),
    }
}

/// `parley tts` on the tiny TTS: the reference's tokens and speech, whole text or words
/// streamed on stdin with the speech streamed on stdout; bad input said cleanly.
#[test]
fn tts_says_the_reference_text_whole_or_streamed() {
    let dir = fixture_dir("tts-tiny");
    let (d, voice) = (
        s(&dir).to_string(),
        s(&dir.join("voice_a.safetensors")).to_string(),
    );
    let (wav, tokens) = (tmp("tts.wav"), tmp("tts_tokens.npy"));
    let mut args = vec!["tts", "Hello, this is Parley."];
    args.extend(tts_args(&d, &voice));
    args.extend(["--out", s(&wav), "--dump-tokens", s(&tokens)]);
    parley_ok(&args);
    let got = candle_core::Tensor::read_npy(&tokens).expect("tokens");
    let want = candle_core::Tensor::read_npy(dir.join("s0_voice_a_tokens.npy")).expect("fixture");
    assert_eq!(
        got.to_vec2::<i64>().expect("i64"),
        want.to_vec2::<i64>().expect("i64")
    );
    let reference = wav_i16(&dir.join("s0_voice_a_audio.wav"));
    let ours = wav_i16(&wav);
    assert_eq!(ours.len(), reference.len());
    assert!(ours.iter().zip(&reference).all(|(a, b)| (a - b).abs() <= 2));
    // Streamed: words on stdin, raw PCM16 on stdout.
    let mut child = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["tts", "-", "--out", "-"])
        .args(tts_args(&d, &voice))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        for piece in ["Hel", "lo, th", "is is Par", "ley."] {
            stdin.write_all(piece.as_bytes()).expect("write");
            stdin.flush().expect("flush");
            std::thread::sleep(std::time::Duration::from_millis(30));
        }
    });
    let out = child.wait_with_output().expect("run");
    writer.join().expect("writer");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw: Vec<i16> = out
        .stdout
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    assert_eq!(raw.len(), reference.len());
    assert!(raw.iter().zip(&reference).all(|(a, b)| (a - b).abs() <= 2));
    // Bad input: each named once, no panic.
    let bad_voice = dir.join("mimi.safetensors");
    let missing = dir.join("no-such-voice.safetensors");
    for (v, extra, culprit) in [
        (s(&bad_voice), vec![], "speaker_wavs"),
        (s(&missing), vec![], "no-such-voice"),
        (voice.as_str(), vec!["--cfg", "9.5"], "9.5"),
        (voice.as_str(), vec!["--codebooks", "99"], "--codebooks"),
    ] {
        let mut args = vec!["tts", "Hello."];
        args.extend(tts_args(&d, v));
        args.extend(["--out", s(&wav)]);
        args.extend(extra);
        assert_clean_failure(&parley(&args), culprit);
    }
    // On the GPU (lavapipe in CI; skipped where there is no adapter): the reference's
    // tokens too.
    let gpu_tokens = tmp("tts_gpu_tokens.npy");
    let mut args = vec!["tts", "Hello, this is Parley."];
    args.extend(
        tts_args(&d, &voice)
            .into_iter()
            .map(|a| if a == "cpu" { "gpu" } else { a }),
    );
    args.extend(["--out", s(&wav), "--dump-tokens", s(&gpu_tokens)]);
    let out = parley(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("no GPU") {
        eprintln!("skipping the GPU run: {stderr}");
    } else {
        assert!(out.status.success(), "{stderr}");
        let got = candle_core::Tensor::read_npy(&gpu_tokens).expect("tokens");
        let want =
            candle_core::Tensor::read_npy(dir.join("s0_voice_a_tokens.npy")).expect("fixture");
        assert_eq!(
            got.to_vec2::<i64>().expect("i64"),
            want.to_vec2::<i64>().expect("i64"),
            "GPU tokens"
        );
    }
    let mut args = vec!["tts", "   "];
    args.extend(tts_args(&d, &voice));
    args.extend(["--out", s(&wav)]);
    assert_clean_failure(&parley(&args), "no words");
    // A registry voice that is not downloaded says what to pull; an unknown name lists
    // the registry's.
    let home = tmp("tts-hf-home");
    for (name, culprit) in [
        ("robert", "parley models pull tts-voices"),
        ("nobody", "robert"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_parley"))
            .args([
                "tts",
                "Hello.",
                "--model-dir",
                &d,
                "--voice",
                name,
                "--out",
                s(&wav),
            ])
            .env("HF_HOME", &home)
            .env_remove("HF_HUB_CACHE")
            .output()
            .expect("run");
        assert_clean_failure(&out, culprit);
    }
    // A model that does not speak text is refused by name.
    let stt = fixture_dir("stt-tiny");
    let mut args = vec!["tts", "Hello."];
    args.extend(["--model-dir", s(&stt), "--voice", &voice, "--out", s(&wav)]);
    assert_clean_failure(&parley(&args), "not a text-to-speech model");
}

/// `--out` naming the input (by any path) is refused before anything is written, and a
/// failed write leaves the previous output as it was: outputs go through a temporary file
/// renamed into place.
#[test]
fn outputs_never_replace_their_input_or_a_good_file_with_half_of_one() {
    let wav = fixture_dir("mimi-tiny").join("input.wav");
    let copy = tmp("self_input.wav");
    std::fs::copy(&wav, &copy).expect("copy");
    let before = std::fs::read(&copy).expect("read");
    let aliased = copy
        .parent()
        .expect("dir")
        .join(".")
        .join(copy.file_name().expect("name"));
    let out = parley(&[
        "mimi",
        "encode",
        s(&copy),
        "--model-dir",
        s(&fixture_dir("mimi-tiny")),
        "--out",
        s(&aliased),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is the input"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&copy).expect("read"),
        before,
        "the input is intact"
    );
    // A decode into a directory that cannot take the file fails and leaves nothing.
    let codes = tmp("self_codes.npy");
    parley_ok(&[
        "mimi",
        "encode",
        s(&copy),
        "--model-dir",
        s(&fixture_dir("mimi-tiny")),
        "--out",
        s(&codes),
    ]);
    let first = std::fs::read(&codes).expect("codes");
    let missing_dir = tmp("no-such-dir").join("out.wav");
    let out = parley(&[
        "mimi",
        "decode",
        s(&codes),
        "--model-dir",
        s(&fixture_dir("mimi-tiny")),
        "--out",
        s(&missing_dir),
    ]);
    assert!(!out.status.success());
    assert!(!missing_dir.exists());
    assert_eq!(std::fs::read(&codes).expect("codes"), first);
}

/// Copies `from` (a flat directory) to a fresh `to`.
fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("dir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

/// Messages of the issue's list: each names the file (or tensor) at fault, says what was
/// expected, and says it once.
#[test]
fn messages_name_the_culprit_once() {
    let input = fixtures().join("input.wav");
    let stt = fixture_dir("stt-tiny");
    let once = |out: &Output, what: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.matches(what).count(), 1, "`{what}` once: {stderr}");
    };

    let empty = tmp("empty.wav");
    std::fs::write(&empty, b"").expect("write");
    let out = parley(&["stt", s(&empty), "--model-dir", s(&stt)]);
    assert_clean_failure(&out, "empty.wav: the file is empty");
    let short = tmp("short.wav");
    std::fs::write(&short, b"RIFF\x24\x00\x00\x00WAVE").expect("write");
    let out = parley(&["stt", s(&short), "--model-dir", s(&stt)]);
    assert_clean_failure(&out, "ends after 12 bytes, within its header");

    let missing = tmp("missing.wav");
    let out = parley(&["stt", s(&missing), "--model-dir", s(&stt)]);
    assert_clean_failure(&out, "missing.wav");
    once(&out, "No such file");
    let out = parley(&[
        "mimi",
        "decode",
        s(&tmp("missing.npy")),
        "--model-dir",
        s(&fixtures()),
        "--out",
        s(&tmp("y.wav")),
    ]);
    assert_clean_failure(&out, "missing.npy");
    once(&out, "no such file");

    // Without config.json: the message is about config.json, not about a Mimi file.
    let no_config = tmp("no-config");
    copy_dir(&stt, &no_config);
    std::fs::remove_file(no_config.join("config.json")).expect("rm");
    let out = parley(&["stt", s(&input), "--model-dir", s(&no_config)]);
    assert_clean_failure(&out, "config.json");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("missing") && stderr.contains("needs its config.json"),
        "{stderr}"
    );

    // A directory as the recording; a config that is JSON but not an object; a negative
    // number reaches the option's own check.
    let out = parley(&["stt", s(&stt), "--model-dir", s(&stt)]);
    assert_clean_failure(&out, "a directory, not an audio file");
    let array_cfg = tmp("array-config");
    copy_dir(&stt, &array_cfg);
    std::fs::write(array_cfg.join("config.json"), "[]").expect("write");
    let out = parley(&["stt", s(&input), "--model-dir", s(&array_cfg)]);
    assert_clean_failure(&out, "not a JSON object");
    let out = parley(&["vad", s(&input), "--min-silence-ms", "-1"]);
    assert_clean_failure(&out, "--min-silence-ms -1 is outside");

    // A NaN in a weight the STT reads: the tensor is named.
    let nan = tmp("nan-weights");
    copy_dir(&stt, &nan);
    let path = nan.join("model.safetensors");
    let mut bytes = std::fs::read(&path).expect("read");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + header_len]).expect("header");
    let (name, offset, nan_bits) = header
        .as_object()
        .expect("object")
        .iter()
        .filter(|(k, _)| k.as_str() == "text_emb.weight")
        .find_map(|(k, v)| {
            let bits: &[u8] = match v["dtype"].as_str()? {
                "F32" => &[0x00, 0x00, 0xc0, 0x7f],
                "BF16" => &[0xc0, 0x7f],
                "F16" => &[0x00, 0x7e],
                _ => return None,
            };
            Some((k.clone(), v["data_offsets"][0].as_u64()? as usize, bits))
        })
        .expect("a float tensor");
    let at = 8 + header_len + offset;
    bytes[at..at + nan_bits.len()].copy_from_slice(nan_bits);
    std::fs::write(&path, bytes).expect("write");
    let out = parley(&["stt", s(&input), "--model-dir", s(&nan)]);
    assert_clean_failure(&out, &format!("`{name}`"));
    assert_clean_failure(&out, "non-finite value (NaN or infinity) at element 0");
}

/// The hostile-input pass's data-loss cases: an output over any input of the command (a
/// model's file, the voice, the recording through another flag), two outputs on one
/// file, a device or `-` as a file, a link (its target is written); a full stdout; bad
/// numbers and alignments. Each is refused with a message before any work, and leaves
/// every file as it was.
#[test]
fn outputs_never_overwrite_any_input_and_bad_arguments_are_named() {
    let input = fixtures().join("input.wav");
    let mimi_dir = tmp("hostile-mimi");
    copy_dir(&fixture_dir("mimi-tiny"), &mimi_dir);
    let stt_dir = tmp("hostile-stt");
    copy_dir(&fixture_dir("stt-tiny"), &stt_dir);
    let tts_dir = tmp("hostile-tts");
    copy_dir(&fixture_dir("tts-tiny"), &tts_dir);
    let recording = tmp("hostile-input.wav");
    std::fs::copy(&input, &recording).expect("copy");
    let snapshot = |d: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .expect("dir")
            .map(|e| {
                let p = e.expect("entry").path();
                let b = std::fs::read(&p).expect("read");
                (p, b)
            })
            .collect();
        v.sort();
        v
    };
    let before = [snapshot(&mimi_dir), snapshot(&stt_dir), snapshot(&tts_dir)];
    let rec_before = std::fs::read(&recording).expect("read");

    // `parley mimi CMD INPUT --model-dir <the copy> --out OUT`, required to succeed or not.
    let mimi = |cmd: &str, input: &Path, out: &str, ok: bool| {
        let args = [
            "mimi",
            cmd,
            s(input),
            "--model-dir",
            s(&mimi_dir),
            "--out",
            out,
        ];
        if ok {
            parley_ok(&args)
        } else {
            parley(&args)
        }
    };

    let weights = mimi_dir.join("mimi.safetensors");
    let out = mimi("encode", &recording, s(&weights), false);
    assert_clean_failure(&out, "is the input");
    let out = parley(&[
        "stt",
        s(&recording),
        "--model-dir",
        s(&stt_dir),
        "--dump-tokens",
        s(&recording),
    ]);
    assert_clean_failure(&out, "is the input");
    let voice = tts_dir.join("voice_a.safetensors");
    let out = parley(&[
        "tts",
        "hello",
        "--model-dir",
        s(&tts_dir),
        "--voice",
        s(&voice),
        "--out",
        s(&voice),
    ]);
    assert_clean_failure(&out, "is the input");
    let same = tmp("same.out");
    let out = parley(&[
        "moshi",
        s(&recording),
        "--model-dir",
        s(&fixture_dir("moshi-tiny")),
        "--out",
        s(&same),
        "--dump-tokens",
        s(&same),
    ]);
    assert_clean_failure(&out, "two outputs are the same file");
    let out = mimi("encode", &recording, "/dev/null", false);
    assert_clean_failure(&out, "not a regular file");
    let codes = tmp("hostile-codes.npy");
    mimi("encode", &recording, s(&codes), true);
    let out = mimi("decode", &codes, "-", false);
    assert_clean_failure(&out, "output `-`");
    assert!(!Path::new("-").exists());
    let out = mimi(
        "decode",
        &codes,
        s(&tmp("no-such-folder").join("x.wav")),
        false,
    );
    assert_clean_failure(&out, "does not exist");
    // Through a link: the target gets the output, the link stays.
    let target = tmp("link-target.wav");
    std::fs::write(&target, b"old").expect("write");
    let link = tmp("link.wav");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&target, &link).expect("link");
    mimi("decode", &codes, s(&link), true);
    assert!(std::fs::symlink_metadata(&link)
        .expect("meta")
        .file_type()
        .is_symlink());
    assert!(std::fs::read(&target).expect("target").starts_with(b"RIFF"));

    // A config naming a file outside its directory.
    let escape = tmp("hostile-escape");
    copy_dir(&fixture_dir("stt-tiny"), &escape);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(escape.join("config.json")).expect("config"))
            .expect("json");
    cfg["mimi_name"] = serde_json::json!("../hostile-stt/mimi.safetensors");
    std::fs::write(escape.join("config.json"), cfg.to_string()).expect("write");
    let out = parley(&["stt", s(&recording), "--model-dir", s(&escape)]);
    assert_clean_failure(&out, "not a plain file name");

    // Numbers and alignments out of sense.
    for (flag, v) in [("--temp", "NaN"), ("--temp-text", "-1")] {
        let arg = format!("{flag}={v}");
        let out = parley(&[
            "moshi",
            s(&recording),
            "--model-dir",
            s(&fixture_dir("moshi-tiny")),
            "--out",
            s(&tmp("t.wav")),
            &arg,
        ]);
        assert_clean_failure(&out, flag);
    }
    let align = tmp("bad-align.json");
    std::fs::write(
        &align,
        r#"{"turns": [{"start_s": 0.5, "end_s": 900}], "words": []}"#,
    )
    .expect("write");
    let out = parley(&[
        "bench",
        "latency",
        s(&recording),
        "--model-dir",
        s(&stt_dir),
        "--mode",
        "listen",
        "--alignment",
        s(&align),
        "--pace",
        "fast",
        "--device",
        "cpu",
        "--report",
        s(&tmp("r.json")),
    ]);
    assert_clean_failure(&out, "not within the recording");
    let out = parley(&[
        "bench",
        "latency",
        s(&recording),
        "--model-dir",
        s(&stt_dir),
        "--mode",
        "listen",
        "--pace",
        "fast",
        "--report",
        s(&tmp("r.json")),
        "--plot",
        s(&tmp("p.txt")),
    ]);
    assert_clean_failure(&out, "ending in .png");

    // A full stderr: the logs are dropped, never a panic (exit 101); failure is exit 1.
    let with_full_stderr = |args: &[&str]| {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        Command::new(env!("CARGO_BIN_EXE_parley"))
            .args(args)
            .stderr(full)
            .output()
            .expect("run")
            .status
            .code()
    };
    let stt = [
        "stt",
        s(&recording),
        "--model-dir",
        s(&stt_dir),
        "--device",
        "cpu",
    ];
    assert_eq!(with_full_stderr(&stt), Some(0));
    let missing = tmp("missing-input.wav");
    let stt = ["stt", s(&missing), "--model-dir", s(&stt_dir)];
    assert_eq!(with_full_stderr(&stt), Some(1));

    // Speech to a full stdout: an error, not a quiet end.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["tts", "hello world", "--out", "-"])
        .args(tts_args(
            s(&fixture_dir("tts-tiny")),
            s(&fixture_dir("tts-tiny").join("voice_a.safetensors")),
        ))
        .stdout(full)
        .output()
        .expect("run");
    assert_clean_failure(&out, "writing speech to stdout");

    assert_eq!(
        [snapshot(&mimi_dir), snapshot(&stt_dir), snapshot(&tts_dir)],
        before,
        "no input changed"
    );
    assert_eq!(std::fs::read(&recording).expect("read"), rec_before);
}

/// `bench gpu` refuses what it cannot time, naming it, before any adapter is opened.
#[test]
fn bench_gpu_refuses_bad_requests_by_name() {
    let out = parley(&["bench", "gpu", "--device", "cpu"]);
    assert_clean_failure(&out, "bench gpu times the GPU");
    let out = parley(&["bench", "gpu", "--preset", "moshi-9b"]);
    assert_clean_failure(&out, "unknown preset `moshi-9b`");
    let out = parley(&["bench", "gpu", "--preset", "tts-1.6b-en_fr"]);
    assert_clean_failure(&out, "bench tts --device gpu");
    let out = parley(&["bench", "gpu", "--steps", "0"]);
    assert_clean_failure(&out, "--steps must be at least 1");
    let out = parley(&["bench", "gpu", "--dtype", "f16,q7"]);
    assert_clean_failure(&out, "q7");
}
