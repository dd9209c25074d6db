//! Downloads from a fake Hub on 127.0.0.1 (no network): the cache layout, resuming an
//! interrupted file with `Range`, rejecting corrupt bytes, status, cancellation, and the
//! errors for an unreachable Hub, a missing file and a gated repository.

#[path = "common/fake_hub.rs"]
mod fake_hub;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fake_hub::{FakeFile, FakeHub};
use parley_engine::hub::{
    parse_registry, FileState, Hub, HubConfig, Preset, PullOptions, PullPhase, PullProgress,
};
use parley_engine::models::kyutai_config::ModelDir;
use parley_engine::Error;

const REPO: &str = "parley-test/stt-tiny";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const FILES: [&str; 5] = [
    "config.json",
    "model.safetensors",
    "mimi.safetensors",
    "mimi_config.json",
    "tokenizer.model",
];

fn fixture(name: &str) -> Vec<u8> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/stt-tiny");
    std::fs::read(dir.join(name)).expect("fixture")
}

/// A fake Hub serving tests/fixtures/stt-tiny as `parley-test/stt-tiny`.
fn hub_with_fixture() -> FakeHub {
    let hub = FakeHub::start();
    let files = FILES.iter().map(|f| FakeFile::new(f, fixture(f))).collect();
    hub.add_repo(REPO, COMMIT, files);
    hub
}

/// A preset over `repo` with deliberately wrong registry sizes (1000 bytes each, marked
/// estimates): a pull must go by the Hub's sizes.
fn preset(repo: &str, files: &[&str]) -> Preset {
    let files: Vec<String> = files
        .iter()
        .map(|f| {
            let role = match *f {
                "config.json" => "config",
                "model.safetensors" => "lm",
                "mimi.safetensors" => "mimi",
                "mimi_config.json" => "mimi_config",
                _ => "tokenizer",
            };
            format!(
                r#"{{"name": "{f}", "role": "{role}", "size_bytes": 1000, "size_is_estimate": true}}"#
            )
        })
        .collect();
    let json = format!(
        r#"{{"schema_version": 1, "presets": [{{"name": "tiny", "title": "tiny", "mode": "listen",
        "repo": "{repo}", "revision": "main", "supported": true, "files": [{}]}}]}}"#,
        files.join(",")
    );
    parse_registry(&json).expect("preset").remove(0)
}

fn tmp_home(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("parley-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    dir
}

fn client(home: &Path, endpoint: &str) -> Hub {
    let mut cfg = HubConfig::new(home.join("hub"), endpoint);
    cfg.connect_timeout = Duration::from_secs(5);
    cfg.read_timeout = Duration::from_secs(10);
    Hub::new(cfg).expect("hub")
}

fn options(retries: u32) -> PullOptions {
    PullOptions {
        retries,
        retry_delay: Duration::ZERO,
        progress_interval: Duration::ZERO,
        ..PullOptions::default()
    }
}

fn pull(
    hub: &Hub,
    p: &Preset,
    opts: &PullOptions,
) -> (parley_engine::Result<PathBuf>, Vec<PullProgress>) {
    let mut seen = Vec::new();
    let r = hub.pull(p, opts, &mut |pr| seen.push(pr.clone()));
    (r, seen)
}

fn repo_dir(home: &Path) -> PathBuf {
    home.join("hub").join("models--parley-test--stt-tiny")
}

fn cdn_path(name: &str) -> String {
    format!("/cdn/{}", FakeFile::new(name, fixture(name)).sha256())
}

#[test]
fn pull_fills_the_cache_layout_and_the_model_loads() {
    let server = hub_with_fixture();
    let home = tmp_home("layout");
    let hub = client(&home, &server.url);
    let p = preset(REPO, &FILES);

    let (dir, seen) = pull(&hub, &p, &options(0));
    let dir = dir.expect("pull");
    assert_eq!(dir, repo_dir(&home).join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(repo_dir(&home).join("refs/main")).expect("ref"),
        COMMIT
    );
    for f in FILES {
        let fake = FakeFile::new(f, fixture(f));
        let pointer = dir.join(f);
        let link = std::fs::read_link(&pointer).expect("a symlink");
        assert_eq!(link, Path::new("../../blobs").join(fake.etag()), "{f}");
        assert_eq!(std::fs::read(&pointer).expect("read"), fixture(f), "{f}");
    }
    // LFS blobs are named by sha256, git files by their blob id; no part files left.
    let blobs: Vec<String> = std::fs::read_dir(repo_dir(&home).join("blobs"))
        .expect("blobs")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!blobs.iter().any(|b| b.ends_with(".part")), "{blobs:?}");

    // Progress: totals are the Hub's sizes, not the registry's, and end complete.
    let total: u64 = FILES.iter().map(|f| fixture(f).len() as u64).sum();
    let last = seen.last().expect("progress");
    assert_eq!(last.phase, PullPhase::Done);
    assert_eq!((last.bytes_done, last.bytes_total), (total, total));
    assert!(seen.windows(2).all(|w| w[0].bytes_done <= w[1].bytes_done));
    assert_eq!(
        seen.iter()
            .filter(|s| s.phase == PullPhase::FileDone)
            .count(),
        FILES.len()
    );

    // The snapshot is a model directory.
    let model = ModelDir::open(&dir).expect("open");
    model.load_lm().expect("lm");
    model.load_mimi().expect("mimi");
    model.load_tokenizer().expect("tokenizer");

    let status = hub.status(&p);
    assert!(status.is_complete());
    assert_eq!(status.bytes_to_fetch, 0);
    assert_eq!(hub.local_dir(&p).expect("local dir"), dir);

    // A second pull needs no network: even with the Hub gone it returns the directory.
    server.clear_log();
    let offline = client(&home, "http://127.0.0.1:1");
    assert_eq!(pull(&offline, &p, &options(0)).0.expect("cached"), dir);
    assert!(server.log().is_empty());
}

#[test]
fn interrupted_download_resumes_where_it_stopped() {
    let server = hub_with_fixture();
    let home = tmp_home("resume");
    let hub = client(&home, &server.url);
    let p = preset(REPO, &FILES);
    let model = fixture("model.safetensors");
    let cut = 100_000;
    assert!(model.len() > cut);

    server.truncate_next("model.safetensors", cut);
    let err = pull(&hub, &p, &options(0)).0.expect_err("interrupted");
    assert!(matches!(err, Error::Download { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("resume"),
        "{msg}"
    );

    // Status, without the network: config.json done, the model partial, the rest missing,
    // all with the Hub's sizes now.
    let status = hub.status(&p);
    let state = |name: &str| {
        status
            .files
            .iter()
            .find(|f| f.name == name)
            .expect("file")
            .clone()
    };
    assert!(matches!(
        state("config.json").state,
        FileState::Present { .. }
    ));
    let m = state("model.safetensors");
    assert_eq!(
        m.state,
        FileState::Partial {
            bytes_done: cut as u64
        }
    );
    assert_eq!(m.size_bytes, model.len() as u64);
    assert!(!m.size_is_estimate);
    assert_eq!(state("tokenizer.model").state, FileState::Missing);
    let left: u64 = FILES[1..]
        .iter()
        .map(|f| fixture(f).len() as u64)
        .sum::<u64>()
        - cut as u64;
    assert_eq!(status.bytes_to_fetch, left);
    assert!(!status.bytes_to_fetch_is_estimate);
    assert!(!status.is_complete());
    let err = hub.local_dir(&p).expect_err("incomplete").to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("pull it"),
        "{err}"
    );

    // The next pull asks for the rest only, and the result is byte-identical.
    server.clear_log();
    let (dir, seen) = pull(&hub, &p, &options(0));
    let dir = dir.expect("resumed");
    let gets: Vec<_> = server
        .log()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == cdn_path("model.safetensors"))
        .collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(
        gets[0].range.as_deref(),
        Some(format!("bytes={cut}-").as_str())
    );
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).expect("read"),
        model
    );
    // config.json was not fetched again.
    assert!(!server
        .log()
        .iter()
        .any(|r| r.method == "GET" && r.path.ends_with("/config.json")));
    assert!(seen.iter().any(|s| s.phase == PullPhase::Checking));
    ModelDir::open(&dir).expect("open").load_lm().expect("lm");
}

#[test]
fn a_broken_transfer_is_resumed_within_the_same_pull() {
    let server = hub_with_fixture();
    let home = tmp_home("retry");
    let hub = client(&home, &server.url);
    let p = preset(REPO, &FILES);
    server.truncate_next("mimi.safetensors", 50_000);
    let (dir, seen) = pull(&hub, &p, &options(1));
    let dir = dir.expect("pull with one retry");
    assert!(seen
        .iter()
        .any(|s| matches!(s.phase, PullPhase::Retrying { attempt: 1, .. })));
    let ranges: Vec<Option<String>> = server
        .log()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == cdn_path("mimi.safetensors"))
        .map(|r| r.range)
        .collect();
    assert_eq!(ranges, [None, Some("bytes=50000-".to_string())]);
    assert_eq!(
        std::fs::read(dir.join("mimi.safetensors")).expect("read"),
        fixture("mimi.safetensors")
    );
}

#[test]
fn a_server_that_ignores_range_restarts_the_file() {
    let server = hub_with_fixture();
    let home = tmp_home("norange");
    let hub = client(&home, &server.url);
    let p = preset(REPO, &FILES);
    server.truncate_next("model.safetensors", 70_000);
    pull(&hub, &p, &options(0)).0.expect_err("interrupted");
    server.ignore_range(true);
    let dir = pull(&hub, &p, &options(0)).0.expect("pull");
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).expect("read"),
        fixture("model.safetensors")
    );
}

#[test]
fn corrupt_bytes_are_rejected_and_deleted() {
    let server = hub_with_fixture();
    let home = tmp_home("corrupt");
    let hub = client(&home, &server.url);
    let p = preset(REPO, &FILES);
    server.corrupt("tokenizer.model", true);
    let err = pull(&hub, &p, &options(2)).0.expect_err("corrupt");
    assert!(matches!(err, Error::CorruptDownload { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("tokenizer.model") && msg.contains("sha256") && msg.contains("deleted"),
        "{msg}"
    );
    let sha = FakeFile::new("tokenizer.model", fixture("tokenizer.model")).sha256();
    let blobs = repo_dir(&home).join("blobs");
    assert!(!blobs.join(&sha).exists());
    assert!(!blobs.join(format!("{sha}.part")).exists());
    let tok = hub
        .status(&p)
        .files
        .into_iter()
        .find(|f| f.name == "tokenizer.model")
        .expect("file");
    assert_eq!(tok.state, FileState::Missing);
    // Not retried: a corrupt file is reported, not fetched again and again.
    let gets = server
        .log()
        .iter()
        .filter(|r| r.method == "GET" && r.path == cdn_path("tokenizer.model"))
        .count();
    assert_eq!(gets, 1);

    server.corrupt("tokenizer.model", false);
    let dir = pull(&hub, &p, &options(0)).0.expect("clean pull");
    assert_eq!(
        std::fs::read(dir.join("tokenizer.model")).expect("read"),
        fixture("tokenizer.model")
    );
}

#[test]
fn cancel_keeps_the_partial_file() {
    let server = hub_with_fixture();
    let home = tmp_home("cancel");
    let hub = client(&home, &server.url);
    let p = preset(REPO, &FILES);
    let opts = options(0);
    let cancel = opts.cancel.clone();
    let mut seen = Vec::new();
    let err = hub
        .pull(&p, &opts, &mut |pr| {
            seen.push(pr.clone());
            if pr.phase == PullPhase::Downloading && pr.file == "model.safetensors" {
                cancel.cancel();
            }
        })
        .expect_err("cancelled");
    assert!(matches!(err, Error::Cancelled { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    assert!(!seen.iter().any(|s| s.phase == PullPhase::Done));
    let dir = pull(&hub, &p, &options(0)).0.expect("pull after cancel");
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).expect("read"),
        fixture("model.safetensors")
    );
}

#[test]
fn an_unreachable_hub_is_a_clear_error() {
    let home = tmp_home("offline");
    let p = preset(REPO, &FILES);
    for endpoint in ["http://127.0.0.1:1", "http://parley-test.invalid"] {
        let hub = client(&home, endpoint);
        let err = pull(&hub, &p, &options(3)).0.expect_err("unreachable");
        assert!(
            matches!(err, Error::HubUnreachable { .. }),
            "{endpoint}: {err:?}"
        );
        let msg = err.to_string();
        for want in [
            REPO,
            "config.json",
            "cannot reach the Hugging Face Hub",
            endpoint,
            "--model-dir",
        ] {
            assert!(msg.contains(want), "{want} missing: {msg}");
        }
    }
    // HF_HUB_OFFLINE: refused before any request.
    let server = hub_with_fixture();
    let mut cfg = HubConfig::new(home.join("hub"), server.url.clone());
    cfg.offline = true;
    let err = pull(&Hub::new(cfg).expect("hub"), &p, &options(0))
        .0
        .expect_err("offline");
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    assert!(server.log().is_empty());
}

#[test]
fn http_errors_are_named() {
    let server = hub_with_fixture();
    let home = tmp_home("http");
    let hub = client(&home, &server.url);

    let p = preset(REPO, &["config.json", "nope.safetensors"]);
    let err = pull(&hub, &p, &options(3)).0.expect_err("404");
    assert!(matches!(err, Error::HubHttp { status: 404, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("nope.safetensors") && msg.contains("no such file"),
        "{msg}"
    );

    let err = pull(&hub, &preset("parley-test/absent", &FILES), &options(0))
        .0
        .expect_err("401");
    assert!(matches!(err, Error::HubHttp { status: 401, .. }), "{err:?}");
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");

    server.refuse(REPO, 403);
    let err = pull(&hub, &preset(REPO, &FILES), &options(0))
        .0
        .expect_err("403");
    assert!(matches!(err, Error::HubHttp { status: 403, .. }), "{err:?}");
    assert!(err.to_string().contains("gated"), "{err}");
}

#[test]
fn a_pull_on_its_own_thread_reports_and_cancels() {
    let server = hub_with_fixture();
    let home = tmp_home("thread");
    let hub = client(&home, &server.url);
    let p = preset(REPO, &FILES);

    let handle = hub.spawn_pull(&p, options(0)).expect("spawn");
    let mut last = None;
    while !handle.is_finished() {
        if let Some(pr) = handle.latest() {
            last = Some(pr);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    last = handle.latest().or(last);
    let dir = handle.join().expect("pull");
    let last = last.expect("some progress");
    assert_eq!(last.phase, PullPhase::Done);
    assert_eq!(last.bytes_done, last.bytes_total);
    assert!(ModelDir::open(&dir).is_ok());

    // Cancelled before it starts: the thread ends with Cancelled.
    let home = tmp_home("thread-cancel");
    let hub = client(&home, &server.url);
    let opts = options(0);
    opts.cancel.cancel();
    let handle = hub.spawn_pull(&p, opts).expect("spawn");
    let err = handle.join().expect_err("cancelled");
    assert!(matches!(err, Error::Cancelled { .. }), "{err:?}");
}

/// A server that trickles a byte at a time (which no read timeout catches) fails the
/// pull at the progress deadline, saying how little came; the next pull resumes.
#[test]
fn a_trickling_server_fails_at_the_progress_deadline() {
    let server = hub_with_fixture();
    let home = tmp_home("trickle");
    let hub = client(&home, &server.url);
    let p = preset(REPO, &FILES);
    server.trickle(Some(Duration::from_millis(20)));
    let opts = PullOptions {
        stall_window: Duration::from_millis(500),
        stall_min_bytes: 1024,
        ..options(0)
    };
    let t = std::time::Instant::now();
    let err = pull(&hub, &p, &opts).0.expect_err("too slow").to_string();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        err.contains("in the last 0.5 s") && err.contains("at least expected"),
        "{err}"
    );
    server.trickle(None);
    let dir = pull(&hub, &p, &opts).0.expect("pull");
    for f in FILES {
        assert_eq!(std::fs::read(dir.join(f)).expect("read"), fixture(f), "{f}");
    }
}

/// A server whose ETag is not a hash (a weak validator, as many web servers send) cannot be
/// checked: the pull fails naming what it sent, downloads nothing and the preset is not ready.
#[test]
fn an_etag_that_is_not_a_hash_is_refused() {
    let server = hub_with_fixture();
    let home = tmp_home("weak-etag");
    let hub = client(&home, &server.url);
    let p = preset(REPO, &FILES);
    server.etag_override(Some("W/\"5f3c-1a2b\""));
    let err = pull(&hub, &p, &options(0))
        .0
        .expect_err("unverifiable")
        .to_string();
    assert!(
        err.contains("`5f3c-1a2b`") && err.contains("could not be verified"),
        "{err}"
    );
    assert!(hub
        .status(&p)
        .files
        .iter()
        .all(|f| f.state == FileState::Missing));
    assert!(
        !server.log().iter().any(|r| r.method == "GET"),
        "{:?}",
        server.log()
    );
    // A path in the ETag never reaches the cache's file names.
    server.etag_override(Some("\"../../escape\""));
    let err = pull(&hub, &p, &options(0)).0.expect_err("path").to_string();
    assert!(err.contains("`../../escape`"), "{err}");
    assert!(!home.join("escape").exists());
    server.etag_override(None);
    pull(&hub, &p, &options(0)).0.expect("the Hub's own ETags");
}
