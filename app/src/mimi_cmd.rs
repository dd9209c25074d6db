//! `parley mimi encode|decode`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args, Subcommand};
use parley_engine::audio::file::{read_audio_24k, write_wav_f32};
use parley_engine::compute::cpu::WeightPrecision;
use parley_engine::models::kyutai_config::ModelDir;
use parley_engine::models::mimi::{Mimi, MimiConfig};
use parley_engine::models::weights::Weights;
use parley_engine::npy;

/// Where Mimi's weights come from.
#[derive(Debug, Args)]
pub struct MimiSource {
    /// A model directory laid out like a Kyutai Hub repository (config.json names the
    /// Mimi file and its config).
    #[arg(long, conflicts_with = "weights")]
    pub model_dir: Option<PathBuf>,
    /// A Mimi safetensors file.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// A Mimi config JSON (the official loader's `mimi_config` form) for --weights;
    /// the published Mimi's config without it.
    #[arg(long, requires = "weights")]
    pub config: Option<PathBuf>,
    /// Codebooks to use (8 for Moshi, 32 for the STT and TTS models); by default the
    /// model directory's rule, or 8.
    #[arg(long)]
    pub codebooks: Option<usize>,
    /// How large weight matrices are held: f32 (matches the reference to float rounding)
    /// or bf16 (half the memory traffic per step; f32 arithmetic).
    #[arg(long, default_value = "f32")]
    pub precision: WeightPrecision,
}

impl MimiSource {
    /// The files and directory this source reads (outputs must not overwrite them).
    pub fn inputs(&self) -> Vec<&Path> {
        [&self.model_dir, &self.weights, &self.config]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .collect()
    }

    pub fn load(&self) -> Result<Mimi> {
        let mut mimi = match (&self.model_dir, &self.weights) {
            (Some(dir), None) => ModelDir::open(dir)
                .and_then(|d| d.load_mimi())
                .context("loading Mimi from a model directory")?,
            (None, Some(weights)) => {
                let cfg = match &self.config {
                    Some(c) => MimiConfig::from_json_file(c)?,
                    None => MimiConfig::default(),
                };
                Mimi::load(weights, cfg, 8).context("loading Mimi")?
            }
            _ => bail!("say where Mimi is: --model-dir DIR or --weights FILE [--config JSON]"),
        };
        if let Some(n) = self.codebooks {
            mimi.set_num_codebooks(n)?;
        }
        if !matches!(self.precision, WeightPrecision::F32 | WeightPrecision::Bf16) {
            bail!(
                "--precision {:?}: Mimi runs in f32 or bf16 (its quantized formats are not checked against the reference)",
                self.precision
            );
        }
        mimi.set_weight_precision(self.precision)?;
        Ok(mimi)
    }
}

#[derive(Debug, Subcommand)]
pub enum MimiCommand {
    /// Encode an audio file (wav, mp3, flac, ogg; any rate and channels) to codes, written
    /// as an int64 .npy of shape [n_codebooks, n_frames].
    Encode {
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        source: MimiSource,
    },
    /// Decode codes (.npy, [n_codebooks, n_frames]) to a 24 kHz WAV.
    Decode {
        codes: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        source: MimiSource,
    },
    /// Write a Mimi checkpoint of the published architecture (or --config's) with random
    /// weights, under the published parameter names: for benchmarks and tests.
    RandomWeights {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
        /// f32, f16 or bf16 on disk.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

pub fn run(cmd: MimiCommand) -> Result<()> {
    match cmd {
        MimiCommand::RandomWeights {
            out,
            config,
            dtype,
            seed,
        } => {
            if let Some(c) = &config {
                parley_engine::outfile::check_outputs(&[&out], &[c])?;
            }
            let cfg = match &config {
                Some(c) => MimiConfig::from_json_file(c)?,
                None => MimiConfig::default(),
            };
            let dtype = match dtype.as_str() {
                "f32" => DType::F32,
                "f16" => DType::F16,
                "bf16" => DType::BF16,
                other => bail!("--dtype {other}: expected f32, f16 or bf16"),
            };
            let weights = Weights::random(seed);
            let n = cfg.quantizer.n_q;
            Mimi::from_weights(&weights, cfg, n)?;
            weights.save(&out, dtype)?;
            eprintln!("wrote random Mimi weights -> {}", out.display());
        }
        MimiCommand::Encode { input, out, source } => {
            let mut inputs = source.inputs();
            inputs.push(&input);
            parley_engine::outfile::check_outputs(&[&out], &inputs)?;
            let pcm = read_audio_24k(&input)?;
            let mut mimi = source.load()?;
            let start = Instant::now();
            let codes = mimi.encode(&pcm)?;
            let frames = codes.first().map_or(0, Vec::len);
            npy::write_i64_2d(&out, &codes)?;
            eprintln!(
                "encoded {:.2} s of audio into {} codebooks x {frames} frames in {:.2} s -> {}",
                pcm.len() as f64 / 24_000.0,
                codes.len(),
                start.elapsed().as_secs_f64(),
                out.display()
            );
        }
        MimiCommand::Decode { codes, out, source } => {
            let mut inputs = source.inputs();
            inputs.push(&codes);
            parley_engine::outfile::check_outputs(&[&out], &inputs)?;
            let mut mimi = source.load()?;
            let rows = npy::read_u32_2d(&codes, mimi.cardinality() as u32)?;
            if rows.len() > mimi.total_codebooks() {
                bail!(
                    "{} has {} codebooks; this Mimi has {}",
                    codes.display(),
                    rows.len(),
                    mimi.total_codebooks()
                );
            }
            let start = Instant::now();
            let pcm = mimi
                .decode(&rows)
                .with_context(|| format!("decoding {}", codes.display()))?;
            write_wav_f32(&out, &pcm, mimi.sample_rate_hz())?;
            eprintln!(
                "decoded {} frames into {:.2} s of audio in {:.2} s -> {}",
                rows.first().map_or(0, Vec::len),
                pcm.len() as f64 / 24_000.0,
                start.elapsed().as_secs_f64(),
                out.display()
            );
        }
    }
    Ok(())
}
