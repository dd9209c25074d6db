//! The desktop window (eframe + egui): the conversation, live levels and waveforms, mode
//! and device choices, the latency panel, and errors with what to do about them. The
//! engine runs on its own threads ([`engine`]); `ui` only drains what has arrived and
//! never blocks.

pub mod engine;
pub mod models;
pub mod settings;

use std::collections::VecDeque;
use std::path::Path;
use std::time::Instant;

use eframe::egui;
use parley_engine::audio::device::DeviceList;
use parley_engine::audio::echo::AecMode;
use parley_engine::pipeline::{Event, FrameMetrics, Mode, Speaker, TurnSource};

use engine::{Command, Engine, FromEngine, Status};
use settings::{Input, Settings};

/// Seconds of waveform shown.
const WAVE_S: usize = 6;
/// Peak values per 80 ms frame in [`Event::Levels`].
const PEAKS_PER_FRAME: usize = 40;

/// One entry of the conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// The user's speech (listen mode): final words with their times, then the text not
    /// yet confirmed.
    User {
        words: Vec<(String, f64, f64)>,
        partial: Vec<(u64, String)>,
    },
    /// What the model said (duplex mode), and how long after the user it started.
    Model {
        text: String,
        after_user_ms: Option<f64>,
    },
    /// A turn the user typed (cascade mode).
    Typed(String),
    /// A turn marker.
    Marker(String),
}

#[derive(Debug)]
pub struct ParleyApp {
    pub settings: Settings,
    engine: Engine,
    pub status: Status,
    pub conversation: Vec<Item>,
    /// What went wrong, and what to do.
    pub problems: Vec<(String, String)>,
    wave_in: VecDeque<f32>,
    wave_out: VecDeque<f32>,
    pub metrics: VecDeque<FrameMetrics>,
    responses_ms: Vec<f64>,
    /// The turn-taking stage says the user is speaking.
    pub user_speaking: bool,
    underruns: u64,
    /// Echo cancellation's CPU for the latest frame, while it runs.
    aec_ms: Option<f64>,
    deadline_misses: u64,
    devices: Option<DeviceList>,
    adapters: Vec<String>,
    started: Instant,
    first_frame_reported: bool,
    last_output_peak: f32,
    models: models::Manager,
    /// What the user is typing (cascade mode).
    pub typing: String,
    /// The cascade's reply being spoken: its place in the conversation, so its words
    /// stay together while the user's partial text comes and goes.
    open_reply: Option<usize>,
}

/// How the conversation names what ended a turn.
fn turn_source_label(s: TurnSource) -> &'static str {
    match s {
        TurnSource::Vad => "silence, Silero VAD",
        TurnSource::Energy => "silence, loudness",
        TurnSource::SmartTurn => "Smart Turn",
        TurnSource::SttHead => "the STT's end-of-turn head",
        TurnSource::Silence => "long pause",
    }
}

/// When the process started, for the start-up time the window reports.
static PROCESS_START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Records the process's start (call first thing in `main`).
pub fn mark_process_start() {
    let _ = PROCESS_START.set(Instant::now());
}

impl ParleyApp {
    /// The app with the settings stored by the last run (or the defaults).
    pub fn new(cc: &eframe::CreationContext<'_>) -> Self {
        let settings = cc
            .storage
            .and_then(|s| eframe::get_value::<Settings>(s, Settings::KEY))
            .unwrap_or_default();
        Self::with_settings(cc, settings)
    }

    pub fn with_settings(cc: &eframe::CreationContext<'_>, settings: Settings) -> Self {
        let ctx = cc.egui_ctx.clone();
        let engine = Engine::spawn(move || ctx.request_repaint());
        engine
            .muted
            .store(settings.muted, std::sync::atomic::Ordering::Relaxed);
        engine.send(Command::Probe);
        Self {
            settings,
            engine,
            status: Status::Idle,
            conversation: vec![],
            problems: vec![],
            wave_in: VecDeque::new(),
            wave_out: VecDeque::new(),
            metrics: VecDeque::new(),
            responses_ms: vec![],
            user_speaking: false,
            underruns: 0,
            aec_ms: None,
            deadline_misses: 0,
            devices: None,
            adapters: vec![],
            started: PROCESS_START.get().copied().unwrap_or_else(Instant::now),
            first_frame_reported: false,
            last_output_peak: 0.0,
            models: models::Manager::new(),
            typing: String::new(),
            open_reply: None,
        }
    }

    fn start(&mut self) {
        self.problems.clear();
        self.engine
            .send(Command::Start(Box::new(self.settings.clone())));
    }

    fn reset(&mut self) {
        self.open_reply = None;
        self.conversation.clear();
        self.metrics.clear();
        self.responses_ms.clear();
        self.wave_in.clear();
        self.wave_out.clear();
        self.underruns = 0;
        self.aec_ms = None;
        self.deadline_misses = 0;
    }

    pub fn is_running(&self) -> bool {
        matches!(self.status, Status::Running { .. } | Status::Loading(_))
    }

    fn handle(&mut self, m: FromEngine) {
        match m {
            FromEngine::Status(s) => self.status = s,
            FromEngine::Problem { what, hint } => self.problems.push((what, hint)),
            FromEngine::Devices(d) => self.devices = Some(*d),
            FromEngine::Adapters(a) => self.adapters = a,
            FromEngine::Event(e) => self.event(e),
        }
    }

    fn user_item(&mut self) -> &mut Item {
        if !matches!(self.conversation.last(), Some(Item::User { .. })) {
            self.conversation.push(Item::User {
                words: vec![],
                partial: vec![],
            });
        }
        let n = self.conversation.len() - 1;
        &mut self.conversation[n]
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::Started { .. } => {}
            Event::TextDelta {
                speaker,
                text,
                frame,
            } => match speaker {
                Speaker::User => {
                    if let Item::User { partial, .. } = self.user_item() {
                        partial.push((frame, text));
                    }
                }
                Speaker::Assistant => {
                    let open = self.open_reply.and_then(|i| self.conversation.get_mut(i));
                    match open {
                        Some(Item::Model { text: t, .. }) => t.push_str(&text),
                        _ => match self.conversation.last_mut() {
                            Some(Item::Model { text: t, .. }) => t.push_str(&text),
                            _ => self.conversation.push(Item::Model {
                                text,
                                after_user_ms: None,
                            }),
                        },
                    }
                }
            },
            Event::Word {
                text,
                start_s,
                end_s,
                frame,
                ..
            } => {
                if let Item::User { words, partial } = self.user_item() {
                    words.push((text, start_s, end_s));
                    // The text these words confirm is no longer partial.
                    partial.retain(|(f, _)| *f > frame);
                }
            }
            Event::TurnEnd {
                source,
                probability,
                ..
            } => self.conversation.push(Item::Marker(format!(
                "end of turn ({}, p = {probability:.2})",
                turn_source_label(source)
            ))),
            Event::SpeechStarted { .. } => self.user_speaking = true,
            // Each detector's own verdicts are for analysis (headless, the harness).
            Event::TurnSignal { .. } => {}
            Event::SpeechStopped { .. } => self.user_speaking = false,
            Event::Warning { message } => {
                self.problems.push((message, "The session goes on.".into()))
            }
            Event::ReplyCancelled { dropped_frames } => self.conversation.push(Item::Marker(
                format!("reply cancelled ({dropped_frames} frames dropped)"),
            )),
            Event::ResponseStarted { after_user_ms, .. } => {
                if let Some(ms) = after_user_ms {
                    self.responses_ms.push(ms);
                }
                self.conversation.push(Item::Model {
                    text: String::new(),
                    after_user_ms,
                });
                // A cascade reply ends with ResponseDone; a duplex model just speaks on.
                if matches!(
                    self.status,
                    Status::Running {
                        mode: Mode::Cascade,
                        ..
                    }
                ) {
                    self.open_reply = Some(self.conversation.len() - 1);
                }
            }
            Event::Levels { input, output, .. } => {
                self.last_output_peak = output.iter().copied().fold(0.0, f32::max);
                for (w, v) in [(&mut self.wave_in, input), (&mut self.wave_out, output)] {
                    w.extend(v);
                    while w.len() > WAVE_S * 12 * PEAKS_PER_FRAME + PEAKS_PER_FRAME {
                        w.pop_front();
                    }
                }
            }
            // The cascade's reply text comes as the words are spoken (TextDelta).
            // The user's words are shown as they come (and a typed turn when sent).
            Event::Audio { .. } | Event::ResponseText { .. } | Event::UserTurn { .. } => {}
            Event::ResponseDone {
                cancelled, timing, ..
            } => {
                // The cascade's latency: end of turn to the first audio at the speaker.
                let heard = timing.first_audio_played_ms.or(timing.tts_first_audio_ms);
                if let Some(ms) = heard {
                    self.responses_ms.push(ms);
                }
                let open = self.open_reply.take();
                if let Some(Item::Model { after_user_ms, .. }) =
                    open.and_then(|i| self.conversation.get_mut(i))
                {
                    *after_user_ms = heard;
                }
                if cancelled {
                    self.conversation
                        .push(Item::Marker("reply cut short: you spoke".into()));
                }
            }
            Event::Metrics(m) => {
                self.underruns = m.output_underruns;
                self.aec_ms = m.aec_ms;
                self.deadline_misses += u64::from(m.deadline_missed);
                self.metrics.push_back(m);
                while self.metrics.len() > 150 {
                    self.metrics.pop_front();
                }
            }
            Event::Error { message, fatal } => self.problems.push((
                message,
                if fatal {
                    "The session stopped. Fix the cause and press Start.".into()
                } else {
                    "The session goes on.".into()
                },
            )),
            Event::Ended { .. } => self.open_reply = None,
        }
    }

    fn top_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.heading("Parley");
            ui.separator();
            let before = self.settings.mode;
            ui.selectable_value(&mut self.settings.mode, Mode::Duplex, "Duplex")
                .on_hover_text("Mimi + a Moshi-style model: it listens and speaks at once");
            ui.selectable_value(&mut self.settings.mode, Mode::Listen, "Listen")
                .on_hover_text("Mimi + a speech-to-text model: live transcript");
            ui.selectable_value(&mut self.settings.mode, Mode::Cascade, "Cascade")
                .on_hover_text(
                    "speech to text, then an LLM of your choice, then text to speech: \
                     it listens, thinks and answers in a voice",
                );
            if self.settings.mode != before && self.is_running() {
                // Switching mode restarts the session with the other model.
                self.start();
            }
            ui.separator();
            if self.is_running() {
                if ui.button("Stop").clicked() {
                    self.engine.send(Command::Stop);
                }
            } else if ui.button("Start").clicked() {
                self.start();
            }
            if ui
                .button("Reset")
                .on_hover_text("Clear the conversation and start afresh")
                .clicked()
            {
                self.reset();
                if self.is_running() {
                    self.start();
                }
            }
            let mut muted = self.settings.muted;
            if ui.toggle_value(&mut muted, "Mute").changed() {
                self.settings.muted = muted;
                self.engine
                    .muted
                    .store(muted, std::sync::atomic::Ordering::Relaxed);
            }
            ui.separator();
            let (text, color) = match &self.status {
                Status::Idle => ("Stopped".to_string(), egui::Color32::GRAY),
                Status::Stopped => ("Stopped".to_string(), egui::Color32::GRAY),
                Status::Loading(what) => (format!("Loading: {what}"), egui::Color32::YELLOW),
                Status::Running { mode, .. } => {
                    if *mode != Mode::Listen && self.last_output_peak > 0.05 {
                        (
                            "Speaking".to_string(),
                            egui::Color32::from_rgb(80, 160, 255),
                        )
                    } else {
                        (
                            "Listening".to_string(),
                            egui::Color32::from_rgb(90, 200, 90),
                        )
                    }
                }
            };
            let (dot, _) = ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
            ui.painter().circle_filled(dot.center(), 5.0, color);
            ui.colored_label(color, text);
            if let Status::Running { device, .. } = &self.status {
                ui.weak(device.trim_start_matches("device: "));
            }
        });
    }

    fn settings_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("Models");
        for (mode, label) in [
            (Mode::Duplex, "Duplex model"),
            (Mode::Listen, "Listen model"),
        ] {
            ui.strong(label);
            if let Some(e) = self.models.ui(ui, &mut self.settings, mode) {
                self.problems.push((
                    format!("download: {e}"),
                    "Check the network, or enter a local model directory.".into(),
                ));
            }
            let dir = match mode {
                Mode::Duplex => &mut self.settings.duplex_model_dir,
                Mode::Listen | Mode::Cascade => &mut self.settings.listen_model_dir,
            };
            ui.add(
                egui::TextEdit::singleline(dir)
                    .hint_text("model directory")
                    .desired_width(f32::INFINITY),
            );
        }
        ui.weak("Or a local directory laid out like the Kyutai repository.");
        // The speaking model (the cascade's voice) and its voices.
        ui.strong("Speech model");
        if let Some(e) = self.models.speech_ui(ui, &mut self.settings) {
            self.problems.push((
                format!("download: {e}"),
                "Check the network, or enter a local model directory.".into(),
            ));
        }
        ui.add(
            egui::TextEdit::singleline(&mut self.settings.tts_model_dir)
                .hint_text("speech model directory")
                .desired_width(f32::INFINITY),
        );
        ui.add(
            egui::TextEdit::singleline(&mut self.settings.tts_voice)
                .hint_text("voice: a name above or a .safetensors file")
                .desired_width(f32::INFINITY),
        );
        self.cascade_settings(ui);
        ui.separator();
        ui.heading("Compute");
        egui::ComboBox::from_label("Device")
            .selected_text(self.settings.device.clone())
            .show_ui(ui, |ui| {
                for d in ["auto", "gpu", "cpu"] {
                    ui.selectable_value(&mut self.settings.device, d.to_string(), d);
                }
            });
        egui::ComboBox::from_label("Weights")
            .selected_text(self.settings.precision.clone())
            .show_ui(ui, |ui| {
                // q6 and q5 are CPU formats (the GPU refuses them by name when loading).
                for d in ["auto", "f32", "bf16", "f16", "q8_0", "q6", "q5", "q4"] {
                    ui.selectable_value(&mut self.settings.precision, d.to_string(), d);
                }
            });
        for a in &self.adapters {
            ui.weak(a);
        }
        ui.separator();
        ui.heading("Audio");
        let current = match &self.settings.input {
            Input::Device(None) => "default microphone".to_string(),
            Input::Device(Some(n)) => n.clone(),
            Input::File { path, .. } => format!(
                "file: {}",
                Path::new(path)
                    .file_name()
                    .map_or_else(|| path.clone(), |n| n.to_string_lossy().into_owned())
            ),
        };
        let inputs: Vec<String> = self
            .devices
            .as_ref()
            .map(|d| d.inputs.iter().map(|i| i.name.clone()).collect())
            .unwrap_or_default();
        egui::ComboBox::from_label("Input")
            .width(170.0)
            .selected_text(current)
            .show_ui(ui, |ui| {
                ui.selectable_value(
                    &mut self.settings.input,
                    Input::Device(None),
                    "default microphone",
                );
                for n in &inputs {
                    ui.selectable_value(
                        &mut self.settings.input,
                        Input::Device(Some(n.clone())),
                        n,
                    );
                }
            });
        let outputs: Vec<String> = self
            .devices
            .as_ref()
            .map(|d| d.outputs.iter().map(|i| i.name.clone()).collect())
            .unwrap_or_default();
        egui::ComboBox::from_label("Output")
            .width(170.0)
            .selected_text(
                self.settings
                    .output_device
                    .clone()
                    .unwrap_or_else(|| "default speakers".into()),
            )
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut self.settings.output_device, None, "default speakers");
                for n in &outputs {
                    ui.selectable_value(&mut self.settings.output_device, Some(n.clone()), n);
                }
            });
        ui.checkbox(&mut self.settings.play_output, "Play the model's voice");
        egui::ComboBox::from_label("Echo cancellation")
            .width(170.0)
            .selected_text(self.settings.echo_cancellation.as_str())
            .show_ui(ui, |ui| {
                for m in AecMode::ALL {
                    ui.selectable_value(&mut self.settings.echo_cancellation, m, m.as_str());
                }
            })
            .response
            .on_hover_text(
                "Removes Parley's own voice from the microphone, so that on speakers it \
                 does not hear itself. auto: on unless the output device's name says \
                 headset or headphones.",
            );
        if ui.button("Refresh devices").clicked() {
            self.engine.send(Command::Probe);
        }
        ui.weak("Changes apply at the next Start.");
    }

    /// The cascade's LLM (a preset, a GGUF file or an endpoint) and persona; it listens
    /// with the listen model and speaks with the speech model above.
    fn cascade_settings(&mut self, ui: &mut egui::Ui) {
        ui.strong("Cascade LLM");
        if let Some(e) = self.models.llm_ui(ui, &mut self.settings) {
            self.problems.push((
                format!("download: {e}"),
                "Check the network, or enter a GGUF file or an endpoint's URL.".into(),
            ));
        }
        ui.add(
            egui::TextEdit::singleline(&mut self.settings.llm)
                .hint_text("LLM: a preset above, a .gguf file or http://host/v1")
                .desired_width(f32::INFINITY),
        );
        if self.settings.llm.trim().starts_with("http") {
            ui.add(
                egui::TextEdit::singleline(&mut self.settings.llm_model)
                    .hint_text("the model the endpoint serves")
                    .desired_width(f32::INFINITY),
            );
        }
        ui.label("Persona");
        ui.add(
            egui::TextEdit::multiline(&mut self.settings.persona)
                .desired_rows(3)
                .desired_width(f32::INFINITY),
        )
        .on_hover_text("the LLM's system prompt; the default keeps answers short and speakable");
    }

    /// Sends what was typed as the user's turn (cascade mode).
    fn send_typed(&mut self) {
        let text = self.typing.trim().to_string();
        if text.is_empty() {
            return;
        }
        self.typing.clear();
        self.conversation.push(Item::Typed(text.clone()));
        self.engine.send(Command::Say(text));
    }

    fn latency_panel(&mut self, ui: &mut egui::Ui) {
        use egui_plot::{Bar, BarChart, HLine, Plot};
        ui.horizontal(|ui| {
            ui.strong("Latency");
            let last = self.metrics.back();
            if let Some(m) = last {
                let parts: Vec<String> = m
                    .stages
                    .iter()
                    .map(|s| format!("{} {:.1} ms", s.stage, s.ms))
                    .collect();
                ui.label(format!("last frame: {}", parts.join(", ")));
            }
            ui.separator();
            ui.label(if self.user_speaking {
                "you: speaking"
            } else {
                "you: silent"
            });
            ui.separator();
            ui.label(format!("deadline misses: {}", self.deadline_misses));
            ui.separator();
            ui.label(format!("underruns: {}", self.underruns));
            if let Some(ms) = self.aec_ms {
                ui.label(format!("echo cancellation: {ms:.1} ms/frame"));
            }
            ui.separator();
            if self.responses_ms.is_empty() {
                ui.label("response latency: no reply yet");
            } else {
                // Each turn's, the latest last (the last eight).
                let turns: Vec<String> = self
                    .responses_ms
                    .iter()
                    .rev()
                    .take(8)
                    .rev()
                    .map(|ms| format!("{ms:.0}"))
                    .collect();
                ui.label(format!(
                    "response latency per turn (ms): {}",
                    turns.join(", ")
                ))
                .on_hover_text(format!("{} turns so far", self.responses_ms.len()));
            }
        });
        let bars: Vec<Bar> = self
            .metrics
            .iter()
            .map(|m| {
                let total = m.compute_ms();
                let color = if total > 80.0 {
                    egui::Color32::from_rgb(230, 80, 80)
                } else {
                    egui::Color32::from_rgb(90, 160, 230)
                };
                Bar::new(m.frame as f64, total).fill(color).width(0.9)
            })
            .collect();
        Plot::new("compute per frame")
            .height(110.0)
            .include_y(0.0)
            .include_y(100.0)
            .allow_scroll(false)
            .allow_drag(false)
            .y_axis_label("ms / frame")
            .show(ui, |p| {
                p.bar_chart(BarChart::new("compute (encode + LM + decode)", bars));
                p.hline(HLine::new("80 ms budget", 80.0).color(egui::Color32::RED));
            });
    }

    fn waveform(ui: &mut egui::Ui, label: &str, w: &VecDeque<f32>, color: egui::Color32) {
        ui.horizontal(|ui| {
            ui.label(label);
            let level = w
                .iter()
                .rev()
                .take(PEAKS_PER_FRAME)
                .copied()
                .fold(0.0, f32::max);
            // The level meter: the last 80 ms's peak, green to red.
            let (meter, resp) =
                ui.allocate_exact_size(egui::vec2(80.0, 14.0), egui::Sense::hover());
            let p = ui.painter_at(meter);
            p.rect_filled(meter, 3.0, ui.visuals().extreme_bg_color);
            let mut fill = meter;
            fill.set_width(meter.width() * level.clamp(0.0, 1.0));
            let c = if level > 0.9 {
                egui::Color32::from_rgb(230, 80, 80)
            } else {
                color
            };
            p.rect_filled(fill, 3.0, c);
            resp.on_hover_text("peak level of the last 80 ms");
            let (rect, _) = ui
                .allocate_exact_size(egui::vec2(ui.available_width(), 40.0), egui::Sense::hover());
            let p = ui.painter_at(rect);
            p.rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
            let n = WAVE_S * 12 * PEAKS_PER_FRAME;
            let skip = w.len().saturating_sub(n);
            for (i, v) in w.iter().skip(skip).enumerate() {
                let x = rect.left() + rect.width() * (i as f32 / n as f32);
                let h = v.clamp(0.0, 1.0) * rect.height() * 0.5;
                p.line_segment(
                    [
                        egui::pos2(x, rect.center().y - h),
                        egui::pos2(x, rect.center().y + h),
                    ],
                    egui::Stroke::new(1.0, color),
                );
            }
        });
    }

    fn conversation_view(&mut self, ui: &mut egui::Ui) {
        egui::ScrollArea::vertical()
            .stick_to_bottom(true)
            .auto_shrink([false, false])
            .show(ui, |ui| {
                if self.conversation.is_empty() {
                    ui.weak(match (&self.status, self.settings.mode) {
                        (Status::Running { .. }, Mode::Listen) => {
                            "Listening: speak and your words appear here."
                        }
                        (Status::Running { .. }, Mode::Duplex) => {
                            "Listening: speak, and Parley answers."
                        }
                        (Status::Running { .. }, Mode::Cascade) => {
                            "Listening: speak (or type below), and Parley answers when you have finished."
                        }
                        _ => "Press Start to talk.",
                    });
                }
                for item in &self.conversation {
                    match item {
                        Item::User { words, partial } => {
                            ui.horizontal_wrapped(|ui| {
                                ui.strong("You:");
                                for (w, a, b) in words {
                                    ui.label(w.as_str())
                                        .on_hover_text(format!("{a:.2} s to {b:.2} s"));
                                }
                                let pending: String =
                                    partial.iter().map(|(_, t)| t.as_str()).collect();
                                if !pending.trim().is_empty() {
                                    ui.label(egui::RichText::new(pending.trim()).italics().weak())
                                        .on_hover_text("not final yet");
                                }
                            });
                        }
                        Item::Model {
                            text,
                            after_user_ms,
                        } => {
                            ui.horizontal_wrapped(|ui| {
                                ui.strong("Parley:");
                                let r = ui.label(text.trim());
                                if let Some(ms) = after_user_ms {
                                    r.on_hover_text(format!(
                                        "started {ms:.0} ms after you stopped"
                                    ));
                                }
                            });
                        }
                        Item::Typed(text) => {
                            ui.horizontal_wrapped(|ui| {
                                ui.strong("You:");
                                ui.label(text.as_str()).on_hover_text("typed");
                            });
                        }
                        Item::Marker(m) => {
                            ui.vertical_centered(|ui| ui.weak(format!("-- {m} --")));
                        }
                    }
                }
            });
    }
}

impl eframe::App for ParleyApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        for m in self.engine.drain() {
            self.handle(m);
        }
        self.models.tick();
        for (name, r) in std::mem::take(&mut self.models.finished) {
            match r {
                Ok(dir) => {
                    let preset_mode = parley_engine::hub::preset(&name).map(|p| p.mode);
                    // An LLM preset is named, not given by its directory.
                    let (slot, value) = match preset_mode {
                        Ok(parley_engine::hub::PresetMode::Duplex) => {
                            (Some(&mut self.settings.duplex_model_dir), dir)
                        }
                        Ok(parley_engine::hub::PresetMode::Listen) => {
                            (Some(&mut self.settings.listen_model_dir), dir)
                        }
                        Ok(parley_engine::hub::PresetMode::Llm) => {
                            (Some(&mut self.settings.llm), name.clone())
                        }
                        _ => (None, dir),
                    };
                    if let Some(slot) = slot {
                        if slot.trim().is_empty() {
                            *slot = value;
                        }
                    }
                }
                Err(e) => self.problems.push((
                    format!("downloading {name}: {e}"),
                    "Check the network and press Resume: what was fetched is kept.".into(),
                )),
            }
        }
        if self.models.busy() {
            ui.ctx()
                .request_repaint_after(std::time::Duration::from_millis(200));
        }
        if !self.first_frame_reported {
            self.first_frame_reported = true;
            eprintln!(
                "parley: window ready {} ms after start-up",
                self.started.elapsed().as_millis()
            );
        }
        egui::Panel::top("top").show(ui, |ui| self.top_bar(ui));
        egui::Panel::left("settings")
            .resizable(true)
            .default_size(260.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.settings_panel(ui));
            });
        egui::Panel::bottom("latency").show(ui, |ui| self.latency_panel(ui));
        egui::CentralPanel::default().show(ui, |ui| {
            let mut dismiss = None;
            for (i, (what, hint)) in self.problems.iter().enumerate() {
                egui::Frame::group(ui.style())
                    .fill(egui::Color32::from_rgb(90, 30, 30))
                    .show(ui, |ui| {
                        ui.set_width(ui.available_width());
                        ui.colored_label(egui::Color32::from_rgb(255, 200, 200), what);
                        ui.label(hint);
                        if ui.small_button("Dismiss").clicked() {
                            dismiss = Some(i);
                        }
                    });
            }
            if let Some(i) = dismiss {
                self.problems.remove(i);
            }
            if self.settings.model_dir().trim().is_empty() && !self.is_running() {
                egui::Frame::group(ui.style()).show(ui, |ui| {
                    ui.set_width(ui.available_width());
                    ui.heading("Welcome to Parley");
                    ui.label(self.models.first_run_text(self.settings.mode));
                });
            }
            Self::waveform(
                ui,
                "In ",
                &self.wave_in,
                egui::Color32::from_rgb(90, 160, 230),
            );
            Self::waveform(
                ui,
                "Out",
                &self.wave_out,
                egui::Color32::from_rgb(90, 200, 90),
            );
            ui.separator();
            if self.settings.mode == Mode::Cascade {
                egui::Panel::bottom("typing").show(ui, |ui| {
                    ui.horizontal(|ui| {
                        let edit = ui.add(
                            egui::TextEdit::singleline(&mut self.typing)
                                .hint_text("type to Parley")
                                .desired_width(ui.available_width() - 60.0),
                        );
                        let enter =
                            edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                        if ui.button("Send").clicked() || enter {
                            self.send_typed();
                        }
                    });
                });
            }
            self.conversation_view(ui);
        });
        if self.is_running() {
            // Levels move even when no event arrives (a stalled device shows as flat).
            ui.ctx()
                .request_repaint_after(std::time::Duration::from_millis(100));
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, Settings::KEY, &self.settings);
    }
}

/// Opens the window.
pub fn run() -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Parley")
            .with_inner_size([1100.0, 720.0]),
        ..Default::default()
    };
    eframe::run_native(
        "Parley",
        options,
        Box::new(|cc| Ok(Box::new(ParleyApp::new(cc)))),
    )
    .map_err(|e| anyhow::anyhow!("opening the window: {e}"))
}

#[cfg(test)]
mod tests;
