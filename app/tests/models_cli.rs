//! `parley models list | path | pull` as a user runs them: real processes, HF_HOME in a
//! temporary folder, HF_ENDPOINT at a fake Hub on 127.0.0.1.

#[path = "../../tests/common/fake_hub.rs"]
mod fake_hub;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fake_hub::{FakeFile, FakeHub};
use parley_engine::models::kyutai_config::ModelDir;

/// The revision the registry pins stt-1b-en_fr to (the fake Hub answers for it).
const COMMIT: &str = "095e38f6242006a93c2541149b181988397f5c7c";

fn tmp_home(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("parley-models-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    dir
}

/// Runs parley with a fresh Hugging Face environment: only HF_HOME (and HF_ENDPOINT).
fn parley(home: &Path, endpoint: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley"));
    cmd.args(args).env("HF_HOME", home);
    for var in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_OFFLINE",
        "HF_ENDPOINT",
    ] {
        cmd.env_remove(var);
    }
    if let Some(e) = endpoint {
        cmd.env("HF_ENDPOINT", e);
    }
    cmd.output().expect("run parley")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn fixture(name: &str) -> Vec<u8> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/stt-tiny");
    std::fs::read(dir.join(name)).expect("fixture")
}

/// A fake `kyutai/stt-1b-en_fr-candle`: the tiny STT fixture under the real preset's file names
/// (so its sizes are nothing like the registry's: the pull must go by the Hub's).
fn fake_stt_1b() -> FakeHub {
    let mut config: serde_json::Value =
        serde_json::from_slice(&fixture("config.json")).expect("config");
    config["mimi_name"] = "mimi-pytorch-e351c8d8@125.safetensors".into();
    config["tokenizer_name"] = "tokenizer_en_fr_audio_8000.model".into();
    let hub = FakeHub::start();
    hub.add_repo(
        "kyutai/stt-1b-en_fr-candle",
        COMMIT,
        vec![
            FakeFile::new(
                "config.json",
                serde_json::to_vec_pretty(&config).expect("json"),
            ),
            FakeFile::new("model.safetensors", fixture("model.safetensors")),
            FakeFile::new(
                "mimi-pytorch-e351c8d8@125.safetensors",
                fixture("mimi.safetensors"),
            ),
            FakeFile::new(
                "tokenizer_en_fr_audio_8000.model",
                fixture("tokenizer.model"),
            ),
        ],
    );
    hub
}

#[test]
fn list_shows_every_preset_and_nothing_downloaded() {
    let home = tmp_home("list");
    let out = parley(&home, None, &["models", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&home.join("hub").display().to_string()),
        "{stdout}"
    );
    for name in [
        "stt-1b-en_fr",
        "stt-2.6b-en",
        "moshiko-bf16",
        "moshika-bf16",
        "moshiko-q8",
        "moshika-q8",
        "tts-1.6b-en_fr",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not listed: {stdout}"));
        assert!(line.contains("not downloaded"), "{line}");
        assert!(line.contains(" yes "), "{line}");
    }
    assert!(stdout.contains("~2.4 GB"), "{stdout}");
    let bnb = stdout
        .lines()
        .find(|l| l.starts_with("moshiko-q8-bnb "))
        .expect("an unsupported preset is listed");
    assert!(bnb.contains(" no "), "{bnb}");
}

#[test]
fn path_of_a_missing_preset_says_what_to_pull() {
    let home = tmp_home("path");
    let out = parley(&home, None, &["models", "path", "stt-1b-en_fr"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("pull it (2.4 GB)"), "{stderr}");
    assert!(
        stderr.contains("parley models pull stt-1b-en_fr"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    let out = parley(&home, None, &["models", "path", "stt-9b"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("stt-9b") && stderr.contains("moshiko-bf16"),
        "{stderr}"
    );
}

#[test]
fn pull_then_path_from_a_local_hub() {
    let server = fake_stt_1b();
    let home = tmp_home("pull");
    let endpoint = Some(server.url.as_str());

    // An interruption without retries fails with how to resume ...
    server.truncate_next("model.safetensors", 60_000);
    let out = parley(
        &home,
        endpoint,
        &["models", "pull", "stt-1b-en_fr", "--retries", "0"],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("model.safetensors") && stderr.contains("resume"),
        "{stderr}"
    );
    let list = text(&parley(&home, None, &["models", "list"]).stdout);
    let line = list
        .lines()
        .find(|l| l.starts_with("stt-1b-en_fr "))
        .expect("listed");
    assert!(line.contains("partial"), "{line}");

    // ... and the next pull resumes from there.
    server.clear_log();
    let out = parley(&home, endpoint, &["models", "pull", "stt-1b-en_fr"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(server
        .log()
        .iter()
        .any(|r| r.method == "GET" && r.range.as_deref() == Some("bytes=60000-")));
    let dir = PathBuf::from(text(&out.stdout).trim());
    assert_eq!(
        dir,
        home.join("hub/models--kyutai--stt-1b-en_fr-candle/snapshots")
            .join(COMMIT)
    );
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).expect("read"),
        fixture("model.safetensors")
    );
    ModelDir::open(&dir)
        .expect("model dir")
        .load_lm()
        .expect("lm");

    // path prints it, without the Hub.
    let out = parley(
        &home,
        Some("http://127.0.0.1:1"),
        &["models", "path", "stt-1b-en_fr"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(PathBuf::from(text(&out.stdout).trim()), dir);
    let list = text(&parley(&home, None, &["models", "list"]).stdout);
    assert!(
        list.contains(&format!("downloaded: {}", dir.display())),
        "{list}"
    );
}

#[test]
fn pull_refuses_unsupported_presets_and_reports_an_unreachable_hub() {
    let home = tmp_home("refuse");
    let out = parley(&home, None, &["models", "pull", "moshiko-q8-bnb"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("not supported") && stderr.contains("bitsandbytes"),
        "{stderr}"
    );

    let out = parley(
        &home,
        Some("http://127.0.0.1:1"),
        &["models", "pull", "stt-2.6b-en"],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("kyutai/stt-2.6b-en")
            && stderr.contains("cannot reach the Hugging Face Hub")
            && stderr.contains("--model-dir"),
        "{stderr}"
    );
}

/// A closed stdout (`parley models list | (exit 0)`) ends the command with one message and
/// a non-zero exit, not a panic.
#[test]
fn a_closed_stdout_is_an_error_not_a_panic() {
    let home = tmp_home("closed-stdout");
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["models", "list"])
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(writer)
        .output()
        .expect("run parley");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("writing to stdout"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
}
