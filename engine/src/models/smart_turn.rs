//! Smart Turn v3.2 (Daily, BSD-2-Clause): whether the person has finished their turn,
//! from the last 8 s of their audio, through ONNX Runtime. `scripts/setup.sh` installs the
//! model from the pipecat-ai wheel into `~/.cache/parley/smart-turn/`
//! (`PARLEY_SMART_TURN` points at another copy).
//!
//! Its input is Whisper's log-mel features, computed here as the wheel's
//! `_whisper_features.py` computes them (itself Hugging Face's `WhisperFeatureExtractor`):
//! the waveform normalised to zero mean and unit variance, a centred power spectrogram
//! (reflect padding, periodic Hann window of 400, hop 160), 80 Slaney mel bands over
//! 0-8 kHz with Slaney's area normalisation, `log10` floored at 1e-10, the last frame
//! dropped, values floored at the maximum minus 8, then `(x + 4) / 4`.

use std::path::PathBuf;
use std::sync::Arc;

use ort::session::Session;
use ort::value::Tensor;
use realfft::{RealFftPlanner, RealToComplex};

use crate::{Error, Result};

/// Samples per second the model takes.
pub const SAMPLE_RATE: u32 = 16_000;
/// Samples it looks at: the last 8 s.
pub const WINDOW: usize = 8 * SAMPLE_RATE as usize;
const N_FFT: usize = 400;
const HOP: usize = 160;
const BINS: usize = N_FFT / 2 + 1;
/// Mel bands.
pub const MELS: usize = 80;
/// Feature frames: one per hop over the window, the last dropped.
pub const FRAMES: usize = WINDOW / HOP;

/// Where the model is looked for: `PARLEY_SMART_TURN`, else setup's copy.
pub fn model_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PARLEY_SMART_TURN") {
        return Some(PathBuf::from(p));
    }
    Some(super::vad::setup_cache("smart-turn")?.join("smart-turn-v3.2-cpu.onnx"))
}

fn hz_to_mel(f: f64) -> f64 {
    if f >= 1000.0 {
        15.0 + (f / 1000.0).ln() * (27.0 / 6.4f64.ln())
    } else {
        3.0 * f / 200.0
    }
}

fn mel_to_hz(m: f64) -> f64 {
    if m >= 15.0 {
        1000.0 * ((6.4f64.ln() / 27.0) * (m - 15.0)).exp()
    } else {
        200.0 * m / 3.0
    }
}

/// `n` values from `a` to `b` as NumPy's `linspace` spaces them.
fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    let step = (b - a) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| a + i as f64 * step).collect();
    v[n - 1] = b;
    v
}

/// `np.add.reduce` of a contiguous float32 array, in numpy's order: blocks of 8192 (its
/// iterator's buffer) added one after another to 0, each summed pairwise
/// ([`numpy_pairwise_f32`]). Checked against numpy 2.2 on random arrays.
fn numpy_sum_f32(a: &[f32]) -> f32 {
    a.chunks(8192)
        .fold(0f32, |acc, block| acc + numpy_pairwise_f32(block))
}

/// numpy's pairwise summation (`pairwise_sum` in its loops): below 8 values in order;
/// up to 128 in eight running sums combined as a tree, then the rest in order; beyond,
/// the two halves (split at a multiple of 8) summed apart.
fn numpy_pairwise_f32(a: &[f32]) -> f32 {
    let n = a.len();
    if n < 8 {
        a.iter().fold(-0.0f32, |acc, &v| acc + v)
    } else if n <= 128 {
        let mut r = [0f32; 8];
        r.copy_from_slice(&a[..8]);
        let whole = n - n % 8;
        for block in a[8..whole].chunks_exact(8) {
            for (acc, &v) in r.iter_mut().zip(block) {
                *acc += v;
            }
        }
        let tree = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        a[whole..].iter().fold(tree, |acc, &v| acc + v)
    } else {
        let half = n / 2 - (n / 2) % 8;
        numpy_pairwise_f32(&a[..half]) + numpy_pairwise_f32(&a[half..])
    }
}

/// The log-mel feature extractor (its FFT plan, window and filterbank made once).
pub struct Features {
    fft: Arc<dyn RealToComplex<f64>>,
    window: Vec<f64>,
    /// `[MELS][BINS]`.
    filters: Vec<f64>,
}

impl std::fmt::Debug for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Features").finish_non_exhaustive()
    }
}

impl Default for Features {
    fn default() -> Self {
        Self::new()
    }
}

impl Features {
    pub fn new() -> Self {
        let window = (0..N_FFT)
            .map(|n| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64).cos())
            .collect();
        let nyquist = SAMPLE_RATE as f64 / 2.0;
        let mel_points = linspace(hz_to_mel(0.0), hz_to_mel(nyquist), MELS + 2);
        let hz: Vec<f64> = mel_points.iter().map(|&m| mel_to_hz(m)).collect();
        let fft_freqs = linspace(0.0, (SAMPLE_RATE / 2) as f64, BINS);
        let mut filters = vec![0f64; MELS * BINS];
        for m in 0..MELS {
            let enorm = 2.0 / (hz[m + 2] - hz[m]);
            for (i, &f) in fft_freqs.iter().enumerate() {
                let down = -(hz[m] - f) / (hz[m + 1] - hz[m]);
                let up = (hz[m + 2] - f) / (hz[m + 2] - hz[m + 1]);
                filters[m * BINS + i] = down.min(up).max(0.0) * enorm;
            }
        }
        Self {
            fft: RealFftPlanner::<f64>::new().plan_fft_forward(N_FFT),
            window,
            filters,
        }
    }

    /// The features of the last 8 s of `audio` (16 kHz; front-padded with zeros when
    /// shorter, as pipecat's analyser pads), `[MELS][FRAMES]`.
    pub fn compute(&self, audio: &[f32]) -> Vec<f32> {
        let mut x = vec![0f32; WINDOW];
        let take = audio.len().min(WINDOW);
        x[WINDOW - take..].copy_from_slice(&audio[audio.len() - take..]);
        // Zero mean, unit variance, in f32 with numpy's own summation order, so the
        // normalised signal is the reference's to the bit: the published model quantizes
        // its activations, and differences of 1e-6 in its features move its output by
        // up to 0.27 (tests/fixtures/smart_turn/cuts.json).
        let n = WINDOW as f64;
        let mean = (numpy_sum_f32(&x) as f64 / n) as f32;
        let sq: Vec<f32> = x.iter().map(|&v| (v - mean) * (v - mean)).collect();
        let var = (numpy_sum_f32(&sq) as f64 / n) as f32;
        let std = (var + 1e-7f32).sqrt();
        let x: Vec<f64> = x.iter().map(|&v| ((v - mean) / std) as f64).collect();
        // Reflect padding by half a window on both sides.
        let pad = N_FFT / 2;
        let mut padded = Vec::with_capacity(WINDOW + 2 * pad);
        padded.extend((1..=pad).rev().map(|i| x[i]));
        padded.extend_from_slice(&x);
        padded.extend((0..pad).map(|k| x[WINDOW - 2 - k]));
        let frames = (padded.len() - N_FFT) / HOP + 1;
        let mut log = vec![0f64; MELS * FRAMES];
        let mut buf = self.fft.make_input_vec();
        let mut spec = self.fft.make_output_vec();
        let mut power = vec![0f64; BINS];
        for t in 0..frames.min(FRAMES) {
            for (b, (&v, &w)) in buf
                .iter_mut()
                .zip(padded[t * HOP..t * HOP + N_FFT].iter().zip(&self.window))
            {
                *b = v * w;
            }
            // Both buffers have the plan's own lengths, so this cannot fail.
            if self.fft.process(&mut buf, &mut spec).is_err() {
                continue;
            }
            for (p, c) in power.iter_mut().zip(&spec) {
                *p = c.norm_sqr();
            }
            for m in 0..MELS {
                let e: f64 = self.filters[m * BINS..(m + 1) * BINS]
                    .iter()
                    .zip(&power)
                    .map(|(f, p)| f * p)
                    .sum();
                log[m * FRAMES + t] = e.max(1e-10).log10();
            }
        }
        let max = log.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        log.iter()
            .map(|&v| ((v.max(max - 8.0) + 4.0) / 4.0) as f32)
            .collect()
    }
}

/// Smart Turn v3.2 on ONNX Runtime.
pub struct SmartTurn {
    session: Session,
    features: Features,
}

impl std::fmt::Debug for SmartTurn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmartTurn").finish_non_exhaustive()
    }
}

impl SmartTurn {
    /// The model from [`model_path`], on one thread of ONNX Runtime.
    pub fn new() -> Result<Self> {
        let path = model_path().ok_or(Error::OnnxRuntime(
            "no home directory to find the Smart Turn model in".into(),
        ))?;
        if !path.is_file() {
            return Err(Error::OnnxRuntime(format!(
                "Smart Turn model {} not found (run scripts/setup.sh, or set \
                 PARLEY_SMART_TURN to smart-turn-v3.2-cpu.onnx)",
                path.display()
            )));
        }
        let env = super::vad::runtime()?;
        let err = |e: ort::Error| Error::OnnxRuntime(format!("{}: {e}", path.display()));
        let session = Session::builder(&env)
            .map_err(err)?
            .with_intra_threads(1)
            .map_err(|e| Error::OnnxRuntime(format!("{}: {e}", path.display())))?
            .commit_from_file(&path)
            .map_err(err)?;
        Ok(Self {
            session,
            features: Features::new(),
        })
    }

    /// The probability that the turn is complete at the end of `audio` (16 kHz; the last
    /// 8 s are used).
    pub fn probability(&mut self, audio: &[f32]) -> Result<f32> {
        let f = self.features.compute(audio);
        self.probability_of_features(f)
    }

    /// The model on features already computed (`[MELS][FRAMES]`).
    pub fn probability_of_features(&mut self, features: Vec<f32>) -> Result<f32> {
        if features.len() != MELS * FRAMES {
            return Err(Error::InvalidInput(format!(
                "Smart Turn takes {MELS} x {FRAMES} features, not {}",
                features.len()
            )));
        }
        let run = |e: ort::Error| Error::OnnxRuntime(format!("running Smart Turn: {e}"));
        let input = Tensor::from_array(([1usize, MELS, FRAMES], features)).map_err(run)?;
        let outputs = self
            .session
            .run(ort::inputs!["input_features" => input])
            .map_err(run)?;
        let (_, p) = outputs[0].try_extract_tensor::<f32>().map_err(run)?;
        p.first()
            .copied()
            .ok_or(Error::OnnxRuntime("Smart Turn gave no output".into()))
    }
}
