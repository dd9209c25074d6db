//! `cargo run --release -- stt-1b-en_fr [steps]`: one LM step of Kyutai's `moshi` crate
//! (CPU, f32: its CPU path has no bf16 matmul) with random weights from a VarMap, so that
//! the weights are real pages, not untouched zeros.

use std::time::Instant;

use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use moshi::lm::{Config, LmModel};
use moshi::nn::MaybeQuantizedVarBuilder;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map(String::as_str).unwrap_or("stt-1b-en_fr");
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let mut cfg = match preset {
        // The architecture of kyutai/stt-1b-en_fr: asr_v0_1_1b with its published vocabularies,
        // codebooks and extra heads.
        "stt-1b-en_fr" => {
            let mut c = Config::asr_v0_1_1b();
            c.text_in_vocab_size = 8001;
            c.text_out_vocab_size = 8000;
            c.audio_codebooks = 32;
            c.extra_heads = Some(moshi::lm::ExtraHeadsConfig { num_heads: 4, dim: 6 });
            c
        }
        "moshi-7b" => Config::v0_1(),
        other => anyhow::bail!("unknown preset {other}"),
    };
    cfg.transformer.max_seq_len = 4096;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let t0 = Instant::now();
    let mut model = LmModel::new(&cfg, MaybeQuantizedVarBuilder::Real(vb))?;
    let n_params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    eprintln!("built {preset}: {:.2} B params in {:.1} s", n_params as f64 / 1e9, t0.elapsed().as_secs_f64());
    let mask = moshi::StreamMask::empty();
    let mut times = vec![];
    for i in 0..steps + 3 {
        let text = Some(Tensor::new(&[[(i % 100) as u32]], &dev)?);
        let audio: Vec<Option<Tensor>> = (0..cfg.audio_codebooks)
            .map(|k| Tensor::new(&[[((i * 31 + k * 7) % 2048) as u32]], &dev).map(Some))
            .collect::<candle::Result<_>>()?;
        let t = Instant::now();
        let (logits, hidden) = model.forward(text, audio, &mask)?;
        let _ = (logits.to_vec3::<f32>()?, hidden.dims().to_vec());
        if i >= 3 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "moshi crate {preset} f32, {} threads: p50 {:.1} ms per step (min {:.1}, max {:.1}), {:.2} GB of f32 weights",
        candle::utils::get_num_threads(),
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        n_params as f64 * 4.0 / 1e9
    );
    Ok(())
}
