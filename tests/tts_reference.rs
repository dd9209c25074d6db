//! The TTS model against the reference (`tests/reference/make_tts_fixtures.py`: a tiny
//! random-weight Kyutai TTS built with the official package's classes, run greedily on
//! two sentences with two voices). Step by step, with the reference's own inputs fed back
//! (the text tokens its state machine fed, the audio tokens it sampled): the summed
//! conditions, the text logits of every step, and every audio token the depformer picks.
//! This checks the model (cross-attention on the voice, the demuxed text embedding, the
//! low-rank depformer embeddings, the weight schedule, the ring wrapping) apart from the
//! text procedure around it.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
#[path = "common/gpu.rs"]
mod common_gpu;
use common_gpu::any_gpu;

use parley_engine::compute::cpu::WeightPrecision;
use parley_engine::compute::gpu::GpuFormat;
use parley_engine::models::lm::LmConfig;
use parley_engine::models::tts::{TtsModel, Voice};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tts-tiny")
}

fn npy(name: &str) -> Tensor {
    let p = dir().join(name);
    Tensor::read_npy(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn model() -> TtsModel {
    let cfg = LmConfig::from_json_file(&dir().join("config.json")).expect("config");
    TtsModel::load(&dir().join("model.safetensors"), cfg, WeightPrecision::F32).expect("model")
}

fn voice(name: &str) -> Voice {
    Voice::load(&dir().join(name)).expect("voice")
}

/// The fixture's constants (tts_cases.json).
const INITIAL_TEXT: i64 = 85;
const INITIAL_AUDIO: i64 = 32;
const DELAY_STEPS: usize = 16;

#[test]
fn the_summed_conditions_match() {
    let m = model();
    let want: Vec<f32> = npy("condition_sum.npy")
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("f32");
    let got = m.conditioners.condition_sum("2.0", "ok").expect("sum");
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "{worst}");
    let err = m.conditioners.condition_sum("9.0", "ok").expect_err("bin");
    assert!(err.to_string().contains("1.0, 1.5"), "{err}");
}

#[test]
fn every_step_matches_the_reference_with_its_inputs_fed_back() {
    let mut m = model();
    let delays = m.lm.config().delays.clone();
    let n_q = m.lm.config().n_q;
    let (va, vb) = (voice("voice_a.safetensors"), voice("voice_b.safetensors"));
    let mut checked_audio = 0;
    for (case, v) in [
        ("s0_voice_a", &va),
        ("s0_voice_b", &vb),
        ("s1_voice_a", &va),
        ("s1_voice_b", &vb),
    ] {
        m.lm.reset();
        m.condition(&[v], "2.0").expect("condition");
        // [1 + n_q, frames]: frame f holds the semantic token sampled at step f and the
        // acoustic ones sampled at step f + 2 (-1 while masked).
        let frames: Vec<Vec<i64>> = npy(&format!("{case}_tokens.npy")).to_vec2().expect("i64");
        let fed: Vec<Vec<i64>> = npy(&format!("{case}_text_log.npy")).to_vec2().expect("i64");
        let logits: Vec<Vec<f32>> = npy(&format!("{case}_text_logits.npy"))
            .to_vec2()
            .expect("f32");
        let n_frames = frames[0].len();
        // The token codebook q sampled at step s (after the delay mask), where known.
        let sampled = |q: usize, s: usize| -> Option<i64> {
            let f = if q == 0 { s } else { s.checked_sub(2)? };
            frames.get(1 + q)?.get(f).copied()
        };
        // Steps whose inputs are all known: the semantic token of step s is in frame s.
        let steps = (n_frames + 1).min(logits.len());
        for t in 0..steps {
            let mut input = vec![if t == 0 { INITIAL_TEXT } else { fed[1][t - 1] }];
            for q in 0..n_q {
                input.push(if t <= delays[q + 1] {
                    INITIAL_AUDIO
                } else {
                    sampled(q, t - 1).expect("known input")
                });
            }
            let out = m.lm.temporal_step(&input).expect("step");
            let worst = out
                .text_logits
                .iter()
                .zip(&logits[t])
                .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{case} step {t}: text logits off by {worst}");
            if t < DELAY_STEPS {
                continue;
            }
            let picked =
                m.lm.depformer_step(fed[1][t], &out.hidden, |_, l| argmax(l))
                    .expect("depformer");
            for (q, &tok) in picked.iter().enumerate() {
                if t < delays[q + 1] + DELAY_STEPS {
                    continue; // masked in the reference's output
                }
                if let Some(want) = sampled(q, t) {
                    assert_eq!(tok as i64, want, "{case} step {t} codebook {q}");
                    checked_audio += 1;
                }
            }
        }
    }
    assert!(checked_audio > 300, "{checked_audio} audio tokens checked");
}

fn argmax(l: &[f32]) -> u32 {
    l.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0 as u32
}

#[test]
fn bad_voices_are_named() {
    let tmp = std::env::temp_dir().join(format!("parley-tts-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    // A model file is not a voice.
    let err = Voice::load(&dir().join("mimi.safetensors")).expect_err("not a voice");
    assert!(err.to_string().contains("speaker_wavs"), "{err}");
    let missing = Voice::load(&tmp.join("nope.safetensors")).expect_err("missing");
    assert!(
        missing.to_string().contains("nope.safetensors"),
        "{missing}"
    );
    let mut m = model();
    let v = voice("voice_a.safetensors");
    let six: Vec<&Voice> = std::iter::repeat_n(&v, 6).collect();
    assert!(m.condition(&six, "2.0").is_err());
    assert!(m.condition(&[], "2.0").is_err());
    // A TTS checkpoint is refused by the STT/Moshi loader, by name.
    let cfg = LmConfig::from_json_file(&dir().join("config.json")).expect("config");
    let err = cfg.validate().expect_err("tts");
    assert!(err.contains("parley tts"), "{err}");
}

fn cases() -> serde_json::Value {
    let text = std::fs::read_to_string(dir().join("tts_cases.json")).expect("cases");
    serde_json::from_str(&text).expect("json")
}

/// The whole procedure, greedy, as the reference ran it: the script's words and pauses,
/// the text fed step by step, every frame of tokens, the end, the transcript's times, and
/// the decoded speech.
#[test]
fn greedy_generation_matches_the_reference() {
    greedy_generation_matches_the_reference_on(&mut model(), "CPU");
}

/// The same on the GPU (lavapipe in CI), f32 weights: the temporal step with its
/// cross-attention over keys and values made on the GPU, the text predicted there, the
/// depformer fed the text the state machine chose, all in one submit per step.
#[test]
fn greedy_generation_on_the_gpu_matches_the_reference() {
    let Some(gpu) = any_gpu() else { return };
    let mut m = model();
    let n = m.lm.config().dep_q;
    m.to_gpu(&gpu, GpuFormat::F32, n).expect("gpu");
    greedy_generation_matches_the_reference_on(&mut m, "GPU");
}

fn greedy_generation_matches_the_reference_on(m: &mut TtsModel, on: &str) {
    use parley_engine::models::kyutai_config::ModelDir;
    use parley_engine::models::tts::{script_to_entries, TtsOptions};
    let d = ModelDir::open(&dir()).expect("dir");
    let tok = d.load_tokenizer().expect("tokenizer");
    let mut mimi = d.load_mimi().expect("mimi");
    mimi.set_num_codebooks(8).expect("codebooks");
    let cases = cases();
    for c in cases["cases"].as_array().expect("cases") {
        let name = c["name"].as_str().expect("name");
        let script: Vec<&str> = c["script"]
            .as_array()
            .expect("script")
            .iter()
            .map(|s| s.as_str().expect("line"))
            .collect();
        let entries = script_to_entries(&tok, &script, 12.5, true, 1).expect("entries");
        let want_entries: Vec<(Vec<u32>, usize)> = c["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| {
                (
                    serde_json::from_value(e["tokens"].clone()).expect("tokens"),
                    e["padding"].as_u64().expect("padding") as usize,
                )
            })
            .collect();
        let got_entries: Vec<(Vec<u32>, usize)> = entries
            .iter()
            .map(|e| (e.tokens.clone(), e.padding))
            .collect();
        assert_eq!(got_entries, want_entries, "{name}: entries");
        let v = voice(c["voice"].as_str().expect("voice"));
        m.condition(&[&v], c["cfg"].as_str().expect("cfg"))
            .expect("condition");
        let opts = TtsOptions {
            temp: 0.0,
            ..TtsOptions::default()
        };
        let out = m.generate(entries, 12.5, &opts).expect("generate");
        let log: Vec<Vec<i64>> = npy(&format!("{name}_text_log.npy")).to_vec2().expect("log");
        let predicted: Vec<i64> = out.predicted.iter().map(|&p| p as i64).collect();
        let fed: Vec<i64> = out.steps.iter().map(|s| s[0]).collect();
        assert_eq!(predicted, log[0], "{on} {name}: predicted text");
        assert_eq!(fed, log[1], "{on} {name}: fed text");
        assert_eq!(
            out.end_step,
            c["end_step"].as_u64().map(|e| e as usize),
            "{name}"
        );
        let frames = out.frames();
        let want: Vec<Vec<i64>> = npy(&format!("{name}_tokens.npy"))
            .to_vec2()
            .expect("tokens");
        let got: Vec<Vec<i64>> = (0..want.len())
            .map(|k| frames.iter().map(|f| f[k]).collect())
            .collect();
        assert_eq!(got, want, "{on} {name}: frames");
        let times: Vec<usize> = out.transcript.iter().map(|w| w.1).collect();
        let want_times: Vec<usize> = c["transcript"]
            .as_array()
            .expect("transcript")
            .iter()
            .map(|w| w[1].as_u64().expect("step") as usize)
            .collect();
        assert_eq!(times, want_times, "{name}: transcript");
        let pcm = out.decode(&mut mimi).expect("decode");
        let mut r = hound::WavReader::open(dir().join(format!("{name}_audio.wav"))).expect("wav");
        let want_pcm: Vec<f32> = r
            .samples::<i16>()
            .map(|s| s.expect("sample") as f32 / 32768.0)
            .collect();
        assert_eq!(pcm.len(), want_pcm.len(), "{name}: samples");
        let worst = pcm
            .iter()
            .zip(&want_pcm)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // The fixture holds 16-bit samples: 1.6e-5 of rounding on top of 1e-4.
        assert!(worst < 1e-4 + 1.6e-5, "{on} {name}: audio off by {worst}");
        assert!(pcm.iter().any(|v| v.abs() > 1e-3), "{name}: silent");
    }
}

/// Words that arrive while audio is already coming out give the same tokens as the whole
/// text at once: a step that needs a word waits for it, emitting nothing.
#[test]
fn streaming_words_in_equals_the_whole_text() {
    streaming_words_in_equals_the_whole_text_on(&mut model());
}

/// On the GPU the steps that wait for words take two submits (the temporal step, then
/// the depformer once the word is here) where the others take one: the same tokens.
#[test]
fn streaming_words_in_equals_the_whole_text_on_the_gpu() {
    let Some(gpu) = any_gpu() else { return };
    let mut m = model();
    let n = m.lm.config().dep_q;
    m.to_gpu(&gpu, GpuFormat::F32, n).expect("gpu");
    streaming_words_in_equals_the_whole_text_on(&mut m);
}

fn streaming_words_in_equals_the_whole_text_on(m: &mut TtsModel) {
    use parley_engine::models::kyutai_config::ModelDir;
    use parley_engine::models::tts::{script_to_entries, Step, TtsOptions, TtsStream};
    let tok = ModelDir::open(&dir())
        .expect("dir")
        .load_tokenizer()
        .expect("tokenizer");
    let v = voice("voice_b.safetensors");
    let script = ["Good morning! <break time=\"0.2s\"/> Shall we? Hello, this is Parley."];
    let entries = script_to_entries(&tok, &script, 12.5, true, 1).expect("entries");
    // Sampling, not greedy: the random choices must line up too.
    let opts = TtsOptions {
        temp: 0.8,
        seed: 5,
        ..TtsOptions::default()
    };
    m.condition(&[&v], "2.0").expect("condition");
    let whole = m.generate(entries.clone(), 12.5, &opts).expect("whole");
    assert!(whole.end_step.is_some());
    // Only when asked (the latest possible), and one word every few steps (earlier).
    for every in [usize::MAX, 3] {
        m.condition(&[&v], "2.0").expect("condition");
        let mut s = TtsStream::new(m, 12.5, &opts).expect("stream");
        let mut left = entries.clone().into_iter();
        let (mut steps, mut waits, mut frames) = (0usize, 0usize, 0usize);
        loop {
            if every != usize::MAX && steps % every == 0 {
                if let Some(e) = left.next() {
                    s.push(vec![e]);
                }
            }
            match s.step().expect("step") {
                Step::Stepped { frame } => {
                    steps += 1;
                    frames += usize::from(frame.is_some());
                }
                Step::NeedWords => {
                    waits += 1;
                    match left.next() {
                        Some(e) => s.push(vec![e]),
                        None => s.finish_input(),
                    }
                }
                Step::Done => break,
            }
        }
        let out = s.into_output();
        assert!(waits > 0, "every {every}: it never waited for a word");
        assert_eq!(out.steps, whole.steps, "every {every}: steps");
        assert_eq!(out.predicted, whole.predicted, "every {every}");
        assert_eq!(out.end_step, whole.end_step);
        assert_eq!(out.transcript, whole.transcript);
        assert_eq!(
            frames,
            whole.frames().len(),
            "a frame per step after the delays"
        );
    }
}

/// Text the tokenizer cannot say, or no text at all, is refused with the reason.
#[test]
fn bad_text_is_named() {
    use parley_engine::models::kyutai_config::ModelDir;
    use parley_engine::models::tts::script_to_entries;
    let tok = ModelDir::open(&dir())
        .expect("dir")
        .load_tokenizer()
        .expect("tokenizer");
    for text in ["", "   ", "<break time=\"1s\"/>"] {
        let err = script_to_entries(&tok, &[text], 12.5, true, 1).expect_err(text);
        assert!(err.to_string().contains("no words"), "{text:?}: {err}");
    }
    let err = script_to_entries(&tok, &["hello 日本語"], 12.5, true, 1).expect_err("alphabet");
    assert!(err.to_string().contains("日本語"), "{err}");
    let e = script_to_entries(&tok, &["a <break time=\"1.5s\"/> b"], 12.5, true, 1).expect("break");
    assert_eq!(e.len(), 3);
    assert!(e[1].tokens.is_empty() && e[1].padding == 19, "{e:?}");
    // Half a step rounds to even, as Python's round: 0.2 s is 2.5 steps, so 2.
    let e = script_to_entries(&tok, &["a <break time=\"0.2s\"/>"], 12.5, true, 1).expect("break");
    assert_eq!(e[1].padding, 2);
}

/// Text cut into pieces anywhere (inside words, inside a break tag) gives the entries of
/// the whole text.
#[test]
fn text_in_pieces_gives_the_whole_texts_words() {
    use parley_engine::models::kyutai_config::ModelDir;
    use parley_engine::models::tts::{script_to_entries, WordFeed};
    let tok = ModelDir::open(&dir())
        .expect("dir")
        .load_tokenizer()
        .expect("tokenizer");
    let text = "Good morning! <break time=\"0.2s\"/> Shall we?  Hello, this is Parley.";
    let whole = script_to_entries(&tok, &[text], 12.5, true, 1).expect("whole");
    for size in [1, 2, 3, 5, 7, 11] {
        let mut feed = WordFeed::default();
        let mut got = vec![];
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(size) {
            let piece: String = piece.iter().collect();
            got.extend(
                feed.push(&tok, &piece, 12.5)
                    .unwrap_or_else(|e| panic!("size {size}, piece {piece:?}: {e}")),
            );
        }
        got.extend(feed.finish(&tok, 12.5).expect("finish"));
        assert_eq!(got, whole, "pieces of {size}");
    }
}
