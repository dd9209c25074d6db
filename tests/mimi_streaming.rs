//! Mimi's streaming contract at full size: streaming equals offline, and state is bounded.

#[path = "common/speech.rs"]
mod speech;
use speech::{max_abs_diff, speech};
use std::path::Path;

use candle_core::Tensor;
use parley_engine::models::mimi::{Codes, Mimi, MimiConfig};
use parley_engine::models::weights::Weights;

/// The codec of fixture `name` (`mimi-tiny`, or the STT fixture's `stt-tiny`) with
/// `codebooks` codebooks.
fn fixture(name: &str, codebooks: usize) -> Mimi {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    let cfg = MimiConfig::from_json_file(&dir.join("mimi_config.json")).expect("config");
    Mimi::load(&dir.join("mimi.safetensors"), cfg, codebooks).expect("mimi")
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// The published architecture with random weights, on 4.6 s of speech: shorter than the
/// 10 s attention context, so both paths see the same keys. Random codebooks give one
/// constant code, so the encoder is compared on its unquantized latents and the decoder
/// on varied codes.
#[test]
fn full_size_streaming_equals_offline() {
    let mut mimi =
        Mimi::from_weights(&Weights::random(7), MimiConfig::default(), 32).expect("mimi");
    let pcm = speech();

    let offline: Vec<f32> = mimi
        .encode_latent(&pcm)
        .expect("latent")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec");
    mimi.reset();
    let steps: Vec<Tensor> = pcm
        .chunks(1920)
        .map(|f| mimi.encode_latent_step(f).expect("latent step"))
        .collect();
    let streamed: Vec<f32> = Tensor::cat(&steps, 2)
        .expect("cat")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec");
    let scale = max_abs(&offline);
    let err = max_abs_diff(&offline, &streamed);
    assert!(
        scale > 0.0 && err <= 1e-5 * scale,
        "latents: max diff {err}, scale {scale}"
    );
    // The latents follow the input: frame-to-frame they change by more than the error.
    let dim = 512;
    let n = offline.len() / dim;
    let moved = (1..n)
        .filter(|&t| {
            (0..dim).any(|c| (offline[c * n + t] - offline[c * n + t - 1]).abs() > 1e-3 * scale)
        })
        .count();
    assert!(
        moved > n / 2,
        "latents barely change over time ({moved} of {n} frames)"
    );

    let mut seed = 12345u32;
    let codes: Codes = (0..32)
        .map(|_| {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) % 2048
                })
                .collect()
        })
        .collect();
    let offline_audio = mimi.decode(&codes).expect("decode");
    mimi.reset();
    let mut audio = vec![];
    for t in 0..n {
        let frame: Vec<u32> = codes.iter().map(|row| row[t]).collect();
        audio.extend(mimi.decode_step(&frame).expect("decode_step"));
    }
    let peak = max_abs(&offline_audio);
    let err = max_abs_diff(&offline_audio, &audio);
    assert!(
        peak > 0.0 && err <= 1e-5 * peak,
        "audio: max diff {err}, peak {peak}"
    );
}

#[test]
fn streaming_state_stays_constant_over_a_long_session() {
    let mut mimi = fixture("mimi-tiny", 8);
    let pcm = speech();
    let frames: Vec<&[f32]> = pcm.chunks(1920).collect();
    let mut sizes = vec![];
    // 600 frames (48 s): the attention rings (12 steps) wrap many times over.
    for i in 0..600 {
        let codes = mimi.encode_step(frames[i % frames.len()]).expect("encode");
        let out = mimi.decode_step(&codes).expect("decode");
        assert_eq!(out.len(), 1920);
        if i == 1 || i == 599 {
            sizes.push(mimi.state_bytes());
        }
    }
    assert!(sizes[0] > 0);
    assert_eq!(sizes[0], sizes[1], "streaming state grew");
}

/// 12 frames of fixed codes over all 32 codebooks, decoded by `a` and by `b`.
fn decode_both(a: &mut Mimi, b: &mut Mimi) -> (Vec<f32>, Vec<f32>) {
    let codes: Codes = (0..32u32)
        .map(|k| (0..12u32).map(|t| (k * 131 + t * 977) % 2048).collect())
        .collect();
    let (mut x, mut y) = (vec![], vec![]);
    for t in 0..12 {
        let frame: Vec<u32> = codes.iter().map(|row| row[t]).collect();
        x.extend(a.decode_step(&frame).expect("decode"));
        y.extend(b.decode_step(&frame).expect("decode"));
    }
    (x, y)
}

/// bf16 weight precision reads half the bytes; on weights that are bf16 values already
/// (as in the published bf16 checkpoints) it must compute the same thing as f32.
#[test]
fn bf16_precision_matches_f32_on_bf16_weights() {
    use parley_engine::compute::cpu::WeightPrecision;
    let mut f32_mimi =
        Mimi::from_weights(&Weights::random_bf16(3), MimiConfig::default(), 32).expect("mimi");
    let mut bf16_mimi = f32_mimi.clone();
    bf16_mimi
        .set_weight_precision(WeightPrecision::Bf16)
        .expect("bf16");
    let pcm = &speech()[..1920 * 12];
    let a: Vec<f32> = f32_mimi
        .encode_latent(pcm)
        .expect("latent")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec");
    let b: Vec<f32> = bf16_mimi
        .encode_latent(pcm)
        .expect("latent")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec");
    let scale = max_abs(&a);
    let err = max_abs_diff(&a, &b);
    assert!(
        scale > 0.0 && err <= 1e-5 * scale,
        "latents: max diff {err}, scale {scale}"
    );
    let (x, y) = decode_both(&mut f32_mimi, &mut bf16_mimi);
    let peak = max_abs(&x);
    let err = max_abs_diff(&x, &y);
    assert!(
        peak > 0.0 && err <= 1e-4 * peak,
        "audio: max diff {err}, peak {peak}"
    );
}

/// The decoder adds no lookahead: frame n's 1920 samples come out of the step that
/// receives frame n's codes and never change afterwards (changing frame n+1's codes
/// leaves every earlier sample as it was), and they do depend on frame n's codes. So the
/// only latency the codec adds is the one frame of buffering, 80 ms.
#[test]
fn decoder_output_is_final_at_its_own_frame() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mimi-tiny");
    let cfg = MimiConfig::from_json_file(&dir.join("mimi_config.json")).expect("config");
    let (n_q, bins) = (cfg.quantizer.n_q, cfg.quantizer.bins as u32);
    let mut mimi = Mimi::load(&dir.join("mimi.safetensors"), cfg, n_q).expect("mimi");
    let mut codes = vec![];
    for frame in speech().chunks(1920).take(20) {
        codes.push(mimi.encode_step(frame).expect("encode"));
    }
    let decode = |mimi: &mut Mimi, codes: &[Vec<u32>]| -> Vec<Vec<f32>> {
        mimi.reset();
        codes
            .iter()
            .map(|c| {
                let out = mimi.decode_step(c).expect("decode");
                assert_eq!(out.len(), 1920, "one frame in, one frame out");
                out
            })
            .collect()
    };
    let base = decode(&mut mimi, &codes);
    for n in [3usize, 11] {
        let mut changed = codes.clone();
        for c in changed[n].iter_mut() {
            *c = (*c + 7) % bins;
        }
        let out = decode(&mut mimi, &changed);
        for f in 0..n {
            assert_eq!(
                out[f], base[f],
                "frame {f} changed when frame {n}'s codes did"
            );
        }
        assert!(
            max_abs_diff(&out[n], &base[n]) > 1e-4,
            "frame {n}'s audio does not depend on frame {n}'s codes"
        );
    }
}

/// q8_0 (what Mimi runs in beside a quantized LM: a third of bf16's time per frame on the
/// CPU) stays close to f32: latents within 2% of their range, decoded audio within 2% of
/// its peak, and most codes the same.
#[test]
fn q8_0_precision_stays_close_to_f32() {
    use parley_engine::compute::cpu::WeightPrecision;
    let mut f32_mimi =
        Mimi::from_weights(&Weights::random_bf16(3), MimiConfig::default(), 32).expect("mimi");
    let mut q8 = f32_mimi.clone();
    q8.set_weight_precision(WeightPrecision::Q8_0)
        .expect("q8_0");
    let pcm = &speech()[..1920 * 12];
    let latent = |m: &mut Mimi| -> Vec<f32> {
        m.encode_latent(pcm)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
            .expect("latent")
    };
    let (a, b) = (latent(&mut f32_mimi), latent(&mut q8));
    let scale = max_abs(&a);
    let err = max_abs_diff(&a, &b);
    eprintln!("latents: max diff {err}, scale {scale}");
    assert!(
        scale > 0.0 && err <= 2e-2 * scale,
        "latents: max diff {err}, scale {scale}"
    );
    let codes_a = f32_mimi.encode(pcm).expect("codes");
    let codes_b = q8.encode(pcm).expect("codes");
    let n: usize = codes_a.iter().map(Vec::len).sum();
    let same: usize = codes_a
        .iter()
        .zip(&codes_b)
        .map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p == q).count())
        .sum();
    eprintln!("codes: {same} of {n} the same");
    // The first codebooks (what the LMs lean on most) agree.
    assert_eq!(codes_a[0], codes_b[0], "first codebook");
    let (x, y) = decode_both(&mut f32_mimi, &mut q8);
    let peak = max_abs(&x);
    let err = max_abs_diff(&x, &y);
    eprintln!("audio: max diff {err}, peak {peak}");
    assert!(
        peak > 0.0 && err <= 2e-2 * peak,
        "audio: max diff {err}, peak {peak}"
    );
}

/// A frame begun early with its first half (`encode_early`, as a live session does 40 ms
/// before the frame is complete) encodes as the whole frame does: the same latents to
/// float rounding and the same codes, in f32 and in q8_0 (where the half's activations are
/// quantized apart from the other half's).
#[test]
fn a_frame_begun_early_encodes_as_the_whole_frame() {
    use parley_engine::compute::cpu::WeightPrecision;
    let pcm = &speech()[..1920 * 10];
    for precision in [WeightPrecision::F32, WeightPrecision::Q8_0] {
        let mut whole =
            Mimi::from_weights(&Weights::random_bf16(5), MimiConfig::default(), 32).expect("mimi");
        whole.set_weight_precision(precision).expect("precision");
        let mut early = whole.clone();
        let (mut a, mut b) = (vec![], vec![]);
        for (i, frame) in pcm.chunks(1920).enumerate() {
            // Latents on even frames, codes on odd ones: both paths go through the early half.
            if i % 2 == 0 {
                let latent = |m: &mut Mimi| -> Vec<f32> {
                    m.encode_latent_step(frame)
                        .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
                        .expect("latent")
                };
                a.extend(latent(&mut whole));
                early.encode_early(&frame[..960]).expect("early half");
                b.extend(latent(&mut early));
            } else {
                let codes = whole.encode_step(frame).expect("codes");
                early.encode_early(&frame[..960]).expect("early half");
                assert_eq!(
                    early.encode_step(frame).expect("codes"),
                    codes,
                    "{precision:?}: frame {i}'s codes"
                );
            }
        }
        let scale = max_abs(&a);
        let err = max_abs_diff(&a, &b);
        eprintln!("{precision:?}: latents max diff {err}, scale {scale}");
        assert!(
            scale > 0.0 && err <= 1e-5 * scale,
            "{precision:?}: latents max diff {err}, scale {scale}"
        );
        // The latents follow the input (else equal latents would prove nothing).
        let moved = a
            .chunks(512)
            .zip(a.chunks(512).skip(1))
            .filter(|(x, y)| max_abs_diff(x, y) > 1e-3 * scale)
            .count();
        assert!(moved >= 3, "{precision:?}: latents barely change ({moved})");
    }
}

#[test]
fn an_early_start_is_whole_steps_of_one_frame_and_begins_it() {
    let mut mimi = fixture("mimi-tiny", 8);
    let pcm = speech();
    for bad in [&pcm[..961], &pcm[..1920], &pcm[..0]] {
        let e = mimi
            .encode_early(bad)
            .expect_err("not whole steps short of a frame");
        assert!(e.to_string().contains("whole steps of 960"), "{e}");
    }
    mimi.encode_early(&pcm[..960]).expect("first half");
    let e = mimi
        .encode_early(&pcm[960..1920])
        .expect_err("a whole frame held");
    assert!(e.to_string().contains("960 already held"), "{e}");
    let e = mimi
        .encode_step(&pcm[1920..3840])
        .expect_err("another frame");
    assert!(
        e.to_string()
            .contains("does not begin with the 960 samples"),
        "{e}"
    );
    // A reset starts a new stream with nothing held.
    mimi.reset();
    mimi.encode_early(&pcm[..960]).expect("first half");
    assert_eq!(mimi.encode_step(&pcm[..1920]).expect("codes").len(), 8);
}

/// The same past the attention window: the STT fixture's codec (an encoder transformer
/// of a 12-step context, wrapped many times over 4.6 s) gives the same codes for frames
/// begun early, its first step attending to what it would with the whole frame.
#[test]
fn a_frame_begun_early_encodes_as_the_whole_frame_past_the_attention_window() {
    let mut whole = fixture("stt-tiny", 8);
    let mut early = whole.clone();
    let pcm = speech();
    let mut changed = 0;
    let mut last = vec![];
    for (i, frame) in pcm.chunks(1920).enumerate() {
        let codes = whole.encode_step(frame).expect("codes");
        early.encode_early(&frame[..960]).expect("early half");
        assert_eq!(early.encode_step(frame).expect("codes"), codes, "frame {i}");
        changed += usize::from(codes != last);
        last = codes;
    }
    assert!(changed > 40, "the codes barely change ({changed} frames)");
}
