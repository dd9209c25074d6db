//! Resampling with rubato, delay-compensated so that sample `t` of the output lines up with
//! time `t / rate_out` of the input.
//!
//! - [`resample_mono`]: a whole buffer at once (files), with the FFT resampler.
//! - [`InputResampler`] and [`OutputResampler`]: streams between a live device's rate and
//!   the models' 24 kHz, a piece at a time, with a short windowed-sinc filter (128 taps: it
//!   holds back 64 input samples, 1.3 ms at 48 kHz; the input side also waits for whole
//!   10 ms chunks). They run on the threads that read from and write to the device rings,
//!   never inside an audio callback.

use std::collections::VecDeque;

use rubato::{
    calculate_cutoff, FftFixedIn, Resampler, SincFixedIn, SincInterpolationParameters,
    SincInterpolationType, WindowFunction,
};

use super::{FRAME_LEN_SAMPLES, SAMPLE_RATE_HZ};
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

/// Length of the streaming resamplers' sinc filter, in input samples.
const STREAM_SINC_LEN: usize = 128;

/// One mono stream through rubato's sinc resampler: pushes of any length in, output appended
/// to the caller's buffer.
///
/// Unlike the FFT resampler, `SincFixedIn` needs no delay compensation: output sample `k`
/// already sits at input time `k / ratio` (measured within one sample by
/// `tests/audio_devices.rs`); what the filter needs of the future it takes by emitting the
/// last few samples of a chunk with the next one.
struct MonoStream {
    resampler: SincFixedIn<f32>,
    rate_in_hz: u32,
    rate_out_hz: u32,
    /// Input samples waiting for a whole chunk; never more than `chunk_in`.
    pending: Vec<f32>,
    chunk_in: usize,
    /// rubato's output buffer, sized once for its largest chunk.
    out: Vec<f32>,
    /// Real input samples pushed and output samples emitted, for an exact-length flush.
    pushed_in: u64,
    emitted_out: u64,
}

impl MonoStream {
    fn new(rate_in_hz: u32, rate_out_hz: u32, chunk_in: usize) -> Result<Self> {
        if rate_in_hz == 0 || rate_out_hz == 0 || chunk_in == 0 {
            return Err(Error::InvalidInput(format!(
                "cannot resample {rate_in_hz} Hz -> {rate_out_hz} Hz in chunks of {chunk_in}"
            )));
        }
        let window = WindowFunction::BlackmanHarris2;
        let parameters = SincInterpolationParameters {
            sinc_len: STREAM_SINC_LEN,
            f_cutoff: calculate_cutoff(STREAM_SINC_LEN, window),
            oversampling_factor: 256,
            interpolation: SincInterpolationType::Linear,
            window,
        };
        let ratio = rate_out_hz as f64 / rate_in_hz as f64;
        let resampler = SincFixedIn::<f32>::new(ratio, 1.0, parameters, chunk_in, 1)
            .map_err(|e| stream_err(rate_in_hz, rate_out_hz, &e))?;
        let out = vec![0.0; resampler.output_frames_max()];
        Ok(Self {
            resampler,
            rate_in_hz,
            rate_out_hz,
            pending: Vec::with_capacity(chunk_in),
            chunk_in,
            out,
            pushed_in: 0,
            emitted_out: 0,
        })
    }

    /// Resamples `input`, appending every output sample that is complete to `sink`.
    fn push(&mut self, mut input: &[f32], sink: &mut impl Extend<f32>) -> Result<()> {
        self.pushed_in += input.len() as u64;
        while !input.is_empty() {
            let take = (self.chunk_in - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() == self.chunk_in {
                self.run_chunk(u64::MAX, sink)?;
            }
        }
        Ok(())
    }

    /// Ends the stream: pushes silence through the filter until every output sample that
    /// the real input determines is out, and no more (`round(len * rate_out / rate_in)` in
    /// all), then starts afresh: later input begins a new stream.
    fn flush(&mut self, sink: &mut impl Extend<f32>) -> Result<()> {
        let want = (self.pushed_in * self.rate_out_hz as u64 + self.rate_in_hz as u64 / 2)
            / self.rate_in_hz as u64;
        // Each chunk of silence moves the output on by about `chunk_in * ratio` samples; the
        // bound only guards against a resampler that stops producing output.
        let mut chunks_left = 64 + self.resampler.output_delay() / self.chunk_in.max(1);
        while self.emitted_out < want {
            if chunks_left == 0 {
                return Err(stream_err(
                    self.rate_in_hz,
                    self.rate_out_hz,
                    &"flushing produced no output",
                ));
            }
            chunks_left -= 1;
            self.pending.resize(self.chunk_in, 0.0);
            self.run_chunk(want, sink)?;
        }
        self.resampler.reset();
        self.pending.clear();
        self.pushed_in = 0;
        self.emitted_out = 0;
        Ok(())
    }

    fn run_chunk(&mut self, limit: u64, sink: &mut impl Extend<f32>) -> Result<()> {
        let (_, n) = self
            .resampler
            .process_into_buffer(&[&self.pending[..]], &mut [&mut self.out[..]], None)
            .map_err(|e| stream_err(self.rate_in_hz, self.rate_out_hz, &e))?;
        self.pending.clear();
        let room = usize::try_from(limit - self.emitted_out).unwrap_or(usize::MAX);
        let end = n.min(room);
        sink.extend(self.out[..end].iter().copied());
        self.emitted_out += end as u64;
        Ok(())
    }
}

fn stream_err(rate_in_hz: u32, rate_out_hz: u32, e: &dyn std::fmt::Display) -> Error {
    Error::InvalidInput(format!(
        "streaming resampler {rate_in_hz} Hz -> {rate_out_hz} Hz: {e}"
    ))
}

/// Captured audio at the device's rate in, 80 ms frames of 24 kHz out.
///
/// Runs on whichever thread reads the capture ring (the one calling
/// [`FrameSource::next_frame`](super::FrameSource::next_frame)); it allocates only while its
/// queue grows to its working size.
pub struct InputResampler {
    /// `None` when the device already runs at 24 kHz.
    stream: Option<MonoStream>,
    ready_24k: VecDeque<f32>,
}

impl InputResampler {
    /// A resampler from `device_rate_hz` to 24 kHz, taking input in 10 ms chunks.
    pub fn new(device_rate_hz: u32) -> Result<Self> {
        let stream = if device_rate_hz == SAMPLE_RATE_HZ {
            None
        } else {
            let chunk_in = (device_rate_hz as usize / 100).max(1);
            Some(MonoStream::new(device_rate_hz, SAMPLE_RATE_HZ, chunk_in)?)
        };
        Ok(Self {
            stream,
            ready_24k: VecDeque::with_capacity(4 * FRAME_LEN_SAMPLES),
        })
    }

    /// Adds mono samples at the device rate.
    pub fn push(&mut self, pcm_device: &[f32]) -> Result<()> {
        match &mut self.stream {
            Some(stream) => stream.push(pcm_device, &mut self.ready_24k),
            None => {
                self.ready_24k.extend(pcm_device.iter().copied());
                Ok(())
            }
        }
    }

    /// Moves the next whole frame into `frame`; `false` (and `frame` untouched) when fewer
    /// than 1920 samples are ready.
    pub fn pop_frame(&mut self, frame: &mut [f32; FRAME_LEN_SAMPLES]) -> bool {
        if self.ready_24k.len() < FRAME_LEN_SAMPLES {
            return false;
        }
        for (dst, src) in frame
            .iter_mut()
            .zip(self.ready_24k.drain(..FRAME_LEN_SAMPLES))
        {
            *dst = src;
        }
        true
    }

    /// Copies the first `out.len()` samples of the next frame into `out` without taking
    /// them; `false` (and `out` untouched) when fewer are ready.
    pub fn peek(&self, out: &mut [f32]) -> bool {
        if self.ready_24k.len() < out.len() {
            return false;
        }
        for (dst, src) in out.iter_mut().zip(&self.ready_24k) {
            *dst = *src;
        }
        true
    }

    /// 24 kHz samples resampled but not yet handed out as a frame.
    pub fn ready_samples(&self) -> usize {
        self.ready_24k.len()
    }
}

/// 24 kHz model output in, samples at the device's rate out.
///
/// Runs on the thread that writes the playback ring (the one calling
/// [`FrameSink::write_frame`](super::FrameSink::write_frame)).
pub struct OutputResampler {
    /// `None` when the device already runs at 24 kHz.
    stream: Option<MonoStream>,
    out_device: Vec<f32>,
}

impl OutputResampler {
    /// A resampler from 24 kHz to `device_rate_hz`, taking input a frame (1920 samples) at a
    /// time.
    pub fn new(device_rate_hz: u32) -> Result<Self> {
        Self::with_chunk(device_rate_hz, FRAME_LEN_SAMPLES)
    }

    /// [`Self::new`] taking input `chunk` samples at a time: the output for a push comes
    /// once each whole chunk is in.
    pub fn with_chunk(device_rate_hz: u32, chunk: usize) -> Result<Self> {
        let stream = if device_rate_hz == SAMPLE_RATE_HZ {
            None
        } else {
            Some(MonoStream::new(SAMPLE_RATE_HZ, device_rate_hz, chunk)?)
        };
        let capacity = 2 * FRAME_LEN_SAMPLES * (device_rate_hz as usize).div_ceil(24_000);
        Ok(Self {
            stream,
            out_device: Vec::with_capacity(capacity),
        })
    }

    /// Resamples 24 kHz samples (any count, usually one frame) and returns the device-rate
    /// samples now complete. The filter holds back its delay's worth (about 1.3 ms) until the
    /// next call or [`flush`](Self::flush).
    pub fn process(&mut self, pcm_24k: &[f32]) -> Result<&[f32]> {
        self.out_device.clear();
        match &mut self.stream {
            Some(stream) => stream.push(pcm_24k, &mut self.out_device)?,
            None => self.out_device.extend_from_slice(pcm_24k),
        }
        Ok(&self.out_device)
    }

    /// Returns what the filter still holds, so that the output has exactly
    /// `round(len * device_rate / 24000)` samples for everything pushed.
    pub fn flush(&mut self) -> Result<&[f32]> {
        self.out_device.clear();
        if let Some(stream) = &mut self.stream {
            stream.flush(&mut self.out_device)?;
        }
        Ok(&self.out_device)
    }
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
