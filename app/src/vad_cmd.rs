//! `parley vad`: when speech starts and stops in a recording, by Silero VAD through ONNX
//! Runtime, fed 80 ms frames at 24 kHz as a live session would be; with `--smart-turn`,
//! each stop judged by Smart Turn v3.2 on the audio heard when the stop was decided.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use parley_engine::models::smart_turn::SmartTurn;
use parley_engine::models::vad::{VadEvent, VadSettings, VoiceActivity};

#[derive(Debug, Args)]
pub struct VadArgs {
    /// Audio file (WAV, FLAC, MP3, OGG; any rate and channel count).
    input: PathBuf,
    /// JSON Lines with OpenAI Realtime's names (`input_audio_buffer.speech_started` /
    /// `speech_stopped`, times in ms from the start) instead of one line per speech run.
    #[arg(long)]
    json: bool,
    /// Probability at which speech starts (it stops 0.15 lower).
    #[arg(long, default_value_t = VadSettings::default().start_threshold)]
    threshold: f32,
    /// Silence that ends speech, in ms.
    #[arg(long, default_value_t = VadSettings::default().min_silence_ms)]
    min_silence_ms: f64,
    /// Also say at each stop whether the turn is complete, by Smart Turn v3.2 on the last
    /// 8 s heard when the stop was decided.
    #[arg(long)]
    smart_turn: bool,
}

pub fn run(args: VadArgs) -> anyhow::Result<()> {
    if !(0.15..=1.0).contains(&args.threshold) {
        anyhow::bail!("--threshold {} is outside 0.15..=1", args.threshold);
    }
    if !(0.0..=60_000.0).contains(&args.min_silence_ms) {
        anyhow::bail!(
            "--min-silence-ms {} is outside 0..=60000",
            args.min_silence_ms
        );
    }
    let pcm = parley_engine::audio::file::read_audio_24k(&args.input)?;
    let settings = VadSettings {
        start_threshold: args.threshold,
        stop_threshold: args.threshold - 0.15,
        min_silence_ms: args.min_silence_ms,
        ..VadSettings::default()
    };
    let mut vad = VoiceActivity::new(settings).context("starting Silero VAD")?;
    let mut turn = if args.smart_turn {
        Some(SmartTurn::new().context("starting Smart Turn")?)
    } else {
        None
    };
    let pcm_16k = if args.smart_turn {
        parley_engine::audio::resample::resample_mono(
            &pcm,
            parley_engine::audio::SAMPLE_RATE_HZ,
            parley_engine::models::smart_turn::SAMPLE_RATE,
        )?
    } else {
        vec![]
    };
    // Smart Turn's probability for a stop dated `time_s` of speech that began at
    // `start_s`: on that speech (from half a second before it, as the session's turn
    // stage feeds it) up to when the stop was decided (`min_silence_ms` later).
    let mut judge = |start_s: f64, time_s: f64| -> anyhow::Result<Option<f32>> {
        let Some(st) = turn.as_mut() else {
            return Ok(None);
        };
        let decided = time_s + settings.min_silence_ms / 1000.0;
        let end = ((decided * 16_000.0) as usize).min(pcm_16k.len());
        let from = ((start_s - parley_engine::pipeline::turn::SMART_TURN_PRE_SPEECH_S).max(0.0)
            * 16_000.0) as usize;
        Ok(Some(st.probability(&pcm_16k[from.min(end)..end])?))
    };
    let mut events = vec![];
    for frame in pcm.chunks(parley_engine::audio::FRAME_LEN_SAMPLES) {
        events.extend(vad.push_24k(frame)?);
    }
    let end_s = pcm.len() as f64 / parley_engine::audio::SAMPLE_RATE_HZ as f64;
    let mut out = std::io::stdout().lock();
    let ms = |s: f64| (s * 1000.0).round() as i64;
    let mut started = None;
    let mut lines = vec![];
    for e in events {
        match e {
            // Only starts and stops are reported here.
            VadEvent::Paused { .. } | VadEvent::Resumed { .. } => {}
            VadEvent::SpeechStarted {
                time_s,
                probability,
            } => {
                started = Some(time_s);
                if args.json {
                    lines.push(serde_json::json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": ms(time_s), "probability": probability}).to_string());
                }
            }
            VadEvent::SpeechStopped {
                time_s,
                probability,
            } => {
                let complete = judge(started.unwrap_or(0.0), time_s)?;
                if args.json {
                    let mut j = serde_json::json!({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": ms(time_s), "probability": probability});
                    if let Some(p) = complete {
                        j["turn_complete_probability"] = p.into();
                    }
                    lines.push(j.to_string());
                } else if let Some(s) = started.take() {
                    let verdict = complete.map_or(String::new(), |p| {
                        format!(
                            "; turn {} (Smart Turn {p:.2})",
                            if p > 0.5 { "complete" } else { "not complete" }
                        )
                    });
                    lines.push(format!("speech {s:.2} s - {time_s:.2} s{verdict}"));
                }
            }
        }
    }
    if !args.json && vad.speaking() {
        if let Some(s) = started {
            lines.push(format!(
                "speech {s:.2} s - {end_s:.2} s (still speaking at the end)"
            ));
        }
    }
    for l in lines {
        // A reader that has gone (`| head`) ends the output, not the program with a panic.
        if writeln!(out, "{l}").is_err() {
            break;
        }
    }
    Ok(())
}
