//! `parley bench mimi`: streaming encode and decode per 80 ms frame.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use parley_engine::models::mimi::{Mimi, MimiConfig};
use parley_engine::models::weights::Weights;

use crate::mimi_cmd::MimiSource;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time Mimi's streaming encode_step and decode_step, one 80 ms frame at a time.
    Mimi(MimiBench),
    /// Time one step of a delayed-streams LM (depformer included), with the bytes of
    /// weights it reads and the machine's measured memory bandwidth beside it.
    Lm(LmBench),
}

#[derive(Debug, Args)]
pub struct LmBench {
    /// Architecture: stt-1b-en_fr or moshi-7b (with random weights).
    #[arg(long)]
    preset: Option<String>,
    /// Random weights (the default with --preset).
    #[arg(long)]
    random_weights: bool,
    /// A model directory instead of a preset.
    #[arg(long, conflicts_with = "preset")]
    model_dir: Option<std::path::PathBuf>,
    /// Weight format: f32, bf16, q8_0 or q4.
    #[arg(long, default_value = "bf16")]
    dtype: parley_engine::compute::cpu::WeightPrecision,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Worker threads (default: all).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct MimiBench {
    /// Full-size published architecture with random weights (the default when no
    /// model is given).
    #[arg(long)]
    random_weights: bool,
    #[command(flatten)]
    source: MimiSource,
    /// Frames to time (after the warm-up).
    #[arg(long, default_value_t = 100)]
    frames: usize,
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Worker threads; by default the benchmark runs once with 1 and once with all.
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object per run instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Mimi(b) => bench_mimi(b),
        BenchCommand::Lm(b) => bench_lm(b),
    }
}

fn bench_lm(b: LmBench) -> Result<()> {
    use parley_engine::compute::cpu::measure_read_bandwidth_gbs;
    use parley_engine::models::kyutai_config::ModelDir;
    use parley_engine::models::lm::generator::{GenConfig, LmGen};
    use parley_engine::models::lm::{config::PRESETS, LmConfig, LmModel};

    let threads = b
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Safe in edition 2021; nothing has read the variable yet, no threads started.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let t_load = Instant::now();
    let (model, what) = match (&b.preset, &b.model_dir) {
        (Some(p), None) => {
            let cfg = LmConfig::preset(p).ok_or_else(|| {
                anyhow::anyhow!("unknown preset `{p}`; known: {}", PRESETS.join(", "))
            })?;
            let w = Weights::random(1).with_precision(b.dtype);
            (
                LmModel::from_weights(&w, cfg)?,
                format!("{p}, random weights"),
            )
        }
        (None, Some(dir)) => {
            let d = ModelDir::open(dir)?;
            let mut m = d.load_lm()?;
            m.set_weight_precision(b.dtype)?;
            (m, dir.display().to_string())
        }
        _ => anyhow::bail!("say which model: --preset NAME --random-weights, or --model-dir DIR"),
    };
    // Accepted for the documented command line: presets always run on random weights.
    let _ = b.random_weights;
    let load_s = t_load.elapsed().as_secs_f64();
    let bytes = model.weight_bytes_per_step();
    let cfg = model.config().clone();
    let mut gen = LmGen::new(model, GenConfig::default());
    let n_in = gen.input_codebooks();
    let mut seed = 7u32;
    let mut ms = Vec::with_capacity(b.steps);
    for i in 0..b.warmup + b.steps {
        let codes: Vec<u32> = (0..n_in)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) % cfg.card as u32
            })
            .collect();
        let t0 = Instant::now();
        std::hint::black_box(gen.step(&codes)?);
        if i >= b.warmup {
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let s = Stats::of(&ms);
    let gbs = bytes as f64 / (s.p50 / 1e3) / 1e9;
    let bw = measure_read_bandwidth_gbs(1 << 30);
    if b.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "lm", "model": what, "dtype": format!("{:?}", b.dtype), "threads": threads,
                "steps": b.steps, "step_ms": s.json(), "weight_bytes_per_step": bytes,
                "effective_gbs": gbs, "measured_read_bandwidth_gbs": bw, "load_s": load_s,
            })
        );
    } else {
        println!(
            "lm step, {what}, {:?} weights, {threads} thread(s), {} steps",
            b.dtype, b.steps
        );
        println!(
            "  ms per step: mean {:.1}  p50 {:.1}  p90 {:.1}  max {:.1}",
            s.mean, s.p50, s.p90, s.max
        );
        println!(
            "  weights read per step {:.3} GB -> {gbs:.1} GB/s effective (p50); measured read bandwidth {bw:.1} GB/s ({:.0}%)",
            bytes as f64 / 1e9,
            100.0 * gbs / bw
        );
        println!("  model built in {load_s:.1} s");
    }
    Ok(())
}

fn bench_mimi(b: MimiBench) -> Result<()> {
    let Some(threads) = b.threads else {
        // Thread pools are sized at start-up, so each count runs in a process of its own.
        let all = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut counts = vec![1];
        if all > 1 {
            counts.push(all);
        }
        let exe = std::env::current_exe().context("locating the parley binary")?;
        for n in counts {
            let args: Vec<String> = std::env::args().skip(1).collect();
            let status = Command::new(&exe)
                .args(&args)
                .arg("--threads")
                .arg(n.to_string())
                .env("RAYON_NUM_THREADS", n.to_string())
                .status()
                .context("running the benchmark")?;
            anyhow::ensure!(status.success(), "benchmark with {n} threads failed");
        }
        return Ok(());
    };
    if std::env::var("RAYON_NUM_THREADS").ok() != Some(threads.to_string()) {
        // Safe in edition 2021; nothing has read the variable yet, no threads started.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let (mut mimi, what) = if b.source.model_dir.is_some() || b.source.weights.is_some() {
        (b.source.load()?, "checkpoint")
    } else {
        let mut m = Mimi::from_weights(&Weights::random(0), MimiConfig::default(), 32)?;
        if let Some(n) = b.source.codebooks {
            m.set_num_codebooks(n)?;
        }
        m.set_weight_precision(b.source.precision)?;
        (m, "random weights, published config")
    };
    let fs = mimi.frame_size();
    let frame_ms = fs as f64 / mimi.sample_rate_hz() as f64 * 1000.0;
    // A chirp with some noise: realistic activations, different every frame.
    let mut phase = 0f32;
    let mut seed = 1u32;
    let mut next_frame = || -> Vec<f32> {
        (0..fs)
            .map(|i| {
                phase += 0.02 + 0.00001 * i as f32;
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                0.3 * phase.sin() + 0.05 * ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
            })
            .collect()
    };
    let mut enc_ms = Vec::with_capacity(b.frames);
    let mut dec_ms = Vec::with_capacity(b.frames);
    for i in 0..b.warmup + b.frames {
        let frame = next_frame();
        let t0 = Instant::now();
        let codes = mimi.encode_step(&frame)?;
        let t1 = Instant::now();
        let pcm = mimi.decode_step(&codes)?;
        let t2 = Instant::now();
        std::hint::black_box(pcm);
        if i >= b.warmup {
            enc_ms.push((t1 - t0).as_secs_f64() * 1e3);
            dec_ms.push((t2 - t1).as_secs_f64() * 1e3);
        }
    }
    let total: Vec<f64> = enc_ms.iter().zip(&dec_ms).map(|(a, b)| a + b).collect();
    let (enc, dec, tot) = (Stats::of(&enc_ms), Stats::of(&dec_ms), Stats::of(&total));
    let rtf = tot.mean / frame_ms;
    if b.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "mimi", "weights": what, "threads": threads,
                "precision": format!("{:?}", b.source.precision),
                "codebooks": mimi.num_codebooks(), "frames": b.frames,
                "encode_ms": enc.json(), "decode_ms": dec.json(), "total_ms": tot.json(),
                "real_time_factor": rtf,
            })
        );
    } else {
        println!(
            "mimi streaming, {what}, {:?} weights, {} codebooks, {threads} thread(s), {} frames of {frame_ms:.0} ms",
            b.source.precision,
            mimi.num_codebooks(),
            b.frames
        );
        println!("            mean    p50    p90    max  (ms per frame)");
        for (name, s) in [("encode", enc), ("decode", dec), ("total", tot)] {
            println!(
                "  {name:<8} {:>6.2} {:>6.2} {:>6.2} {:>6.2}",
                s.mean, s.p50, s.p90, s.max
            );
        }
        println!("  real-time factor {rtf:.3} (total mean / {frame_ms:.0} ms)");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    mean: f64,
    p50: f64,
    p90: f64,
    max: f64,
}

impl Stats {
    fn of(xs: &[f64]) -> Self {
        let mut v = xs.to_vec();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Self {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: q(0.5),
            p90: q(0.9),
            max: v[v.len() - 1],
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"mean": self.mean, "p50": self.p50, "p90": self.p90, "max": self.max})
    }
}
