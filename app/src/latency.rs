//! `parley bench latency`: a recording through the real pipeline on the virtual audio
//! device, and what a person would feel: per-frame compute against the 80 ms budget,
//! word emission and end-of-turn delays, response latency. A JSON report, a table, and a
//! timeline plot.

use crate::out::{out, outln};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use crossbeam_channel::bounded;
use parley_engine::audio::echo::{echo_cancelling, AecMode, AecSettings};
use parley_engine::audio::file::read_audio_24k;
use parley_engine::audio::virtual_device::{
    room_impulse_response, EchoRoom, FileSource, Pace, RecordingSink,
};
use parley_engine::audio::{FrameSink, FrameSource, FRAME_LEN_SAMPLES};
use parley_engine::compute::gpu::DeviceChoice;
use parley_engine::compute::Dtype;
use parley_engine::pipeline::report::{Alignment, LatencyReport, SessionRecord};
use parley_engine::pipeline::{Event, FrameMetrics, Mode, Models, Session, SessionOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PaceArg {
    /// One frame every 80 ms, as a microphone delivers them.
    Realtime,
    /// As fast as the models go.
    Fast,
}

#[derive(Debug, Args)]
pub struct LatencyArgs {
    /// The recording to stream (any format `parley` reads).
    input: PathBuf,
    /// A model directory laid out like a Kyutai repository (the STT's in cascade mode,
    /// where --stt-model-dir says the same).
    #[arg(long, alias = "stt-model-dir", conflicts_with = "preset")]
    model_dir: Option<PathBuf>,
    /// A full-size architecture with random weights instead (stt-1b-en_fr for listen,
    /// moshi-7b for duplex): its timings are real, its words are not.
    #[arg(long)]
    preset: Option<String>,
    /// Accepted with --preset (which always uses random weights).
    #[arg(long)]
    random_weights: bool,
    #[arg(long)]
    mode: Mode,
    /// Word alignment JSON (assets/make_speech.py writes one beside its recording).
    #[arg(long)]
    alignment: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "realtime")]
    pace: PaceArg,
    /// Where to write the JSON report.
    #[arg(long)]
    report: PathBuf,
    /// Where to draw the timeline (PNG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Where to write what the pipeline played (WAV), if anything.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    #[arg(long, alias = "dtype", default_value = "auto")]
    precision: Dtype,
    /// Cascade mode: the speech model, as in `parley headless --mode cascade`.
    #[command(flatten)]
    speech: crate::cascade_args::SpeechArgs,
    /// Cascade mode: the LLM, as in `parley headless --mode cascade`.
    #[command(flatten)]
    llm: crate::cascade_args::LlmArgs,
    /// Cascade mode: the published TTS architecture (tts-1.6b-en_fr) at full size with
    /// random weights, instead of --tts-model-dir: its timings are real, its speech noise.
    #[arg(long, conflicts_with = "tts_model_dir")]
    tts_preset: Option<String>,
    /// Seconds of silence played after the recording (default: 8 in cascade mode, so the
    /// reply to the last turn is heard at the frame clock; 0 otherwise).
    #[arg(long)]
    tail_s: Option<f64>,
    /// The SentencePiece model a --tts-preset reads text with (a TTS repository's
    /// tokenizer, or tests/fixtures/tts-tiny/tokenizer.model).
    #[arg(long)]
    tts_tokenizer: Option<PathBuf>,
    /// A laptop's speakers beside its microphone: what the pipeline plays comes back into
    /// its input through a room's echo path (this delay in ms, a 250 ms decaying tail, at
    /// half the played level), and echo cancellation runs (see --aec).
    #[arg(long)]
    echo_room_ms: Option<f64>,
    /// With --echo-room-ms: on (default) or off (hear what the echo does uncancelled).
    #[arg(long, default_value = "on", requires = "echo_room_ms")]
    aec: AecMode,
}

pub fn run(args: LatencyArgs) -> Result<()> {
    if let Some(ms) = args.echo_room_ms {
        if !(0.0..=1000.0).contains(&ms) || args.mode == Mode::Listen {
            bail!(
                "--echo-room-ms {ms}: the room's delay must be 0-1000 ms, in a mode that \
                 speaks (duplex or cascade)"
            );
        }
    }
    let outputs: Vec<&Path> = [Some(&args.report), args.plot.as_ref(), args.out.as_ref()]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
        .collect();
    let inputs: Vec<&Path> = [
        Some(&args.input),
        args.alignment.as_ref(),
        args.model_dir.as_ref(),
        args.tts_tokenizer.as_ref(),
        args.speech.tts_model_dir.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(PathBuf::as_path)
    .collect();
    parley_engine::outfile::check_outputs(&outputs, &inputs)?;
    if let Some(p) = &args.plot {
        if !p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
            bail!(
                "--plot {}: the plot is a PNG image; give a path ending in .png",
                p.display()
            );
        }
    }
    let mut pcm = read_audio_24k(&args.input)?;
    let tail_s = args
        .tail_s
        .unwrap_or(if args.mode == Mode::Cascade { 8.0 } else { 0.0 });
    if !(0.0..=600.0).contains(&tail_s) {
        bail!("--tail-s {tail_s} is outside 0..=600");
    }
    let recording_s = pcm.len() as f64 / 24_000.0;
    pcm.resize(pcm.len() + (tail_s * 24_000.0) as usize, 0.0);
    let alignment = args
        .alignment
        .as_deref()
        .map(|a| Alignment::load(a, recording_s))
        .transpose()?;
    let mut models = match (&args.model_dir, &args.preset) {
        (Some(dir), None) => Models::load(dir, args.mode, args.device, args.precision, None)
            .context("loading the models")?,
        (None, Some(p)) => Models::random(args.mode, p, args.device, args.precision)?,
        _ => bail!("say which model: --model-dir DIR, or --preset NAME --random-weights"),
    };
    let _ = args.random_weights;
    // The inbox of typed turns is not used: the recording's turns are the user's.
    let _inbox = if args.mode == Mode::Cascade {
        let (c, inbox) = crate::cascade_args::harness_cascade(
            &args.speech,
            &args.llm,
            args.tts_preset.as_deref(),
            args.tts_tokenizer.as_deref(),
            args.device,
            args.precision,
        )
        .context("loading the cascade's LLM and TTS")?;
        eprintln!("cascade: {c:?}; speech: {}", c.speak.description);
        models.cascade = Some(c);
        Some(inbox)
    } else {
        None
    };
    let device = models.device.clone();
    eprintln!("{device}");
    let realtime = args.pace == PaceArg::Realtime;
    // Faster than real time, turn detection must not depend on thread timing.
    models.turn.settings.verdict_in_frame = !realtime;
    let start = Instant::now();
    let source = FileSource::from_pcm_24k(
        pcm.clone(),
        if realtime {
            Pace::RealTime
        } else {
            Pace::Unpaced
        },
    )
    .starting_at(start);
    let sink = RecordingSink::starting_at(start);
    let recording = sink.handle();
    let (tx, rx) = bounded::<Event>(1024);
    let mut opts = SessionOptions::default();
    let (source, sink): (Box<dyn FrameSource>, Box<dyn FrameSink>) = match args.echo_room_ms {
        None => (Box::new(source), Box::new(sink)),
        Some(ms) => {
            let (room_source, room_sink) =
                EchoRoom::new(source, sink, room_impulse_response(ms, 250.0, 0.5), 1);
            if args.aec == AecMode::Off {
                (Box::new(room_source), Box::new(room_sink))
            } else {
                let (source, sink, stats) = echo_cancelling(
                    Box::new(room_source),
                    Box::new(room_sink),
                    AecSettings::default(),
                );
                opts.aec_stats = Some(stats);
                (source, sink)
            }
        }
    };
    let session = Session::start(models, source, sink, tx, opts)?;
    let mut events = vec![];
    for e in rx.iter() {
        if let Event::Error { message, .. } = &e {
            eprintln!("error: {message}");
        }
        let end = matches!(e, Event::Ended { .. });
        events.push(e);
        if end {
            break;
        }
    }
    session.join()?;
    let rec = recording.recording();
    let times: Vec<f64> = rec.frame_times.iter().map(|d| d.as_secs_f64()).collect();
    let record = SessionRecord {
        mode: args.mode,
        realtime,
        events: &events,
        input_24k: &pcm,
        output_24k: &rec.pcm_24k,
        output_times_s: &times,
    };
    let report = LatencyReport::compute(&record, alignment.as_ref(), &device);
    let json = serde_json::to_string_pretty(&report)?;
    parley_engine::outfile::write_atomically(&args.report, |tmp| {
        std::fs::write(tmp, &json).map_err(|e| parley_engine::Error::io(&args.report, e))
    })?;
    out!("{}", report.table());
    outln!("report -> {}", args.report.display());
    if let Some(out) = &args.out {
        rec.write_wav(out)?;
    }
    if let Some(plot) = &args.plot {
        parley_engine::outfile::write_atomically(plot, |tmp| {
            draw(tmp, &record, &report, alignment.as_ref()).map_err(|e| {
                parley_engine::Error::InvalidInput(format!("drawing {}: {e:#}", plot.display()))
            })
        })?;
        outln!("plot -> {}", plot.display());
    }
    Ok(())
}

/// The timeline: input waveform with the aligned words, the emitted words at the time
/// they were felt, the output waveform, and per-frame compute against the budget.
fn draw(
    path: &std::path::Path,
    rec: &SessionRecord,
    report: &LatencyReport,
    alignment: Option<&Alignment>,
) -> Result<()> {
    use plotters::prelude::*;
    // Once per process; a second registration is harmless.
    let _ = plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        epaint_default_fonts::UBUNTU_LIGHT,
    );
    let frame_s = FRAME_LEN_SAMPLES as f64 / 24_000.0;
    let metrics = rec.metrics();
    let t_max = (metrics.len().max(1) as f64 * frame_s).max(rec.input_24k.len() as f64 / 24_000.0);
    let root = BitMapBackend::new(path, (1600, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "{} mode, {} pace, {} | RTF {:.2}, {} deadline misses",
        report.mode,
        report.pace,
        report.device,
        report.compute.real_time_factor,
        report.compute.deadline_misses
    );
    let root = root.titled(&title, ("sans-serif", 22))?;
    let panels = root.split_evenly((4, 1));
    let err = |e: plotters::drawing::DrawingAreaErrorKind<_>| anyhow::anyhow!("{e}");

    // Waveforms as per-pixel min/max envelopes.
    let wave = |area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
                pcm: &[f32],
                caption: &str,
                color: RGBColor|
     -> Result<()> {
        let mut c = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(22)
            .y_label_area_size(45)
            .build_cartesian_2d(0f64..t_max, -1f64..1f64)
            .map_err(err)?;
        c.configure_mesh()
            .disable_mesh()
            .x_desc("s")
            .draw()
            .map_err(err)?;
        let per = (pcm.len() / 1500).max(1);
        c.draw_series(pcm.chunks(per).enumerate().map(|(i, ch)| {
            let t = (i * per) as f64 / 24_000.0;
            let lo = ch.iter().copied().fold(f32::MAX, f32::min) as f64;
            let hi = ch.iter().copied().fold(f32::MIN, f32::max) as f64;
            PathElement::new(vec![(t, lo), (t, hi)], color)
        }))
        .map_err(err)?;
        if let Some(a) = alignment {
            for t in &a.turns {
                c.draw_series(std::iter::once(PathElement::new(
                    vec![(t.end_s, -1.0), (t.end_s, 1.0)],
                    RED.stroke_width(2),
                )))
                .map_err(err)?;
            }
        }
        Ok(())
    };
    wave(
        &panels[0],
        rec.input_24k,
        "input (red: end of each turn)",
        BLUE,
    )?;

    // Words: aligned (top row, at their span) and emitted (bottom row, when felt).
    {
        let mut c = ChartBuilder::on(&panels[1])
            .caption(
                "words: in the audio (top), felt when emitted (bottom)",
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(22)
            .y_label_area_size(45)
            .build_cartesian_2d(0f64..t_max, 0f64..2f64)
            .map_err(err)?;
        c.configure_mesh()
            .disable_mesh()
            .disable_y_axis()
            .draw()
            .map_err(err)?;
        if let Some(a) = alignment {
            for (i, w) in a.words.iter().enumerate() {
                let y = 1.55 + 0.25 * (i % 2) as f64;
                c.draw_series(std::iter::once(Rectangle::new(
                    [(w.start_s, y - 0.1), (w.end_s, y + 0.1)],
                    BLUE.mix(0.2).filled(),
                )))
                .map_err(err)?;
                c.draw_series(std::iter::once(Text::new(
                    w.word.clone(),
                    (w.start_s, y + 0.1),
                    ("sans-serif", 13),
                )))
                .map_err(err)?;
            }
        }
        for (i, w) in report.words.iter().enumerate() {
            let y = 0.3 + 0.3 * (i % 3) as f64;
            c.draw_series(std::iter::once(PathElement::new(
                vec![(w.end_s, 1.45), (w.emitted_s, y + 0.05)],
                BLACK.mix(0.3),
            )))
            .map_err(err)?;
            c.draw_series(std::iter::once(Text::new(
                w.emitted.clone(),
                (w.emitted_s, y + 0.15),
                ("sans-serif", 13).into_font().color(&RED),
            )))
            .map_err(err)?;
        }
        {
            // Every emitted text piece at its felt time, faintly.
            let felt = |f: u64| rec.felt_s(&metrics, f);
            for (i, e) in rec.events.iter().enumerate() {
                if let Event::TextDelta { text, frame, .. } = e {
                    let y = 0.3 + 0.3 * (i % 3) as f64;
                    c.draw_series(std::iter::once(Text::new(
                        text.clone(),
                        (felt(*frame), y),
                        ("sans-serif", 11).into_font().color(&RED.mix(0.45)),
                    )))
                    .map_err(err)?;
                }
            }
        }
    }
    let out_caption = if report.mode == Mode::Listen {
        "output (listen mode: none)"
    } else {
        "output (what the model said)"
    };
    wave(&panels[2], rec.output_24k, out_caption, GREEN)?;

    // Compute per frame, stacked, against the 80 ms budget.
    {
        let peak = metrics
            .iter()
            .map(FrameMetrics::compute_ms)
            .fold(100.0, f64::max);
        let mut c = ChartBuilder::on(&panels[3])
            .caption(
                "compute per frame (ms), stages stacked in pipeline order; red: 80 ms budget",
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(22)
            .y_label_area_size(45)
            .build_cartesian_2d(0f64..t_max, 0f64..peak * 1.1)
            .map_err(err)?;
        c.configure_mesh()
            .disable_mesh()
            .x_desc("s")
            .draw()
            .map_err(err)?;
        // Each stage's bar reaches the sum of it and the stages before it, drawn tallest
        // first so every one stays visible.
        let stages: Vec<&'static str> = metrics
            .first()
            .map(|m| m.stages.iter().map(|s| s.stage).collect())
            .unwrap_or_default();
        let colors = [MAGENTA, BLUE, GREEN, CYAN, YELLOW, BLACK];
        for k in (0..stages.len()).rev() {
            let color = colors[k % colors.len()];
            let upto = |m: &FrameMetrics| m.stages.iter().take(k + 1).map(|s| s.ms).sum::<f64>();
            c.draw_series(metrics.iter().map(|m| {
                let t = m.frame as f64 * frame_s;
                Rectangle::new([(t, 0.0), (t + frame_s * 0.9, upto(m))], color.filled())
            }))
            .map_err(err)?;
        }
        c.draw_series(LineSeries::new(
            vec![(0.0, 80.0), (t_max, 80.0)],
            RED.stroke_width(2),
        ))
        .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
