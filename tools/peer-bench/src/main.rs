//! `cargo run --release -- stt-1b-en_fr [steps] [f32|q8_0]`: one LM step of Kyutai's
//! `moshi` crate (CPU; f32, its only float format there, or q8_0 through candle's quantized
//! kernels as Kyutai's `-candle-q8` models run) with random weights from a VarMap, so that
//! the weights are real pages, not untouched zeros. For q8_0 the VarMap's tensors are
//! quantized as candle's quantize tool does (rank-2 tensors whose rows are whole 32-value
//! blocks; the rest f32), written to a GGUF file and loaded back as Kyutai's are.

use std::time::Instant;

use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use moshi::lm::{Config, LmModel};
use moshi::nn::MaybeQuantizedVarBuilder;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map(String::as_str).unwrap_or("stt-1b-en_fr");
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let format = args.get(3).map(String::as_str).unwrap_or("f32");
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
    let mut bytes = n_params as f64 * 4.0;
    if format == "q8_0" {
        use candle::quantized::{gguf_file, GgmlDType, QTensor};
        let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("varmap lock"))?;
        let mut tensors = vec![];
        for (name, var) in data.iter() {
            let t = var.as_tensor();
            let q = if t.rank() == 2 && t.dim(1)? % 32 == 0 {
                GgmlDType::Q8_0
            } else {
                GgmlDType::F32
            };
            tensors.push((name.clone(), QTensor::quantize(t, q)?));
        }
        bytes = tensors.iter().map(|(_, q)| q.storage_size_in_bytes() as f64).sum();
        let path = std::env::temp_dir().join("peer-bench-q8.gguf");
        let mut f = std::fs::File::create(&path)?;
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
        gguf_file::write(&mut f, &[], &refs)?;
        drop(f);
        drop(data);
        let qvb = candle_transformers::quantized_var_builder::VarBuilder::from_gguf(&path, &dev)?;
        model = LmModel::new(&cfg, MaybeQuantizedVarBuilder::Quantized(qvb))?;
        std::fs::remove_file(&path)?;
    }
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
        "moshi crate {preset} {format}, {} threads: p50 {:.1} ms per step (min {:.1}, max {:.1}), {:.2} GB of weights",
        candle::utils::get_num_threads(),
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        bytes / 1e9
    );
    Ok(())
}
