//! The model manager: the presets of the registry with what is downloaded, downloads with
//! progress and cancel (on the hub's own thread), and the first-run screen that says
//! exactly what to fetch.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use eframe::egui;
use parley_engine::hub::{
    format_bytes, presets, FileState, Hub, PresetMode, PresetStatus, PullHandle, PullOptions,
};
use parley_engine::pipeline::Mode;

use super::settings::Settings;

/// The preset holding the TTS's voices.
const VOICES: &str = "tts-voices";

/// The preset a new user is pointed to for each mode.
pub fn recommended(mode: Mode) -> &'static str {
    match mode {
        Mode::Duplex => "moshiko-bf16",
        Mode::Listen | Mode::Cascade => "stt-1b-en_fr",
    }
}

fn preset_mode(mode: Mode) -> PresetMode {
    match mode {
        Mode::Duplex => PresetMode::Duplex,
        Mode::Listen | Mode::Cascade => PresetMode::Listen,
    }
}

pub struct Manager {
    hub: Result<Hub, String>,
    statuses: HashMap<String, PresetStatus>,
    refreshed: Option<Instant>,
    pulls: HashMap<String, PullHandle>,
    /// Finished downloads' results for the window: (preset, Ok(dir) or the error).
    pub finished: Vec<(String, Result<String, String>)>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Manager")
    }
}

impl Manager {
    pub fn new() -> Self {
        Self::with_hub(Hub::from_env().map_err(|e| e.to_string()))
    }

    /// A manager over a given cache and endpoint (tests point it at a local server).
    pub fn with_hub(hub: Result<Hub, String>) -> Self {
        Self {
            hub,
            statuses: HashMap::new(),
            refreshed: None,
            pulls: HashMap::new(),
            finished: vec![],
        }
    }

    /// Re-reads what is on disk every few seconds (filesystem only, no network), and
    /// collects finished downloads.
    pub fn tick(&mut self) {
        let done: Vec<String> = self
            .pulls
            .iter()
            .filter(|(_, h)| h.is_finished())
            .map(|(n, _)| n.clone())
            .collect();
        for name in done {
            if let Some(h) = self.pulls.remove(&name) {
                let r = h
                    .join()
                    .map(|p| p.display().to_string())
                    .map_err(|e| e.to_string());
                self.finished.push((name, r));
                self.refreshed = None;
            }
        }
        let stale = self
            .refreshed
            .is_none_or(|t| t.elapsed() > Duration::from_secs(3));
        if let (true, Ok(hub)) = (stale, &self.hub) {
            self.statuses = presets()
                .iter()
                .map(|p| (p.name.clone(), hub.status(p)))
                .collect();
            self.refreshed = Some(Instant::now());
        }
    }

    /// Whether preset `name` is wholly downloaded (as of the last look at the cache).
    pub fn is_complete(&self, name: &str) -> bool {
        self.statuses
            .get(name)
            .is_some_and(PresetStatus::is_complete)
    }

    pub fn busy(&self) -> bool {
        !self.pulls.is_empty()
    }

    fn start_pull(&mut self, name: &str) -> Result<(), String> {
        let hub = self.hub.as_ref().map_err(Clone::clone)?;
        let p = parley_engine::hub::preset(name).map_err(|e| e.to_string())?;
        let h = hub
            .spawn_pull(p, PullOptions::default())
            .map_err(|e| e.to_string())?;
        self.pulls.insert(name.to_string(), h);
        Ok(())
    }

    /// The first-run screen's words for `mode`: what to fetch and how big it is.
    pub fn first_run_text(&self, mode: Mode) -> String {
        let name = recommended(mode);
        if self
            .statuses
            .get(name)
            .is_some_and(PresetStatus::is_complete)
        {
            return format!(
                "No {mode} model chosen yet. {name} is downloaded: press Use beside it under Models on the left."
            );
        }
        let size = self
            .statuses
            .get(name)
            .map(|s| (s.bytes_to_fetch, s.bytes_to_fetch_is_estimate))
            .or_else(|| {
                parley_engine::hub::preset(name)
                    .ok()
                    .map(|p| (p.total_bytes(), p.size_is_estimate()))
            });
        let size = match size {
            Some((b, est)) => format!("{}{}", if est { "about " } else { "" }, format_bytes(b)),
            None => "its files".into(),
        };
        format!(
            "No {mode} model yet. Fetch {name} ({size}) with Download under Models on the left, \
             or run `parley models pull {name}`; or enter a local model directory there."
        )
    }

    /// The Models section for `mode`: presets, their state, Download / Cancel / Use.
    pub fn ui(&mut self, ui: &mut egui::Ui, settings: &mut Settings, mode: Mode) -> Option<String> {
        if let Err(e) = &self.hub {
            ui.colored_label(egui::Color32::LIGHT_RED, format!("model cache: {e}"));
        }
        let chosen = match mode {
            Mode::Duplex => &mut settings.duplex_model_dir,
            Mode::Listen | Mode::Cascade => &mut settings.listen_model_dir,
        };
        self.presets_ui(ui, preset_mode(mode), chosen, |_| true)
    }

    /// The speech (TTS) model's presets, then the voices of `tts-voices`, each with its
    /// repository path; Use picks one once the voices are downloaded.
    pub fn speech_ui(&mut self, ui: &mut egui::Ui, settings: &mut Settings) -> Option<String> {
        let problem = self.presets_ui(ui, PresetMode::Tts, &mut settings.tts_model_dir, |p| {
            p.name != VOICES
        });
        ui.strong("Voices");
        let problem = self
            .presets_ui(ui, PresetMode::Tts, &mut String::new(), |p| {
                p.name == VOICES
            })
            .or(problem);
        let Ok(preset) = parley_engine::hub::preset(VOICES) else {
            return problem;
        };
        let downloaded = self.is_complete(VOICES);
        for f in &preset.files {
            let stem = f.name.split(".wav").next().unwrap_or(&f.name);
            let name = stem.rsplit('/').next().unwrap_or(stem);
            ui.horizontal_wrapped(|ui| {
                ui.label(name)
                    .on_hover_text(format!("{} in {}", f.name, preset.repo));
                ui.weak(stem.rsplit_once('/').map_or("", |(dir, _)| dir));
                if settings.tts_voice == name {
                    ui.weak("(in use)");
                } else if downloaded && ui.small_button("Use").clicked() {
                    settings.tts_voice = name.to_string();
                }
            });
        }
        problem
    }

    /// The LLM presets for the cascade; Use puts the preset's name in `settings.llm`.
    pub fn llm_ui(&mut self, ui: &mut egui::Ui, settings: &mut Settings) -> Option<String> {
        self.presets_ui(ui, PresetMode::Llm, &mut settings.llm, |_| true)
    }

    /// The presets of `kind` that `keep` accepts: their state, Download / Cancel, and
    /// Use (which sets `chosen` to the downloaded directory, or to the name of an LLM
    /// preset, which `--llm` takes as it is).
    fn presets_ui(
        &mut self,
        ui: &mut egui::Ui,
        kind: PresetMode,
        chosen: &mut String,
        keep: impl Fn(&parley_engine::hub::Preset) -> bool,
    ) -> Option<String> {
        let mut problem = None;
        for p in presets().iter().filter(|p| p.mode == kind && keep(p)) {
            ui.horizontal_wrapped(|ui| {
                ui.label(&p.name)
                    .on_hover_text(format!("{} ({})", p.title, p.repo));
                if p.mode == PresetMode::Listen {
                    if p.end_of_turn {
                        ui.weak("end of turn").on_hover_text(
                            "its semantic end-of-turn head says when you have finished",
                        );
                    } else {
                        ui.weak("no end of turn").on_hover_text(
                            "transcripts only: this checkpoint has no end-of-turn head",
                        );
                    }
                }
                if !p.supported {
                    ui.weak("not supported")
                        .on_hover_text(p.unsupported_reason.clone().unwrap_or_default());
                    return;
                }
                if let Some(h) = self.pulls.get(&p.name) {
                    let (done, total, file) = h
                        .latest()
                        .map(|g| (g.bytes_done, g.bytes_total.max(1), g.file))
                        .unwrap_or((0, p.total_bytes().max(1), String::new()));
                    ui.add(
                        egui::ProgressBar::new(done as f32 / total as f32)
                            .desired_width(120.0)
                            .text(format!("{} / {}", format_bytes(done), format_bytes(total))),
                    )
                    .on_hover_text(file);
                    if ui.small_button("Cancel").clicked() {
                        h.cancel();
                    }
                    return;
                }
                match self.statuses.get(&p.name) {
                    Some(s) if s.is_complete() => {
                        ui.weak(format!("downloaded, {}", format_bytes(s.bytes_present())));
                        if let Some(dir) = &s.local_dir {
                            let dir = if p.mode == PresetMode::Llm {
                                p.name.clone()
                            } else {
                                dir.display().to_string()
                            };
                            if p.name == VOICES {
                                // Voices are chosen one by one below.
                            } else if *chosen == dir {
                                ui.weak("(in use)");
                            } else if ui.small_button("Use").clicked() {
                                *chosen = dir;
                            }
                        }
                    }
                    Some(s) => {
                        let partial = s.files.iter().any(|f| {
                            matches!(f.state, FileState::Partial { .. })
                                || matches!(f.state, FileState::Present { .. })
                        });
                        ui.weak(format!(
                            "{} {}{}",
                            if partial {
                                "partly downloaded,"
                            } else {
                                "not downloaded,"
                            },
                            if s.bytes_to_fetch_is_estimate {
                                "about "
                            } else {
                                ""
                            },
                            format_bytes(s.bytes_to_fetch)
                        ));
                        if ui
                            .small_button(if partial { "Resume" } else { "Download" })
                            .clicked()
                        {
                            if let Err(e) = self.start_pull(&p.name) {
                                problem = Some(e);
                            }
                        }
                    }
                    None => {
                        ui.weak(format_bytes(p.total_bytes()));
                    }
                }
            });
        }
        problem
    }
}
