//! `parley bench mimi`: streaming encode and decode per 80 ms frame.

use crate::out::outln;
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
    /// Stream a recording through the real pipeline on the virtual audio device and
    /// report what a person would feel (compute per frame, word emission, end of turn,
    /// response latency), with a timeline plot.
    Latency(Box<crate::latency::LatencyArgs>),
    /// Load a model directory's language model in one precision and report the time and
    /// the peak resident memory it took (Linux: /proc/self/status). With --write-layout,
    /// first write random weights in a published layout
    /// (tests/fixtures/published/NAME.json) into the directory.
    Load(LoadBench),
    /// Time the GPU path of a preset with random weights, for each weight format: the
    /// matrix-vector kernels' shape for this adapter (with --tune, every candidate's
    /// bandwidth), ms per LM step, bytes read, effective GB/s beside the measured copy
    /// bandwidth, dispatches per step, Mimi's encode (and for a model that speaks its
    /// decode) on the GPU as a session runs it, and the whole listen or duplex frame.
    Gpu(GpuBench),
    /// Time the text-to-speech model at full size with random weights: each 80 ms
    /// frame's steps (temporal transformer, depformer, Mimi's decoder), the real-time
    /// factor, and the time from the first word to the first audio.
    Tts(TtsBench),
}

#[derive(Debug, Args)]
pub struct TtsBench {
    #[arg(long, default_value = "tts-1.6b-en_fr")]
    preset: String,
    /// f32, bf16, q8_0, q6, q5 or q4 (the CPU's formats); Mimi in q8_0 beside q8_0, q6, q5 and q4.
    #[arg(long, default_value = "q8_0")]
    precision: parley_engine::compute::Dtype,
    /// Audio codebooks to generate (32; Kyutai's own server uses 24).
    #[arg(long, default_value_t = 32)]
    codebooks: usize,
    /// Frames of speech to time after the first audio.
    #[arg(long, default_value_t = 25)]
    frames: usize,
    /// Rayon threads (all cores by default).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the model steps: cpu, gpu (any adapter) or auto (Mimi stays on the CPU).
    #[arg(long, default_value = "cpu")]
    device: parley_engine::compute::gpu::DeviceChoice,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct GpuBench {
    /// Architecture with random weights: stt-1b-en_fr, stt-2.6b-en or moshi-7b.
    #[arg(long, default_value = "stt-1b-en_fr")]
    preset: String,
    /// Weight formats, comma-separated: f32, f16, bf16, q8_0, q4.
    #[arg(long, value_delimiter = ',', default_value = "f16,q8_0")]
    dtype: Vec<parley_engine::compute::Dtype>,
    /// gpu (any adapter, software ones included) or auto (hardware only).
    #[arg(long, default_value = "gpu")]
    device: parley_engine::compute::gpu::DeviceChoice,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Time every candidate shape of the matrix-vector kernels for each format.
    #[arg(long)]
    tune: bool,
    /// First check the GPU against its definitions: every matrix-vector shape and format
    /// (f64 definition), a random LM of each preset family, scaled down (ring of 80
    /// steps), over 100 greedy steps against the CPU path (f32: identical tokens; the
    /// other formats: their logit error reported), and Mimi's GPU codec against the
    /// CPU's at the published size (6 frames: codes equal, audio within 1e-4); exits
    /// non-zero if a check fails. With --check-only, nothing is timed.
    #[arg(long)]
    check: bool,
    #[arg(long)]
    check_only: bool,
    /// One JSON object for the whole run instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct LoadBench {
    #[arg(long)]
    model_dir: std::path::PathBuf,
    /// f32, bf16, q8_0, q6, q5 or q4 (the CPU's formats).
    #[arg(long, default_value = "bf16")]
    precision: parley_engine::compute::cpu::WeightPrecision,
    /// A published layout to write (random weights) into --model-dir first.
    #[arg(long)]
    write_layout: Option<std::path::PathBuf>,
    #[arg(long)]
    json: bool,
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
    /// Weight format: f32, bf16, q8_0, q4, or f16 (GPU only).
    #[arg(long, default_value = "bf16")]
    dtype: parley_engine::compute::Dtype,
    /// auto (a hardware GPU, else the CPU), gpu (any adapter, software ones included) or cpu.
    #[arg(long, default_value = "cpu")]
    device: parley_engine::compute::gpu::DeviceChoice,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Warm up until the attention ring is full (the model's context, 750 steps for
    /// stt-1b-en_fr), so every timed step reads the whole cache: a long session's steady
    /// state. Without it the CPU's early steps read only the slots written so far.
    #[arg(long)]
    full_context: bool,
    /// Also time the parts of every layer (mean ms per step, summed over the layers).
    #[arg(long)]
    by_layer: bool,
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
    /// Also time every layer of the codec (mean ms per frame, in order).
    #[arg(long)]
    by_layer: bool,
    /// Read 1 GiB between frames (untimed), as a live session's LM step does, so the
    /// codec's weights come from memory rather than from the caches.
    #[arg(long)]
    cold: bool,
    /// Start each frame's encode with its first half before the frame is complete, as a
    /// live session does 40 ms early (after the `--cold` read): `encode` then times the
    /// rest of the frame, `early` the half.
    #[arg(long)]
    early_half: bool,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Mimi(b) => bench_mimi(b),
        BenchCommand::Lm(b) => bench_lm(b),
        BenchCommand::Latency(a) => crate::latency::run(*a),
        BenchCommand::Load(b) => bench_load(b),
        BenchCommand::Tts(b) => bench_tts(b),
        BenchCommand::Gpu(b) => bench_gpu(b),
    }
}

/// Random input codes of one step, each below `card`.
fn random_codes(seed: &mut u32, n: usize, card: usize) -> Vec<u32> {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (*seed >> 8) % card as u32
        })
        .collect()
}

fn bench_gpu(b: GpuBench) -> Result<()> {
    use parley_engine::compute::gpu::{select_device, Backend, DeviceChoice};
    use parley_engine::models::lm::generator::{GenConfig, LmBackend, LmGen};
    use parley_engine::models::lm::{config::PRESETS, LmConfig, LmModel};

    anyhow::ensure!(
        b.device != DeviceChoice::Cpu,
        "bench gpu times the GPU: --device gpu or auto (`bench lm --device cpu` times the CPU)"
    );
    anyhow::ensure!(b.steps > 0, "--steps must be at least 1");
    let cfg = LmConfig::preset(&b.preset).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown preset `{}`; known: {}",
            b.preset,
            PRESETS.join(", ")
        )
    })?;
    anyhow::ensure!(
        !cfg.is_tts(),
        "{} is a text-to-speech model: `parley bench tts --device gpu` times it",
        b.preset
    );
    let (device, line) = select_device(b.device)?;
    eprintln!("{line}");
    let Backend::Gpu(gpu) = &device else {
        anyhow::bail!("no GPU adapter: {line}");
    };
    let (checks, failed) = if b.check || b.check_only {
        gpu_checks(gpu)?
    } else {
        (serde_json::Value::Null, 0)
    };
    if b.check_only {
        outln!("{checks}");
        anyhow::ensure!(failed == 0, "{failed} GPU check(s) failed");
        return Ok(());
    }
    let copy_gbs = gpu.measure_copy_bandwidth_gbs(1 << 28)?;
    let speaks = cfg.dep_q > 0;
    let mut runs = vec![];
    for &dtype in &b.dtype {
        let format = dtype.gpu()?;
        let (shape, chosen) = gpu.matvec_shape(format)?;
        let tuned: Vec<serde_json::Value> = if b.tune {
            gpu.tune_matvec(format)?
                .into_iter()
                .map(|(s, gbs)| serde_json::json!({"shape": s.to_string(), "weight_gbs": gbs}))
                .collect()
        } else {
            vec![]
        };
        let t_load = Instant::now();
        let (backend, weights) = LmBackend::open(&device, dtype, None, |precision| {
            LmModel::from_weights(&Weights::random(1).with_precision(precision), cfg.clone())
        })?;
        eprintln!("{weights}");
        let load_s = t_load.elapsed().as_secs_f64();
        let bytes = backend.weight_bytes_per_step();
        let cache_bytes = backend.state_bytes();
        let dispatches = match &backend {
            LmBackend::Gpu(g) => g.dispatches_per_step(),
            LmBackend::Cpu(_) => 0,
        };
        let mut gen = LmGen::with_backend(backend, GenConfig::default());
        let n_in = gen.input_codebooks();
        // Mimi as a session on this GPU runs it: on the GPU, the CPU where it cannot be.
        let codebooks = if speaks { cfg.dep_q } else { n_in };
        let mut mimi = Mimi::from_weights(&Weights::random(0), MimiConfig::default(), codebooks)?;
        mimi.set_weight_precision(dtype.mimi_precision())?;
        let (mut gpu_mimi, mimi_device) =
            match parley_engine::models::mimi::gpu::GpuMimi::new(gpu, &mimi) {
                Ok(g) => (Some(g), "gpu".to_string()),
                Err(e) => (None, format!("cpu ({e})")),
            };
        let mimi_dispatches = gpu_mimi.as_ref().map(|g| g.dispatches());
        let frame_size = mimi.frame_size();
        let mut seed = 7u32;
        let (mut step_ms, mut enc_ms, mut dec_ms, mut frame_ms) = (vec![], vec![], vec![], vec![]);
        for i in 0..b.warmup + b.steps {
            let pcm: Vec<f32> = (0..frame_size)
                .map(|k| 0.2 * ((i * frame_size + k) as f32 * 0.03).sin())
                .collect();
            // The frame as a session runs it: the microphone's frame encoded, the step
            // on its codes, and for a model that speaks, a frame of codes decoded (the
            // encoder's: the decoder's work is the same).
            let t0 = Instant::now();
            let mut codes = match gpu_mimi.as_mut() {
                Some(g) => g.encode_step(&pcm)?,
                None => mimi.encode_step(&pcm)?,
            };
            let t1 = Instant::now();
            // The model's own streams beside the user's (random here).
            let rest = n_in.saturating_sub(codes.len());
            codes.extend(random_codes(&mut seed, rest, cfg.card));
            codes.truncate(n_in);
            std::hint::black_box(gen.step(&codes)?);
            let t2 = Instant::now();
            if speaks {
                let reply = &codes[..cfg.dep_q.min(codes.len())];
                std::hint::black_box(match gpu_mimi.as_mut() {
                    Some(g) => g.decode_step(reply)?,
                    None => mimi.decode_step(reply)?,
                });
            }
            let t3 = Instant::now();
            if i >= b.warmup {
                step_ms.push((t2 - t1).as_secs_f64() * 1e3);
                enc_ms.push((t1 - t0).as_secs_f64() * 1e3);
                if speaks {
                    dec_ms.push((t3 - t2).as_secs_f64() * 1e3);
                }
                frame_ms.push((t3 - t0).as_secs_f64() * 1e3);
            }
        }
        let s = Stats::of(&step_ms);
        let gbs = bytes as f64 / (s.p50 / 1e3) / 1e9;
        let mut run = serde_json::json!({
            "dtype": dtype.to_string(), "format": format.to_string(),
            "matvec_shape": shape.to_string(), "matvec_shape_chosen": chosen,
            "step_ms": s.json(), "weight_bytes_per_step": bytes,
            "cache_bytes_full_context": cache_bytes, "effective_gbs": gbs,
            "percent_of_copy_bandwidth": 100.0 * gbs / copy_gbs,
            "dispatches_per_step": dispatches, "load_s": load_s,
        });
        if !tuned.is_empty() {
            run["tuning"] = serde_json::Value::Array(tuned);
        }
        run["mimi_device"] = mimi_device.clone().into();
        run["mimi_codebooks"] = codebooks.into();
        run["mimi_encode_ms"] = Stats::of(&enc_ms).json();
        if let Some((e, d)) = mimi_dispatches {
            run["mimi_encoder_dispatches"] = e.into();
            run["mimi_decoder_dispatches"] = d.into();
        }
        if speaks {
            run["mimi_decode_ms"] = Stats::of(&dec_ms).json();
            run["duplex_frame_ms"] = Stats::of(&frame_ms).json();
        } else {
            run["listen_frame_ms"] = Stats::of(&frame_ms).json();
        }
        if !b.json {
            outln!(
                "{} {dtype}: step p50 {:.2} ms (p90 {:.2}); {:.3} GB of weights -> {gbs:.1} GB/s, {:.0}% of the copy bandwidth; {dispatches} dispatches; matvec {shape} ({chosen})",
                b.preset,
                s.p50,
                s.p90,
                bytes as f64 / 1e9,
                100.0 * gbs / copy_gbs
            );
            if speaks {
                outln!(
                    "  duplex frame: Mimi encode ({mimi_device}) {}; LM step {}; Mimi decode {}; whole frame {}",
                    Stats::of(&enc_ms).line(),
                    s.line(),
                    Stats::of(&dec_ms).line(),
                    Stats::of(&frame_ms).line()
                );
            } else {
                outln!(
                    "  listen frame: Mimi encode ({mimi_device}) {}; LM step {}; whole frame {}",
                    Stats::of(&enc_ms).line(),
                    s.line(),
                    Stats::of(&frame_ms).line()
                );
            }
            for t in run["tuning"].as_array().into_iter().flatten() {
                outln!(
                    "  tuning: {} {:.1} GB/s",
                    t["shape"].as_str().unwrap_or(""),
                    t["weight_gbs"].as_f64().unwrap_or(0.0)
                );
            }
        }
        runs.push(run);
    }
    let report = serde_json::json!({
        "bench": "gpu", "preset": b.preset, "adapter": gpu.info.name,
        "adapter_type": format!("{:?}", gpu.info.device_type),
        "backend": format!("{:?}", gpu.info.backend), "driver": gpu.info.driver_info,
        "subgroups": gpu.subgroups, "shader_f16": gpu.shader_f16, "copy_gbs": copy_gbs,
        "copy_probe": "read + write GB/s of a 256 MiB buffer copy",
        "steps": b.steps, "cpu": parley_engine::compute::cpu::cpu_description(),
        "runs": runs, "checks": checks,
    });
    if b.json {
        outln!("{report}");
    } else {
        outln!(
            "  adapter {} ({:?}), subgroups {}, copy bandwidth {copy_gbs:.1} GB/s (read + write)",
            gpu.info.name,
            gpu.info.device_type,
            gpu.subgroups
        );
        if !checks.is_null() {
            outln!("  checks: {checks}");
        }
    }
    anyhow::ensure!(failed == 0, "{failed} GPU check(s) failed");
    Ok(())
}

/// `bench gpu --check`: the matrix-vector shapes against their definition, and random
/// scaled-down LMs (the STT family, and Moshi's with its depformer) over 100 greedy steps
/// against the CPU path. Returns the report and the number of failed checks.
fn gpu_checks(
    gpu: &std::sync::Arc<parley_engine::compute::gpu::Gpu>,
) -> Result<(serde_json::Value, usize)> {
    use parley_engine::compute::gpu::GpuFormat;
    use parley_engine::models::lm::generator::{GenConfig, GenStep, LmBackend, LmGen};
    use parley_engine::models::lm::gpu::{GpuLm, GpuLmOptions};
    use parley_engine::models::lm::{LmConfig, LmModel};

    let t = Instant::now();
    let shapes = parley_engine::compute::gpu_matvec::check_shapes(gpu)?;
    let mut failed = 0;
    let bad: Vec<String> = shapes
        .iter()
        .filter(|c| !c.passed())
        .map(|c| format!("{}: error {:.2e} over {:.2e}", c.case, c.error, c.bound))
        .collect();
    failed += bad.len();
    let worst = shapes
        .iter()
        .map(|c| c.error / c.bound)
        .fold(0f64, f64::max);
    let mut lms = vec![];
    for preset in ["stt-1b-en_fr", "moshi-7b"] {
        let mut cfg = LmConfig::preset(preset).expect("a known preset");
        cfg.dim = 512;
        cfg.num_heads = 8;
        cfg.num_layers = 2;
        // Two blocks of the split attention; 100 steps wrap the ring.
        cfg.context = Some(80);
        if cfg.dep_q > 0 {
            cfg.depformer_dim = 256;
            cfg.depformer_num_layers = Some(1);
            cfg.depformer_num_heads = Some(4);
        }
        let model = || LmModel::from_weights(&Weights::random(3), cfg.clone());
        let n_in = LmGen::new(model()?, GenConfig::default()).input_codebooks();
        let mut seed = 5u32;
        let inputs: Vec<Vec<u32>> = (0..100)
            .map(|_| random_codes(&mut seed, n_in, cfg.card))
            .collect();
        let run = |gen: &mut LmGen| -> Result<Vec<GenStep>> {
            inputs.iter().map(|i| Ok(gen.step(i)?)).collect()
        };
        let cpu = run(&mut LmGen::new(model()?, GenConfig::default()))?;
        let distinct: std::collections::HashSet<u32> = cpu.iter().map(|s| s.text_token).collect();
        for format in [
            GpuFormat::F32,
            GpuFormat::F16,
            GpuFormat::Q8_0,
            GpuFormat::Q4,
        ] {
            let opts = GpuLmOptions {
                format,
                read_logits: true,
                ..Default::default()
            };
            let g = GpuLm::new(gpu, &model()?, opts)?;
            let got = run(&mut LmGen::with_backend(
                LmBackend::Gpu(Box::new(g)),
                GenConfig::default(),
            ))?;
            let mut agreed = 0;
            let mut worst_rel = 0f32;
            for (c, g) in cpu.iter().zip(&got) {
                let (Some(cl), Some(gl)) = (&c.text_logits, &g.text_logits) else {
                    anyhow::bail!("no logits read back");
                };
                let range = cl.iter().fold(0f32, |m, v| m.max(v.abs()));
                let e = cl
                    .iter()
                    .zip(gl)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                worst_rel = worst_rel.max(e / range);
                if c.text_token != g.text_token || c.tokens != g.tokens {
                    break;
                }
                agreed += 1;
            }
            // f32 must agree on every step; the others are reported.
            let pass = format != GpuFormat::F32 || agreed == inputs.len();
            failed += usize::from(!pass);
            lms.push(serde_json::json!({
                "model": format!("{preset} family, dim 512, 2 layers, ring 80, random"),
                "format": format.to_string(), "steps": inputs.len(),
                "tokens_agree_steps": agreed, "worst_relative_logit_error": worst_rel,
                "distinct_cpu_text_tokens": distinct.len(), "pass": pass,
            }));
        }
    }
    // Mimi at its published size with random weights: the GPU codec against the CPU's
    // over a few frames (random codebooks give constant codes: the decoder is held to
    // varied ones).
    let mut cpu_mimi = Mimi::from_weights(&Weights::random(7), MimiConfig::default(), 8)?;
    let mut gpu_mimi = parley_engine::models::mimi::gpu::GpuMimi::new(gpu, &cpu_mimi)?;
    let mut seed = 9u32;
    let (mut codes_equal, mut audio_error, mut peak) = (true, 0f32, 0f32);
    for i in 0..6 {
        let pcm: Vec<f32> = (0..cpu_mimi.frame_size())
            .map(|k| 0.2 * ((i * 1920 + k) as f32 * 0.011).sin())
            .collect();
        codes_equal &= gpu_mimi.encode_step(&pcm)? == cpu_mimi.encode_step(&pcm)?;
        let codes = random_codes(&mut seed, 8, 2048);
        let want = cpu_mimi.decode_step(&codes)?;
        let got = gpu_mimi.decode_step(&codes)?;
        peak = want.iter().fold(peak, |m, v| m.max(v.abs()));
        audio_error = want
            .iter()
            .zip(&got)
            .fold(audio_error, |m, (a, b)| m.max((a - b).abs()));
    }
    let mimi_pass = codes_equal && audio_error < 1e-4 * peak.max(1.0);
    failed += usize::from(!mimi_pass);
    let report = serde_json::json!({
        "matvec_cases": shapes.len(), "matvec_failed": bad, "matvec_worst_error_over_bound": worst,
        "lm": lms,
        "mimi": {"model": "published config, random weights, 8 codebooks", "frames": 6,
                 "codes_equal": codes_equal, "decoded_max_abs_error": audio_error,
                 "decoded_peak": peak, "pass": mimi_pass},
        "failed": failed, "seconds": t.elapsed().as_secs_f64(),
    });
    Ok((report, failed))
}

/// A field of /proc/self/status in KiB (VmRSS, VmHWM), where there is one.
fn proc_status_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The CPU's model name, for benchmark reports (CPUs differ between machines).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn bench_load(b: LoadBench) -> Result<()> {
    use parley_engine::models::checkpoint::PublishedLayout;
    use parley_engine::models::kyutai_config::ModelDir;
    if let Some(path) = &b.write_layout {
        let layout = PublishedLayout::load(path)?;
        let t = Instant::now();
        let bytes = layout.write_random_dir(&b.model_dir, None, 1)?;
        eprintln!(
            "wrote {} ({:.2} GB, {} tensors) in {:.1} s",
            b.model_dir.join(&layout.weights_file).display(),
            bytes as f64 / 1e9,
            layout.tensors.len(),
            t.elapsed().as_secs_f64()
        );
    }
    let dir = ModelDir::open(&b.model_dir)?;
    let base = proc_status_kib("VmRSS").unwrap_or(0);
    // Resets the peak (VmHWM) to the current size, so the peak below is the load's.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let t = Instant::now();
    let model = dir.load_lm_as(b.precision)?;
    let secs = t.elapsed().as_secs_f64();
    let after = proc_status_kib("VmRSS").unwrap_or(0);
    let peak = proc_status_kib("VmHWM").unwrap_or(0);
    let gb = |kib: u64| kib as f64 * 1024.0 / 1e9;
    let own = after.saturating_sub(base);
    let grew = peak.saturating_sub(base);
    let report = serde_json::json!({
        "cpu": cpu_model(),
        "model_dir": b.model_dir.display().to_string(),
        "precision": b.precision.to_string(),
        "load_s": secs,
        "rss_before_gb": gb(base),
        "rss_after_gb": gb(after),
        "peak_rss_gb": gb(peak),
        "peak_over_model": grew as f64 / own.max(1) as f64,
        "weights_per_step_gb": model.weight_bytes_per_step() as f64 / 1e9,
    });
    if b.json {
        outln!("{report}");
    } else {
        outln!(
            "{} in {}: loaded in {secs:.1} s; resident {:.2} GB after (from {:.2} GB), peak {:.2} GB ({:.3}x the model's own growth); {:.2} GB of weights per step; CPU {}",
            b.model_dir.display(),
            b.precision,
            gb(after),
            gb(base),
            gb(peak),
            grew as f64 / own.max(1) as f64,
            model.weight_bytes_per_step() as f64 / 1e9,
            cpu_model()
        );
    }
    Ok(())
}

fn bench_lm(b: LmBench) -> Result<()> {
    use parley_engine::compute::cpu::measure_read_bandwidth_gbs;
    use parley_engine::models::kyutai_config::ModelDir;
    use parley_engine::models::lm::generator::{GenConfig, LmBackend, LmGen};
    use parley_engine::models::lm::{config::PRESETS, LmConfig, LmModel};

    let threads = b
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Safe in edition 2021; nothing has read the variable yet, no threads started.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let (device, line) = parley_engine::compute::gpu::select_device(b.device)?;
    eprintln!("{line}");
    let t_load = Instant::now();
    let (backend, what) = match (&b.preset, &b.model_dir) {
        (Some(p), None) => {
            let cfg = LmConfig::preset(p).ok_or_else(|| {
                anyhow::anyhow!("unknown preset `{p}`; known: {}", PRESETS.join(", "))
            })?;
            if cfg.is_tts() {
                anyhow::bail!("{p} is a text-to-speech model: `parley bench tts` times it");
            }
            let (backend, weights) = LmBackend::open(&device, b.dtype, None, |precision| {
                LmModel::from_weights(&Weights::random(1).with_precision(precision), cfg)
            })?;
            eprintln!("{weights}");
            (backend, format!("{p}, random weights"))
        }
        (None, Some(dir)) => {
            let d = ModelDir::open(dir)?;
            let (backend, weights) =
                LmBackend::open(&device, b.dtype, Some(d.lm_param_count()?), |p| {
                    d.load_lm_as(p)
                })?;
            eprintln!("{weights}");
            (backend, dir.display().to_string())
        }
        _ => anyhow::bail!("say which model: --preset NAME --random-weights, or --model-dir DIR"),
    };
    // Accepted for the documented command line: presets always run on random weights.
    let _ = b.random_weights;
    let load_s = t_load.elapsed().as_secs_f64();
    let bytes = backend.weight_bytes_per_step();
    // The attention cache: the CPU reads the slots written so far (the whole ring once the
    // context is full), the GPU the whole ring.
    let full_cache = backend.state_bytes();
    let cfg = backend.config().clone();
    let warmup = if b.full_context {
        b.warmup.max(cfg.context.unwrap_or(0))
    } else {
        b.warmup
    };
    let cache_bytes = match (&backend, cfg.context) {
        (LmBackend::Cpu(_), Some(context)) => {
            let filled: f64 = (warmup..warmup + b.steps)
                .map(|i| (i + 1).min(context) as f64 / context as f64)
                .sum::<f64>()
                / b.steps.max(1) as f64;
            (full_cache as f64 * filled) as usize
        }
        _ => full_cache,
    };
    let (device_name, dispatches) = match &backend {
        LmBackend::Cpu(_) => (format!("CPU, {threads} thread(s)"), 0),
        LmBackend::Gpu(g) => (format!("GPU {}", g.adapter_name()), g.dispatches_per_step()),
    };
    let mut gen = LmGen::with_backend(backend, GenConfig::default());
    let n_in = gen.input_codebooks();
    let mut seed = 7u32;
    let mut ms = Vec::with_capacity(b.steps);
    for i in 0..warmup + b.steps {
        if i == warmup && b.by_layer {
            parley_engine::profile::enable();
        }
        let codes: Vec<u32> = (0..n_in)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) % cfg.card as u32
            })
            .collect();
        let t0 = Instant::now();
        std::hint::black_box(gen.step(&codes)?);
        if i >= warmup {
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let parts = parley_engine::profile::take();
    let s = Stats::of(&ms);
    let gbs = bytes as f64 / (s.p50 / 1e3) / 1e9;
    let gbs_all = (bytes + cache_bytes) as f64 / (s.p50 / 1e3) / 1e9;
    let cpu = parley_engine::compute::cpu::cpu_description();
    // The bandwidth beside the figure: the CPU's read probe, or the GPU's buffer copy.
    let (bw, bw_what) = match &device {
        parley_engine::compute::gpu::Backend::Cpu => (
            measure_read_bandwidth_gbs(1 << 30),
            "CPU read bandwidth (SIMD probe)",
        ),
        parley_engine::compute::gpu::Backend::Gpu(g) => (
            g.measure_copy_bandwidth_gbs(1 << 28)?,
            "GPU copy bandwidth (read + write, 256 MiB buffer copy)",
        ),
    };
    if b.json {
        outln!(
            "{}",
            serde_json::json!({
                "bench": "lm", "model": what, "dtype": b.dtype.to_string(), "device": device_name,
                "threads": threads, "steps": b.steps, "step_ms": s.json(),
                "weight_bytes_per_step": bytes, "effective_gbs": gbs,
                "cache_bytes_per_step": cache_bytes, "cache_bytes_full_context": full_cache,
                "warmup": warmup, "effective_gbs_with_cache": gbs_all,
                "cpu": cpu,
                "measured_bandwidth_gbs": bw, "bandwidth_probe": bw_what,
                "dispatches_per_step": dispatches, "load_s": load_s,
                "parts": parts.iter().map(|(name, secs, _)| serde_json::json!({
                    "part": name, "ms_per_step": secs * 1e3 / b.steps as f64,
                })).collect::<Vec<_>>(),
            })
        );
    } else {
        outln!(
            "lm step, {what}, {} weights, {device_name}, {} steps",
            b.dtype,
            b.steps
        );
        outln!(
            "  ms per step: mean {:.2}  p50 {:.2}  p90 {:.2}  max {:.2}",
            s.mean,
            s.p50,
            s.p90,
            s.max
        );
        outln!(
            "  weights read per step {:.3} GB -> {gbs:.1} GB/s effective (p50); {bw_what} {bw:.1} GB/s ({:.0}%)",
            bytes as f64 / 1e9,
            100.0 * gbs / bw
        );
        outln!(
            "  with the attention cache ({:.3} GB read per timed step, after {warmup} steps; {:.3} GB at full context): {gbs_all:.1} GB/s ({:.0}%)",
            cache_bytes as f64 / 1e9,
            full_cache as f64 / 1e9,
            100.0 * gbs_all / bw
        );
        outln!("  {cpu}");
        if dispatches > 0 {
            outln!("  {dispatches} kernel dispatches in one submit per step");
        }
        outln!("  model built in {load_s:.1} s");
        if !parts.is_empty() {
            outln!("  by part (mean ms per step, summed over the layers):");
            for (name, secs, _) in &parts {
                outln!("    {:>6.2}  {name}", secs * 1e3 / b.steps as f64);
            }
        }
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
    let mut early_ms = Vec::with_capacity(b.frames);
    let mut enc_ms = Vec::with_capacity(b.frames);
    let mut dec_ms = Vec::with_capacity(b.frames);
    let flush = if b.cold {
        vec![1.0f32; 1 << 28]
    } else {
        Vec::new()
    };
    for i in 0..b.warmup + b.frames {
        if i == b.warmup && b.by_layer {
            parley_engine::profile::enable();
        }
        if b.cold {
            std::hint::black_box(parley_engine::compute::cpu::read_all(&flush));
        }
        let frame = next_frame();
        let t_early = Instant::now();
        if b.early_half {
            mimi.encode_early(&frame[..fs / 2])?;
        }
        let t0 = Instant::now();
        let codes = mimi.encode_step(&frame)?;
        let t1 = Instant::now();
        let pcm = mimi.decode_step(&codes)?;
        let t2 = Instant::now();
        std::hint::black_box(pcm);
        if i >= b.warmup {
            early_ms.push((t0 - t_early).as_secs_f64() * 1e3);
            enc_ms.push((t1 - t0).as_secs_f64() * 1e3);
            dec_ms.push((t2 - t1).as_secs_f64() * 1e3);
        }
    }
    let layers: Vec<serde_json::Value> = parley_engine::profile::take()
        .into_iter()
        .map(|(name, s, _)| serde_json::json!({"layer": name, "ms_per_frame": s * 1e3 / b.frames as f64}))
        .collect();
    let total: Vec<f64> = enc_ms.iter().zip(&dec_ms).map(|(a, b)| a + b).collect();
    let (enc, dec, tot) = (Stats::of(&enc_ms), Stats::of(&dec_ms), Stats::of(&total));
    let early = Stats::of(&early_ms);
    let rtf = tot.mean / frame_ms;
    let cpu = parley_engine::compute::cpu::cpu_description();
    if b.json {
        outln!(
            "{}",
            serde_json::json!({
                "bench": "mimi", "weights": what, "threads": threads,
                "precision": format!("{:?}", b.source.precision),
                "codebooks": mimi.num_codebooks(), "frames": b.frames,
                "encode_ms": enc.json(), "decode_ms": dec.json(), "total_ms": tot.json(),
                "real_time_factor": rtf, "cpu": cpu, "layers": layers, "cold": b.cold,
                "early_half_ms": b.early_half.then(|| early.json()),
            })
        );
    } else {
        outln!(
            "mimi streaming, {what}, {:?} weights, {} codebooks, {threads} thread(s), {} frames of {frame_ms:.0} ms{}{}",
            b.source.precision,
            mimi.num_codebooks(),
            b.frames,
            if b.cold { ", 1 GiB read between frames" } else { "" },
            if b.early_half {
                "; each frame's first half encoded before it (`early`, not in `total`)"
            } else {
                ""
            }
        );
        outln!("            mean    p50    p90    max  (ms per frame)");
        let rows = [("encode", enc), ("decode", dec), ("total", tot)];
        let early_row = b.early_half.then_some(("early", early));
        for (name, s) in early_row.into_iter().chain(rows) {
            outln!(
                "  {name:<8} {:>6.2} {:>6.2} {:>6.2} {:>6.2}",
                s.mean,
                s.p50,
                s.p90,
                s.max
            );
        }
        outln!("  real-time factor {rtf:.3} (total mean / {frame_ms:.0} ms)");
        outln!("  {cpu}");
        if !layers.is_empty() {
            outln!("  by layer (mean ms per frame, in order):");
            for l in &layers {
                outln!(
                    "    {:>6.2}  {}",
                    l["ms_per_frame"].as_f64().unwrap_or(0.0),
                    l["layer"].as_str().unwrap_or("")
                );
            }
        }
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
        if xs.is_empty() {
            return Self {
                mean: f64::NAN,
                p50: f64::NAN,
                p90: f64::NAN,
                max: f64::NAN,
            };
        }
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

    fn line(&self) -> String {
        format!(
            "p50 {:.1} ms, p90 {:.1}, max {:.1}, mean {:.1}",
            self.p50, self.p90, self.max, self.mean
        )
    }
}

fn bench_tts(b: TtsBench) -> Result<()> {
    use parley_engine::models::lm::LmConfig;
    use parley_engine::models::tts::{
        Entry, Step, TtsDecoder, TtsModel, TtsOptions, TtsStream, Voice,
    };

    let threads = b
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Safe in edition 2021; nothing has read the variable yet, no threads started.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let cfg = LmConfig::preset(&b.preset)
        .filter(LmConfig::is_tts)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "`{}` is not a text-to-speech preset (tts-1.6b-en_fr)",
                b.preset
            )
        })?;
    use parley_engine::compute::gpu::{select_device, Backend, GpuFormat};
    let (backend, device_line) = select_device(b.device)?;
    let t_load = Instant::now();
    let (mut model, frame_bytes) = match &backend {
        Backend::Cpu => {
            let m = TtsModel::random(cfg, b.precision.cpu()?)?;
            // Weights one frame reads: the temporal transformer and heads once, and
            // each codebook's depformer weight set (sets 8..10 serve eight steps each).
            let bytes = m.lm.weight_bytes_per_frame(b.codebooks);
            (m, bytes)
        }
        Backend::Gpu(g) => {
            let f = b.precision.gpu()?;
            let host = match f {
                GpuFormat::F32 | GpuFormat::F16 => {
                    parley_engine::compute::cpu::WeightPrecision::F32
                }
                _ => parley_engine::compute::cpu::WeightPrecision::Bf16,
            };
            let mut m = TtsModel::random(cfg, host)?;
            m.to_gpu(g, f, b.codebooks)?;
            let bytes = m.gpu().map_or(0, |g| g.weight_bytes_per_step());
            (m, bytes)
        }
    };
    let dispatches = model.gpu().map(|g| g.dispatches_per_step());
    let mut mimi = Mimi::from_weights(&Weights::random(1), MimiConfig::default(), b.codebooks)?;
    mimi.set_weight_precision(b.precision.mimi_precision())?;
    let load_s = t_load.elapsed().as_secs_f64();
    let mut seed = 11u32;
    let mut rnd = || {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    };
    let latent: Vec<f32> = (0..512 * 125).map(|_| rnd()).collect();
    model.condition(&[&Voice::from_latent(&latent)?], "2.0")?;
    let opts = TtsOptions {
        temp: 0.6,
        codebooks: b.codebooks,
        ..TtsOptions::default()
    };
    let frame_rate = mimi.config().frame_rate;
    let t0 = Instant::now();
    let mut stream = TtsStream::new(&mut model, frame_rate, &opts)?;
    // Words enough for the frames asked for (a word every few steps).
    stream.push(
        (0..(b.frames + 40) as u32)
            .map(|i| Entry {
                tokens: vec![
                    if i == 0 { 1 } else { 100 + i % 7000 },
                    200 + (i * 13) % 7000,
                ],
                text: format!("w{i}"),
                padding: 2,
            })
            .collect(),
    );
    stream.finish_input();
    let (delays, delay_steps) = (stream.output().delays.clone(), stream.output().delay_steps);
    let mut decoder = TtsDecoder::new(&mut mimi, delay_steps, &delays);
    let (mut text_only, mut full, mut decode, mut first_audio) = (vec![], vec![], vec![], None);
    let mut audio_frames = 0;
    while audio_frames < b.frames {
        let ts = Instant::now();
        let step = stream.step()?;
        let step_ms = ts.elapsed().as_secs_f64() * 1e3;
        let t = stream.output().steps.len();
        if t <= delay_steps {
            text_only.push(step_ms);
        } else {
            full.push(step_ms);
        }
        match step {
            Step::Stepped { frame: Some(f) } => {
                let td = Instant::now();
                if decoder.push(&f)?.is_some() {
                    decode.push(td.elapsed().as_secs_f64() * 1e3);
                    first_audio.get_or_insert(t0.elapsed().as_secs_f64() * 1e3);
                    audio_frames += 1;
                }
            }
            Step::Stepped { frame: None } => {}
            Step::Done | Step::NeedWords => anyhow::bail!("the benchmark's text ran out"),
        }
    }
    let (lm, dec, txt) = (Stats::of(&full), Stats::of(&decode), Stats::of(&text_only));
    let per_frame = lm.p50 + dec.p50;
    let cpu = parley_engine::compute::cpu::cpu_description();
    let report = serde_json::json!({
        "preset": b.preset, "precision": b.precision.to_string(), "codebooks": b.codebooks,
        "threads": threads, "cpu": cpu, "device": device_line, "dispatches_per_step": dispatches,
        "load_s": load_s,
        "step_ms": lm.json(), "step_before_audio_ms": txt.json(), "decode_ms": dec.json(),
        "frame_ms_p50": per_frame, "real_time_factor": per_frame / 80.0,
        "first_audio_ms": first_audio, "frames": audio_frames,
        "weights_per_frame_gb": frame_bytes as f64 / 1e9,
        "read_gbs": frame_bytes as f64 / (lm.p50 / 1e3) / 1e9,
    });
    if b.json {
        outln!("{report}");
    } else {
        outln!(
            "{} ({}, {} codebooks, random weights), {threads} thread(s); {cpu}; {device_line}",
            b.preset,
            b.precision,
            b.codebooks
        );
        outln!(
            "  step with the depformer  {} ({:.2} GB of weights: {:.1} GB/s)",
            lm.line(),
            frame_bytes as f64 / 1e9,
            frame_bytes as f64 / (lm.p50 / 1e3) / 1e9
        );
        outln!("  step before the audio    {}", txt.line());
        outln!("  Mimi decode              {}", dec.line());
        outln!(
            "  per 80 ms frame {per_frame:.1} ms (p50): real-time factor {:.2}; first audio {:.0} ms after the first word",
            per_frame / 80.0,
            first_audio.unwrap_or(f64::NAN)
        );
    }
    Ok(())
}
