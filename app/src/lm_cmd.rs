//! `parley stt` and `parley moshi`: the delayed-streams models over a recording.

use crate::out::outln;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use parley_engine::audio::file::{read_audio_24k, write_wav_f32};
use parley_engine::compute::gpu::{select_device, DeviceChoice};
use parley_engine::compute::Dtype;
use parley_engine::models::kyutai_config::ModelDir;
use parley_engine::models::lm::generator::{GenConfig, LmBackend, LmGen};
use parley_engine::models::mimi::gpu::GpuMimi;
use parley_engine::models::mimi::Mimi;
use parley_engine::models::stt::Transcriber;
use parley_engine::npy;

#[derive(Debug, Args)]
pub struct SttArgs {
    /// The recording to transcribe (wav, mp3, flac, ogg).
    input: PathBuf,
    /// A model directory laid out like a Kyutai STT repository.
    #[arg(long)]
    model_dir: PathBuf,
    /// One JSON object per line: words with start and end in seconds, end-of-turn events.
    #[arg(long)]
    json: bool,
    /// Write the text token of every step (silence prefix and suffix included) as an
    /// int64 .npy of shape [n_steps].
    #[arg(long)]
    dump_tokens: Option<PathBuf>,
    /// Report end-of-turn (semantic voice activity) from the model's extra heads.
    #[arg(long)]
    vad: bool,
    #[command(flatten)]
    run: RunArgs,
}

/// Where the language model runs and in which weight format.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// auto (a hardware GPU, else the CPU), gpu (any GPU adapter, software ones included)
    /// or cpu. `moshi` runs Mimi where the LM runs; `stt` runs it on the CPU.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Weights: auto (on the CPU f32 where it fits in the memory available, else the
    /// first of bf16, q8_0, q4 that does; bf16 on the GPU), f32, bf16, q8_0, q4, or f16
    /// (GPU).
    #[arg(long, alias = "dtype", default_value = "auto")]
    pub precision: Dtype,
}

/// The model directory, its Mimi (on the CPU; with `gpu_codec` also on the LM's GPU, if
/// it runs on one) and its language model on the device asked for; logs which device
/// runs.
fn load_models(
    model_dir: &Path,
    run: &RunArgs,
    gpu_codec: bool,
) -> Result<(ModelDir, Mimi, Option<GpuMimi>, LmBackend)> {
    let dir = ModelDir::open(model_dir).context("opening the model directory")?;
    let mut mimi = dir.load_mimi().context("loading Mimi")?;
    // Mimi's CPU path holds f32 or bf16 weights.
    mimi.set_weight_precision(run.precision.mimi_precision())?;
    let (device, line) = select_device(run.device)?;
    eprintln!("{line}");
    let params = dir
        .lm_param_count()
        .context("reading the language model's header")?;
    let (lm, weights) =
        LmBackend::open(&device, run.precision, Some(params), |p| dir.load_lm_as(p))
            .context("loading the language model")?;
    eprintln!("{weights}");
    let gpu_mimi = if gpu_codec {
        let (m, line) = GpuMimi::beside(device.gpu(), &mimi);
        eprintln!("{line}");
        m
    } else {
        None
    };
    Ok((dir, mimi, gpu_mimi, lm))
}

pub fn stt(args: SttArgs) -> Result<()> {
    if let Some(d) = &args.dump_tokens {
        parley_engine::outfile::check_outputs(&[d], &[&args.input, &args.model_dir])?;
    }
    let pcm = read_audio_24k(&args.input)?;
    let (dir, mimi, _, lm) = load_models(&args.model_dir, &args.run, false)?;
    if lm.config().dep_q != 0 {
        bail!(
            "{} holds a model that speaks (dep_q > 0): use `parley moshi`",
            args.model_dir.display()
        );
    }
    let mut t = Transcriber {
        mimi,
        gen: LmGen::with_backend(lm, GenConfig::default()),
        tokenizer: dir.load_tokenizer().context("loading the text tokenizer")?,
        cfg: dir.stt_config()?,
        padding_id: dir.config.text_padding_token_id.unwrap_or(3),
    };
    let frame_s = 1.0 / t.mimi.config().frame_rate;
    let offset_s = t.offset_s();
    let (json, vad) = (args.json, args.vad);
    let mut step_index = 0usize;
    let mut in_turn_end = false;
    let stdout = std::io::stdout();
    let start = Instant::now();
    let transcript = t.transcribe(&pcm, |step, tok| {
        let mut out = stdout.lock();
        if vad {
            if let Some(p) = step.end_of_turn {
                if p > 0.5 && !in_turn_end {
                    in_turn_end = true;
                    let time = ((step_index + 1) as f64 * frame_s - offset_s).max(0.0);
                    if json {
                        let _ = writeln!(out, "{}", serde_json::json!({"type": "end_of_turn", "time": ms(time), "probability": p}));
                    } else {
                        let _ = write!(out, " [end of turn]");
                    }
                }
            }
        }
        if let Some(id) = step.token {
            if id != 0 && id != 3 {
                in_turn_end = false;
                if !json {
                    if let Some(piece) = tok.id_to_piece(id) {
                        let _ = write!(out, "{}", piece.replace('\u{2581}', " "));
                        let _ = out.flush();
                    }
                }
            }
        }
        step_index += 1;
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    if json {
        for w in &transcript.words {
            outln!(
                "{}",
                serde_json::json!({"type": "word", "text": w.text, "start": ms(w.start_s), "end": ms(w.end_s)})
            );
        }
    } else {
        outln!();
    }
    if let Some(path) = &args.dump_tokens {
        npy::write_i64_1d(path, &transcript.tokens)?;
    }
    eprintln!(
        "{} steps in {elapsed:.2} s ({:.1} steps/s), {} words",
        transcript.tokens.len(),
        transcript.tokens.len() as f64 / elapsed,
        transcript.words.len()
    );
    Ok(())
}

/// Seconds rounded to the millisecond, for display.
fn ms(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}

#[derive(Debug, Args)]
pub struct MoshiArgs {
    /// A recording of the user (wav, mp3, flac, ogg).
    input: PathBuf,
    /// A model directory laid out like a Kyutai Moshi repository.
    #[arg(long)]
    model_dir: PathBuf,
    /// Where to write what the model said (24 kHz WAV).
    #[arg(long)]
    out: PathBuf,
    /// Write the model's text and audio tokens as an int64 .npy of shape [1 + dep_q, n],
    /// one column per step at which the generator returned tokens.
    #[arg(long)]
    dump_tokens: Option<PathBuf>,
    /// Audio temperature (0: greedy); the model's lm_gen_config by default.
    #[arg(long)]
    temp: Option<f32>,
    /// Text temperature (0: greedy); the model's lm_gen_config by default.
    #[arg(long)]
    temp_text: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Feed frames at the live clock's pace (one per 80 ms) instead of as fast as possible.
    #[arg(long)]
    realtime: bool,
    #[command(flatten)]
    run: RunArgs,
}

pub fn moshi(args: MoshiArgs) -> Result<()> {
    for (flag, t) in [("--temp", args.temp), ("--temp-text", args.temp_text)] {
        if let Some(t) = t {
            if !(0.0..=10.0).contains(&t) {
                bail!("{flag} {t} is outside 0..=10");
            }
        }
    }
    let outputs: Vec<&Path> = std::iter::once(args.out.as_path())
        .chain(args.dump_tokens.as_deref())
        .collect();
    parley_engine::outfile::check_outputs(&outputs, &[&args.input, &args.model_dir])?;
    let pcm = read_audio_24k(&args.input)?;
    let (dir, mut mimi, mut gpu_mimi, lm) = load_models(&args.model_dir, &args.run, true)?;
    let tokenizer = dir.load_tokenizer().context("loading the text tokenizer")?;
    let dep_q = lm.config().dep_q;
    if dep_q == 0 {
        bail!(
            "{} holds a model that does not speak (dep_q = 0): use `parley stt`",
            args.model_dir.display()
        );
    }
    let mut cfg = dir.gen_config(args.seed);
    if let Some(t) = args.temp_text {
        cfg.text.temp = t;
    }
    if let Some(t) = args.temp {
        cfg.audio.temp = t;
    }
    let mut gen = LmGen::with_backend(lm, cfg);
    let fs = mimi.frame_size();
    let mut audio = pcm.clone();
    audio.resize(pcm.len().div_ceil(fs) * fs, 0.0);
    let mut columns: Vec<Vec<i64>> = vec![];
    let mut reply = Vec::with_capacity(audio.len());
    let frame_dur = Duration::from_secs_f64(fs as f64 / mimi.sample_rate_hz() as f64);
    let start = Instant::now();
    let mut stdout = std::io::stdout().lock();
    for (i, frame) in audio.chunks(fs).enumerate() {
        if args.realtime {
            let due = frame_dur * (i as u32 + 1);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let user_codes = match gpu_mimi.as_mut() {
            Some(g) => g.encode_step(frame)?,
            None => mimi.encode_step(frame)?,
        };
        let step = gen.step(&user_codes)?;
        match step.tokens {
            Some(tokens) => {
                let text = tokens[0] as u32;
                if text != 0 && text != 3 {
                    if let Some(piece) = tokenizer.id_to_piece(text) {
                        write!(stdout, "{}", piece.replace('\u{2581}', " "))?;
                        stdout.flush()?;
                    }
                }
                let codes: Vec<u32> = tokens[1..].iter().map(|&t| t as u32).collect();
                reply.extend(match gpu_mimi.as_mut() {
                    Some(g) => g.decode_step(&codes)?,
                    None => mimi.decode_step(&codes)?,
                });
                columns.push(tokens);
            }
            // While the delays hold output back, the model is silent.
            None => reply.extend(std::iter::repeat_n(0f32, fs)),
        }
    }
    writeln!(stdout)?;
    write_wav_f32(&args.out, &reply, mimi.sample_rate_hz())?;
    if let Some(path) = &args.dump_tokens {
        let rows: Vec<Vec<u32>> = (0..=dep_q)
            .map(|k| columns.iter().map(|c| c[k] as u32).collect())
            .collect();
        npy::write_i64_2d(path, &rows)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!(
        "{} frames in {elapsed:.2} s ({:.1} ms per frame) -> {}",
        audio.len() / fs,
        elapsed * 1e3 / (audio.len() / fs) as f64,
        args.out.display()
    );
    Ok(())
}
