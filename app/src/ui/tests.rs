//! The window driven for real through egui_kittest (accesskit queries and clicks), with
//! the fixture models and the virtual audio device playing the generated dialogue.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use parley_engine::pipeline::Mode;

#[path = "../../../tests/common/fake_hub.rs"]
mod fake_hub;

use super::engine::Status;
use super::settings::{Input, Settings};
use super::{Item, ParleyApp};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn settings(mode: Mode) -> Settings {
    let fx = root().join("tests/fixtures");
    Settings {
        mode,
        duplex_model_dir: fx.join("moshi-tiny").display().to_string(),
        listen_model_dir: fx.join("stt-tiny").display().to_string(),
        device: "cpu".into(),
        precision: "auto".into(),
        input: Input::File {
            path: root()
                .join("assets/speech/dialogue.wav")
                .display()
                .to_string(),
            realtime: false,
        },
        output_device: None,
        play_output: false,
        muted: false,
        ..Settings::default()
    }
}

fn harness(s: Settings) -> Harness<'static, ParleyApp> {
    Harness::builder()
        .with_size([1100.0, 720.0])
        .build_eframe(move |cc| ParleyApp::with_settings(cc, s))
}

/// Steps the window until `done` holds (the engine works on its own threads).
fn run_until(h: &mut Harness<'_, ParleyApp>, what: &str, done: impl Fn(&ParleyApp) -> bool) {
    let t = Instant::now();
    while !done(h.state()) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}; problems: {:?}, status: {:?}",
            h.state().problems,
            h.state().status
        );
        h.step();
        std::thread::sleep(Duration::from_millis(10));
    }
    h.step();
}

#[test]
fn the_transcript_appears_and_switching_mode_works() {
    let mut h = harness(settings(Mode::Listen));
    h.step();
    h.get_by_label("Start").click();
    run_until(&mut h, "final words", |a| {
        a.conversation
            .iter()
            .any(|i| matches!(i, Item::User { words, .. } if !words.is_empty()))
    });
    // The words are on screen, with their times on hover.
    let first = h
        .state()
        .conversation
        .iter()
        .find_map(|i| match i {
            Item::User { words, .. } => words.first().cloned(),
            _ => None,
        })
        .expect("a word");
    assert!(
        h.query_all_by_label(&first.0).next().is_some(),
        "{} is not shown",
        first.0
    );
    assert!(h.state().problems.is_empty(), "{:?}", h.state().problems);

    // Duplex: the session restarts with the Moshi-style model, which answers.
    h.get_by_label("Duplex").click();
    h.step();
    if !h.state().is_running() {
        h.get_by_label("Start").click();
    }
    run_until(&mut h, "the model's reply", |a| {
        matches!(
            a.status,
            Status::Running {
                mode: Mode::Duplex,
                ..
            } | Status::Stopped
        ) && a
            .conversation
            .iter()
            .any(|i| matches!(i, Item::Model { text, .. } if !text.trim().is_empty()))
    });
    assert_eq!(h.state().settings.mode, Mode::Duplex);
    let reply = h
        .state()
        .conversation
        .iter()
        .find_map(|i| match i {
            Item::Model { text, .. } if !text.trim().is_empty() => Some(text.trim().to_string()),
            _ => None,
        })
        .expect("reply");
    assert!(
        h.query_all_by_label(&reply).next().is_some(),
        "{reply} is not shown"
    );
}

#[test]
fn a_broken_model_directory_is_shown_with_what_to_do() {
    let mut s = settings(Mode::Listen);
    s.listen_model_dir = root()
        .join("tests/fixtures/mimi-tiny")
        .display()
        .to_string();
    let mut h = harness(s);
    h.step();
    h.get_by_label("Start").click();
    run_until(&mut h, "an error", |a| !a.problems.is_empty());
    h.get_by_label_contains("the model failed to load");
    h.get_by_label_contains("Check the listen model directory");
    assert!(!h.state().is_running());
    // Dismissed, it goes away.
    let n = h.state().problems.len();
    h.get_all_by_label("Dismiss")
        .next()
        .expect("dismiss")
        .click();
    h.run_steps(2);
    assert_eq!(h.state().problems.len(), n - 1, "{:?}", h.state().problems);
}

#[test]
fn settings_survive_a_restart() {
    #[derive(Default)]
    struct Store(std::collections::HashMap<String, String>);
    impl eframe::Storage for Store {
        fn get_string(&self, key: &str) -> Option<String> {
            self.0.get(key).cloned()
        }
        fn set_string(&mut self, key: &str, value: String) {
            self.0.insert(key.into(), value);
        }
        fn remove_string(&mut self, key: &str) {
            self.0.remove(key);
        }
        fn flush(&mut self) {}
    }
    let mut store = Store::default();
    let mut s = settings(Mode::Listen);
    s.device = "gpu".into();
    s.muted = true;
    {
        let mut h = harness(s.clone());
        h.step();
        eframe::App::save(h.state_mut(), &mut store);
    }
    let store = store;
    let h = Harness::builder().build_eframe(|cc| {
        cc.storage = Some(&store);
        ParleyApp::new(cc)
    });
    assert_eq!(h.state().settings, s);
}

#[test]
fn the_first_run_screen_says_what_to_fetch() {
    let mut s = settings(Mode::Duplex);
    s.duplex_model_dir.clear();
    let mut h = harness(s);
    h.run_steps(2);
    h.get_by_label_contains("Welcome to Parley");
    let text = h.state().models.first_run_text(Mode::Duplex);
    // Shown as it is.
    h.get_by_label(&text);
    assert!(text.contains("moshiko-bf16"), "{text}");
    assert!(
        text.contains("GB") || text.contains("is downloaded"),
        "says neither the size nor that it is there: {text}"
    );
    // Every duplex preset of the registry is listed with its state.
    h.get_by_label("moshiko-bf16");
    h.get_by_label("moshika-bf16");
    h.get_by_label("moshiko-q8");
}

/// The listen presets say which model detects the end of a turn.
#[test]
fn the_model_manager_says_which_listen_model_detects_the_end_of_a_turn() {
    let mut s = settings(Mode::Listen);
    s.listen_model_dir.clear();
    let mut h = harness(s);
    h.run_steps(2);
    h.get_by_label("stt-1b-en_fr");
    h.get_by_label("stt-1b-en_fr-pytorch");
    // stt-1b-en_fr (the -candle repository) has the head; the plain one and the 2.6B do not.
    assert_eq!(h.get_all_by_label("end of turn").count(), 1);
    assert_eq!(h.get_all_by_label("no end of turn").count(), 2);
}

/// The model manager lists the speech model and each registry voice with its repository
/// folder.
#[test]
fn the_model_manager_lists_the_voices() {
    let mut h = harness(settings(Mode::Listen));
    h.run_steps(2);
    h.get_by_label("tts-1.6b-en_fr");
    h.get_by_label("tts-voices");
    for (name, folder) in [
        ("ex03-ex01_happy_001_channel1_334s", "expresso"),
        ("freeform_speech_01", "ears/p004"),
        ("robert", "voice-donations"),
    ] {
        h.get_by_label(name);
        h.get_by_label(folder);
    }
}

/// Renders the window mid-conversation (wgpu: lavapipe in CI); with PARLEY_SCREENSHOT set,
/// writes it to docs/screenshot.png for the README.
#[test]
fn the_window_renders_mid_conversation() {
    let mut h = Harness::builder()
        .with_size([1100.0, 720.0])
        .wgpu()
        .build_eframe(|cc| ParleyApp::with_settings(cc, settings(Mode::Duplex)));
    h.step();
    h.get_by_label("Start").click();
    run_until(&mut h, "a reply", |a| {
        a.conversation
            .iter()
            .filter(|i| matches!(i, Item::Model { text, .. } if text.len() > 20))
            .count()
            > 0
            && a.metrics.len() > 60
    });
    let image = match h.render() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("skipping the render: {e}");
            return;
        }
    };
    assert_eq!((image.width(), image.height()), (1100, 720));
    // Not blank: many distinct colours.
    let distinct: std::collections::HashSet<[u8; 4]> = image.pixels().map(|p| p.0).collect();
    assert!(distinct.len() > 50, "{} colours", distinct.len());
    if std::env::var_os("PARLEY_SCREENSHOT").is_some() {
        image
            .save(root().join("docs/screenshot.png"))
            .expect("save the screenshot");
    }
}

/// The first-run path: a preset downloaded from the window (a local stand-in for the Hub
/// serving the tiny STT fixture under kyutai/stt-1b-en_fr's file names), with progress,
/// then chosen as the listen model.
#[test]
fn a_preset_downloads_from_the_window_and_is_used() {
    use fake_hub::{FakeFile, FakeHub};
    use parley_engine::hub::{Hub, HubConfig};
    let fixture =
        |n: &str| std::fs::read(root().join("tests/fixtures/stt-tiny").join(n)).expect("fixture");
    let server = FakeHub::start();
    server.add_repo(
        "kyutai/stt-1b-en_fr-candle",
        "095e38f6242006a93c2541149b181988397f5c7c",
        vec![
            FakeFile::new("config.json", fixture("config.json")),
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
    // Interrupted once, part way through the model: the window's pull resumes it.
    server.truncate_next("model.safetensors", 5000);
    let home = std::env::temp_dir().join(format!("parley-ui-hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let mut cfg = HubConfig::new(home.join("hub"), server.url.clone());
    cfg.connect_timeout = Duration::from_secs(5);
    cfg.read_timeout = Duration::from_secs(10);
    let hub = Hub::new(cfg).expect("hub");

    let mut s = settings(Mode::Listen);
    s.listen_model_dir.clear();
    let mut h = Harness::builder()
        .with_size([1100.0, 900.0])
        .build_eframe(move |cc| {
            let mut app = ParleyApp::with_settings(cc, s);
            app.models = super::models::Manager::with_hub(Ok(hub));
            app
        });
    h.run_steps(2);
    h.get_by_label_contains("No listen model yet. Fetch stt-1b-en_fr");
    // The listen presets come after the four duplex ones: stt-1b-en_fr's is the fifth.
    h.get_all_by_label("Download")
        .nth(4)
        .expect("stt-1b-en_fr's button")
        .click();
    run_until(&mut h, "the download", |a| {
        !a.settings.listen_model_dir.is_empty() || !a.problems.is_empty()
    });
    assert!(h.state().problems.is_empty(), "{:?}", h.state().problems);
    let dir = PathBuf::from(&h.state().settings.listen_model_dir);
    assert!(dir.join("model.safetensors").is_file(), "{}", dir.display());
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).expect("model"),
        fixture("model.safetensors")
    );
    // Resumed with a Range request after the cut.
    assert!(
        server.log().iter().any(|r| r
            .range
            .as_deref()
            .is_some_and(|x| x.starts_with("bytes=5000-"))),
        "{:?}",
        server.log()
    );
    run_until(&mut h, "the downloaded state", |a| {
        a.models
            .first_run_text(Mode::Listen)
            .contains("is downloaded")
    });
    h.get_by_label("(in use)");
    let _ = std::fs::remove_dir_all(&home);
}

/// Cascade mode in the window: the fixture STT hears (silence here), the test LLM
/// (SmolLM2-135M) answers a typed turn, the fixture TTS says it; the reply and its latency
/// show, and a second session reuses the loaded models.
#[test]
fn cascade_mode_answers_a_typed_turn() {
    let Some(llm) = parley_engine::llm::test_llm() else {
        return;
    };
    // 30 s of silence played at real-time pace: the session runs while the reply comes.
    let silence =
        std::env::temp_dir().join(format!("parley-ui-silence-{}.wav", std::process::id()));
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 24_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&silence, spec).expect("wav");
    for _ in 0..24_000 * 30 {
        w.write_sample(0i16).expect("sample");
    }
    w.finalize().expect("wav");
    let tts = root().join("tests/fixtures/tts-tiny");
    let mut s = settings(Mode::Listen);
    s.tts_model_dir = tts.display().to_string();
    s.tts_voice = tts.join("voice_a.safetensors").display().to_string();
    s.llm = llm.display().to_string();
    s.input = Input::File {
        path: silence.display().to_string(),
        realtime: true,
    };
    let mut h = harness(s);
    h.step();
    // The LLM presets are offered beside the file field.
    h.get_by_label("llm-qwen2.5-1.5b");
    h.get_by_label("Cascade").click();
    h.step();
    for round in 0..2 {
        h.get_by_label("Start").click();
        run_until(&mut h, "the cascade running", |a| {
            matches!(
                a.status,
                Status::Running {
                    mode: Mode::Cascade,
                    ..
                }
            )
        });
        h.state_mut().typing = "What is the capital of France?".into();
        h.step();
        h.get_by_label("Send").click();
        let replies = round + 1;
        run_until(&mut h, "the spoken reply", |a| {
            a.responses_ms.len() >= replies
        });
        let app = h.state();
        assert!(app.problems.is_empty(), "{:?}", app.problems);
        let reply = app
            .conversation
            .iter()
            .rev()
            .find_map(|i| match i {
                Item::Model {
                    text,
                    after_user_ms,
                } => Some((text.trim().to_string(), *after_user_ms)),
                _ => None,
            })
            .expect("a reply");
        assert!(!reply.0.is_empty() && reply.1.is_some(), "{reply:?}");
        // One item holds the whole reply, whatever the STT heard meanwhile.
        let replies_shown = app
            .conversation
            .iter()
            .filter(|i| matches!(i, Item::Model { .. }))
            .count();
        assert_eq!(replies_shown, replies, "{:?}", app.conversation);
        assert!(app
            .conversation
            .contains(&Item::Typed("What is the capital of France?".into())));
        assert!(
            h.query_all_by_label(&reply.0).next().is_some(),
            "{} is not shown",
            reply.0
        );
        h.get_by_label("Stop").click();
        run_until(&mut h, "the session's end", |a| !a.is_running());
    }
    std::fs::remove_file(&silence).ok();
}
