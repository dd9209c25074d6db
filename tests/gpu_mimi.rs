//! Mimi on the GPU against the CPU path: the tiny fixture codec (attention ring of 12
//! rows, so 4.6 s of speech wraps it many times) streamed frame by frame, codes identical
//! and decoded audio within 1e-4; a reset starts the same stream again; the published
//! architecture with random weights decodes varied codes as the CPU does. Skips, saying
//! why, where no GPU adapter exists.

#[path = "common/gpu.rs"]
mod common_gpu;
use common_gpu::any_gpu;

#[path = "common/speech.rs"]
mod speech;
use speech::{max_abs_diff, speech};
use std::path::Path;

use parley_engine::models::mimi::gpu::GpuMimi;
use parley_engine::models::mimi::{Mimi, MimiConfig};
use parley_engine::models::weights::Weights;

fn fixture() -> Mimi {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mimi-tiny");
    let cfg = MimiConfig::from_json_file(&dir.join("mimi_config.json")).expect("config");
    Mimi::load(&dir.join("mimi.safetensors"), cfg, 8).expect("mimi")
}

#[test]
fn tiny_codec_on_the_gpu_matches_the_cpu_frame_by_frame() {
    let Some(gpu) = any_gpu() else { return };
    let mut cpu = fixture();
    let mut g = GpuMimi::new(&gpu, &cpu).expect("gpu mimi");
    let (enc, dec) = g.dispatches();
    eprintln!("dispatches per frame: encoder {enc}, decoder {dec}");
    let pcm = speech();
    let frames = pcm.len() / 1920;
    assert!(frames > 50, "{frames} frames");
    let mut codes = vec![];
    for (t, f) in pcm.chunks(1920).enumerate() {
        let want = cpu.encode_step(f).expect("cpu encode");
        let got = g.encode_step(f).expect("gpu encode");
        assert_eq!(got, want, "frame {t}: codes");
        codes.push(want);
    }
    // The codes vary, so their agreement means something.
    let distinct: std::collections::HashSet<&Vec<u32>> = codes.iter().collect();
    assert!(
        distinct.len() > frames / 2,
        "{} distinct frames of codes",
        distinct.len()
    );
    let mut worst = 0f32;
    for (t, c) in codes.iter().enumerate() {
        let want = cpu.decode_step(c).expect("cpu decode");
        let got = g.decode_step(c).expect("gpu decode");
        let e = max_abs_diff(&want, &got);
        assert!(e < 1e-4, "frame {t}: audio differs by {e}");
        worst = worst.max(e);
    }
    eprintln!("{frames} frames: codes identical, audio within {worst:.2e}");
    // A reset starts the same stream again.
    g.reset();
    for (t, f) in pcm.chunks(1920).take(10).enumerate() {
        assert_eq!(
            g.encode_step(f).expect("encode"),
            codes[t],
            "frame {t} after a reset"
        );
    }
    let e = g.decode_step(&[0; 3]).expect_err("3 codes");
    assert!(e.to_string().contains("8 codes"), "{e}");
    let e = g.decode_step(&[99; 8]).expect_err("out of range");
    assert!(e.to_string().contains("code 99"), "{e}");
}

#[test]
fn published_codec_on_the_gpu_decodes_as_the_cpu() {
    let Some(gpu) = any_gpu() else { return };
    let mut cpu = Mimi::from_weights(&Weights::random(7), MimiConfig::default(), 8).expect("mimi");
    let mut g = GpuMimi::new(&gpu, &cpu).expect("gpu mimi");
    let pcm = speech();
    for (t, f) in pcm.chunks(1920).take(4).enumerate() {
        assert_eq!(
            g.encode_step(f).expect("gpu"),
            cpu.encode_step(f).expect("cpu"),
            "frame {t}"
        );
    }
    let mut seed = 3u32;
    let mut worst = 0f32;
    for t in 0..6 {
        let codes: Vec<u32> = (0..8)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) % 2048
            })
            .collect();
        let want = cpu.decode_step(&codes).expect("cpu");
        let got = g.decode_step(&codes).expect("gpu");
        let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let e = max_abs_diff(&want, &got);
        assert!(
            e < 1e-4 * scale.max(1.0),
            "frame {t}: audio differs by {e} (peak {scale})"
        );
        worst = worst.max(e);
    }
    eprintln!("published size: audio within {worst:.2e}");
}

/// A duplex session on the GPU (the fixture Moshi, greedy) runs Mimi there too, says so,
/// and speaks what the same session on the CPU speaks: the same words, audio within 1e-3.
#[test]
fn a_duplex_session_on_the_gpu_runs_mimi_there_and_speaks_as_on_the_cpu() {
    use crossbeam_channel::bounded;
    use parley_engine::audio::virtual_device::{FileSource, Pace, RecordingSink};
    use parley_engine::compute::gpu::DeviceChoice;
    use parley_engine::compute::Dtype;
    use parley_engine::models::lm::generator::GenConfig;
    use parley_engine::pipeline::{Event, Mode, Models, Session, SessionOptions, TurnModels};

    if any_gpu().is_none() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let run = |device: DeviceChoice| {
        let mut models = Models::load(
            &root.join("tests/fixtures/moshi-tiny"),
            Mode::Duplex,
            device,
            Dtype::F32,
            Some(GenConfig::default()),
        )
        .expect("models");
        assert_eq!(models.gpu_mimi.is_some(), device == DeviceChoice::Gpu);
        models.turn = TurnModels::energy_only(Default::default());
        let (tx, rx) = bounded::<Event>(1 << 16);
        let source = FileSource::open(
            &root.join("tests/fixtures/mimi-tiny/input.wav"),
            Pace::Unpaced,
        )
        .expect("recording");
        let sink = RecordingSink::new();
        let played = sink.handle();
        let session = Session::start(
            models,
            Box::new(source),
            Box::new(sink),
            tx,
            SessionOptions::default(),
        )
        .expect("start");
        let events: Vec<Event> = rx.iter().collect();
        session.join().expect("join");
        let device_line = events
            .iter()
            .find_map(|e| match e {
                Event::Started { device, .. } => Some(device.clone()),
                _ => None,
            })
            .expect("started");
        let text: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                Event::TextDelta { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect();
        (device_line, text, played.recording().pcm_24k)
    };
    let (cpu_line, cpu_text, cpu_pcm) = run(DeviceChoice::Cpu);
    let (gpu_line, gpu_text, gpu_pcm) = run(DeviceChoice::Gpu);
    assert!(cpu_line.contains("Mimi on the CPU"), "{cpu_line}");
    assert!(gpu_line.contains("Mimi on the GPU"), "{gpu_line}");
    assert!(!cpu_text.is_empty(), "the fixture says something");
    assert_eq!(gpu_text, cpu_text);
    let peak = cpu_pcm.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(peak > 0.0, "the fixture's reply is audible");
    let e = max_abs_diff(&cpu_pcm, &gpu_pcm);
    assert!(e < 1e-3, "the replies differ by {e} (peak {peak})");
    eprintln!(
        "{} frames spoken alike: audio within {e:.2e} of peak {peak}",
        cpu_pcm.len() / 1920
    );
}
