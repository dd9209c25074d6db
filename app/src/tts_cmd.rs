//! `parley tts`: Kyutai's delayed-streams text-to-speech model says a text in a voice,
//! the whole text at once or words read from stdin as they arrive, the speech written
//! as it is produced.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use parley_engine::audio::file::write_wav_f32;
use parley_engine::compute::cpu::WeightPrecision;
use parley_engine::compute::gpu::{select_device, Backend, GpuFormat};
use parley_engine::models::kyutai_config::ModelDir;
use parley_engine::models::tts::{
    script_to_entries, Step, TtsDecoder, TtsModel, TtsOptions, TtsStream, Voice, WordFeed,
};
use parley_engine::npy;

use crate::lm_cmd::RunArgs;

#[derive(Debug, Args)]
pub struct TtsArgs {
    /// The text to say, or `-` to read it from stdin as it arrives (words are said once
    /// whole; `<break time="0.5s"/>` makes a pause).
    text: String,
    /// A model directory laid out like kyutai/tts-1.6b-en_fr.
    #[arg(long)]
    model_dir: PathBuf,
    /// A voice: a `*.safetensors` file from kyutai/tts-voices, or the name of one in the
    /// `tts-voices` preset (`parley models pull tts-voices`): its path without the
    /// `.1e68beda@240.safetensors` suffix, or its last part (`robert`).
    #[arg(long)]
    voice: String,
    /// Where the speech goes: a WAV file (24 kHz), or `-` for raw PCM16 LE 24 kHz mono
    /// on stdout as it is produced.
    #[arg(long)]
    out: String,
    /// Guidance, one of the model's values ("1.0" to "4.0" by 0.5 for the published
    /// model; distilled: one pass whatever the value).
    #[arg(long, default_value = "2.0")]
    cfg: String,
    /// Audio codebooks to generate (the model's all by default; Kyutai's own server uses
    /// 24 of 32, for speed).
    #[arg(long)]
    codebooks: Option<usize>,
    /// Temperature of text and audio (0: greedy).
    #[arg(long, default_value_t = 0.6)]
    temp: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write every frame of tokens the generator returned (the text token fed, then the
    /// audio tokens; -1 for none) as an int64 .npy of shape [1 + codebooks, frames].
    #[arg(long)]
    dump_tokens: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

pub fn run(args: TtsArgs) -> Result<()> {
    if !(0.0..=10.0).contains(&args.temp) {
        bail!("--temp {} is outside 0..=10", args.temp);
    }
    let voice_path = Voice::resolve(&args.voice)?;
    let out_path = PathBuf::from(&args.out);
    let outputs: Vec<&Path> = (args.out != "-")
        .then_some(out_path.as_path())
        .into_iter()
        .chain(args.dump_tokens.as_deref())
        .collect();
    parley_engine::outfile::check_outputs(&outputs, &[&args.model_dir, &voice_path])?;
    let (backend, device_line) = select_device(args.run.device)?;
    // On the GPU the host copy is f32 for f32 and f16 weights, else bf16 (the upload's
    // source); the CPU keeps the conditioners and the text embeddings it prepares.
    let (precision, gpu_format) = match &backend {
        Backend::Cpu => (args.run.precision.cpu()?, None),
        Backend::Gpu(_) => {
            let f = args.run.precision.gpu()?;
            let host = match f {
                GpuFormat::F32 | GpuFormat::F16 => WeightPrecision::F32,
                _ => WeightPrecision::Bf16,
            };
            (host, Some(f))
        }
    };
    let dir = ModelDir::open(&args.model_dir).context("opening the model directory")?;
    let cfg = dir.lm_config()?;
    if !cfg.is_tts() {
        bail!(
            "{} is not a text-to-speech model (its config.json says model_type {:?})",
            args.model_dir.display(),
            cfg.other.get("model_type")
        );
    }
    let voice = Voice::load(&voice_path).context("loading the voice")?;
    let tokenizer = dir.load_tokenizer().context("loading the text tokenizer")?;
    let mut model = TtsModel::load(&dir.lm_weights()?, cfg, precision)
        .context("loading the text-to-speech model")?;
    let codebooks = args.codebooks.unwrap_or(model.lm.config().dep_q);
    if codebooks == 0 || codebooks > model.lm.config().dep_q {
        bail!(
            "--codebooks {codebooks}: this model generates 1 to {}",
            model.lm.config().dep_q
        );
    }
    let mut mimi = dir.load_mimi().context("loading Mimi")?;
    mimi.set_num_codebooks(codebooks)?;
    mimi.set_weight_precision(args.run.precision.mimi_precision())?;
    let frame_rate = mimi.config().frame_rate;
    let sample_rate = mimi.sample_rate_hz();
    match (&backend, gpu_format) {
        (Backend::Gpu(g), Some(f)) => {
            model
                .to_gpu(g, f, codebooks)
                .context("putting the model on the GPU")?;
            eprintln!("{device_line}; weights: {f:?} on the GPU");
        }
        _ => eprintln!("{device_line}; weights: {precision:?}"),
    }
    model.condition(&[&voice], &args.cfg)?;
    let opts = TtsOptions {
        temp: args.temp,
        seed: args.seed,
        codebooks,
        ..TtsOptions::default()
    };
    // Words from the command line at once, or from stdin as they come.
    let (pieces, from_stdin) = if args.text == "-" {
        let (tx, rx) = crossbeam_channel::bounded::<String>(64);
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || read_stdin(tx))
            .context("starting the stdin reader")?;
        (Some(rx), true)
    } else {
        (None, false)
    };
    let mut stream = TtsStream::new(&mut model, frame_rate, &opts)?;
    if !from_stdin {
        stream.push(script_to_entries(
            &tokenizer,
            &[&args.text],
            frame_rate,
            true,
            1,
        )?);
        stream.finish_input();
    }
    let mut feed = WordFeed::default();
    let mut words_in = 0usize;
    let delays = stream.output().delays.clone();
    let delay_steps = stream.output().delay_steps;
    let mut decoder = TtsDecoder::new(&mut mimi, delay_steps, &delays);
    let mut stdout = std::io::stdout().lock();
    let raw = args.out == "-";
    let mut speech: Vec<f32> = vec![];
    let mut samples_out = 0usize;
    let mut frames: Vec<Vec<i64>> = vec![];
    let start = Instant::now();
    let mut first_audio: Option<f64> = None;
    let mut first_word_at: Option<Instant> = (!from_stdin).then(Instant::now);
    loop {
        match stream.step()? {
            Step::Stepped { frame: Some(f) } => {
                if let Some(pcm) = decoder.push(&f)? {
                    samples_out += pcm.len();
                    if first_audio.is_none() {
                        first_audio = first_word_at.map(|t| t.elapsed().as_secs_f64());
                    }
                    if raw {
                        let bytes: Vec<u8> = pcm
                            .iter()
                            .flat_map(|&v| ((v * 32767.0).round() as i16).to_le_bytes())
                            .collect();
                        stdout
                            .write_all(&bytes)
                            .and_then(|()| stdout.flush())
                            .context("writing speech to stdout")?;
                    } else {
                        speech.extend(pcm);
                    }
                }
                frames.push(f);
            }
            Step::Stepped { frame: None } => {}
            Step::Done => break,
            Step::NeedWords => {
                let rx = pieces
                    .as_ref()
                    .context("the generator asked for more words")?;
                match rx.recv() {
                    Ok(piece) => {
                        let entries = feed.push(&tokenizer, &piece, frame_rate)?;
                        if !entries.is_empty() && first_word_at.is_none() {
                            first_word_at = Some(Instant::now());
                        }
                        words_in += entries.len();
                        stream.push(entries);
                    }
                    Err(_) => {
                        let entries = feed.finish(&tokenizer, frame_rate)?;
                        if entries.is_empty() && words_in == 0 {
                            bail!("no words to say on stdin");
                        }
                        if !entries.is_empty() && first_word_at.is_none() {
                            first_word_at = Some(Instant::now());
                        }
                        stream.push(entries);
                        stream.finish_input();
                    }
                }
            }
        }
    }
    let out = stream.into_output();
    if out.end_step.is_none() {
        // Nothing written: a file of half the text would pass for the whole.
        bail!(
            "the text was not finished within {} steps ({:.0} s of speech){}",
            out.steps.len(),
            samples_out as f64 / sample_rate as f64,
            if raw { "" } else { "; no file was written" }
        );
    }
    if !raw {
        write_wav_f32(&PathBuf::from(&args.out), &speech, sample_rate)?;
    }
    if let Some(path) = &args.dump_tokens {
        let rows: Vec<Vec<i64>> = (0..=codebooks)
            .map(|k| frames.iter().map(|f| f[k]).collect())
            .collect();
        npy::write_i64_2d_signed(path, &rows)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let steps = out.steps.len();
    eprintln!(
        "{steps} steps in {elapsed:.2} s ({:.1} ms per 80 ms frame), {} words, {:.2} s of speech{}{}",
        elapsed * 1e3 / steps.max(1) as f64,
        out.transcript.len(),
        samples_out as f64 / sample_rate as f64,
        first_audio.map_or(String::new(), |s| format!(
            "; first audio {:.0} ms after the first word",
            s * 1e3
        )),
        if raw {
            String::new()
        } else {
            format!(" -> {}", args.out)
        }
    );
    Ok(())
}

/// Stdin as it arrives, in pieces of text (invalid UTF-8 is replaced, and said).
fn read_stdin(tx: crossbeam_channel::Sender<String>) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 4096];
    let mut carry: Vec<u8> = vec![];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                carry.extend_from_slice(&buf[..n]);
                // Whole UTF-8 characters only; a split one waits for its rest.
                let valid = match std::str::from_utf8(&carry) {
                    Ok(_) => carry.len(),
                    Err(e) if e.error_len().is_none() => e.valid_up_to(),
                    Err(_) => carry.len(),
                };
                let text = String::from_utf8_lossy(&carry[..valid]).into_owned();
                carry.drain(..valid);
                if tx.send(text).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("stdin: {e}");
                break;
            }
        }
    }
    if !carry.is_empty() {
        let _ = tx.send(String::from_utf8_lossy(&carry).into_owned());
    }
}
