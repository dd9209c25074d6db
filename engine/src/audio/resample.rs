//! Whole-buffer resampling with rubato, delay-compensated so that sample `t` of the output
//! lines up with time `t / rate_out` of the input.

use rubato::{FftFixedIn, Resampler};

use crate::{Error, Result};

/// Resamples one channel from `rate_in_hz` to `rate_out_hz`. The output has
/// `round(len * rate_out / rate_in)` samples.
pub fn resample_mono(pcm: &[f32], rate_in_hz: u32, rate_out_hz: u32) -> Result<Vec<f32>> {
    if rate_in_hz == rate_out_hz || pcm.is_empty() {
        return Ok(pcm.to_vec());
    }
    let err = |e: &dyn std::fmt::Display| {
        Error::InvalidInput(format!(
            "resampling {rate_in_hz} Hz -> {rate_out_hz} Hz failed: {e}"
        ))
    };
    const CHUNK_IN: usize = 1024;
    let mut resampler =
        FftFixedIn::<f32>::new(rate_in_hz as usize, rate_out_hz as usize, CHUNK_IN, 2, 1)
            .map_err(|e| err(&e))?;
    let want = ((pcm.len() as u64 * rate_out_hz as u64 + rate_in_hz as u64 / 2) / rate_in_hz as u64)
        as usize;
    let delay = resampler.output_delay();
    let mut out = Vec::with_capacity(want + delay + CHUNK_IN * 2);
    let mut pos = 0;
    while pos < pcm.len() {
        let need = resampler.input_frames_next();
        if pcm.len() - pos >= need {
            let chunk = resampler
                .process(&[&pcm[pos..pos + need]], None)
                .map_err(|e| err(&e))?;
            out.extend_from_slice(&chunk[0]);
            pos += need;
        } else {
            let chunk = resampler
                .process_partial(Some(&[&pcm[pos..]]), None)
                .map_err(|e| err(&e))?;
            out.extend_from_slice(&chunk[0]);
            pos = pcm.len();
        }
    }
    // Flush the resampler's delay line with silence until the whole signal is out.
    while out.len() < want + delay {
        let chunk = resampler
            .process_partial(None::<&[&[f32]]>, None)
            .map_err(|e| err(&e))?;
        if chunk[0].is_empty() {
            break;
        }
        out.extend_from_slice(&chunk[0]);
    }
    let end = (delay + want).min(out.len());
    let mut res = out[delay.min(end)..end].to_vec();
    res.resize(want, 0.0);
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(freq_hz: f32, rate_hz: u32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (2.0 * std::f32::consts::PI * freq_hz * i as f32 / rate_hz as f32).sin())
            .collect()
    }

    #[test]
    fn resampled_sine_keeps_phase_and_length() {
        for rate_in in [16_000u32, 44_100, 48_000, 8_000] {
            let input = sine(440.0, rate_in, rate_in as usize); // one second
            let out = resample_mono(&input, rate_in, 24_000).expect("resample");
            assert_eq!(out.len(), 24_000, "rate {rate_in}");
            let expect = sine(440.0, 24_000, 24_000);
            // Away from the edges the resampled sine equals the sine sampled at 24 kHz.
            let max_err = out[2000..22000]
                .iter()
                .zip(&expect[2000..22000])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max_err < 2e-2, "rate {rate_in}: max err {max_err}");
        }
    }
}
