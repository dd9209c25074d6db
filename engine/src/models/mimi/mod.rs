//! Mimi, Kyutai's streaming neural audio codec: 24 kHz mono audio to 12.5 Hz frames of
//! codebook tokens and back (the reference's `moshi.models.compression.MimiModel`).
//!
//! Two APIs over one implementation: offline ([`Mimi::encode`], [`Mimi::decode`]) and
//! streaming ([`Mimi::encode_step`], [`Mimi::decode_step`], [`Mimi::reset`]), one
//! 1920-sample frame per step, with all convolution and attention state carried between
//! steps in fixed-size buffers. The offline path runs the same streaming code in chunks of
//! [`OFFLINE_CHUNK_FRAMES`] frames, so memory stays bounded for any length, with attention
//! rings large enough that every step sees its whole window.

pub mod config;
pub mod conv;
pub mod gpu;
pub mod quantization;
pub mod seanet;
pub mod transformer;

use std::path::Path;

use candle_core::{Device, Tensor};

pub use config::MimiConfig;
use conv::{ConvSpec, PadMode, Seq, StreamingConv1d, StreamingConvTr1d};
use quantization::SplitRvq;
use seanet::{SeanetDecoder, SeanetEncoder};
use transformer::ProjectedTransformer;

use crate::compute::cpu::WeightPrecision;
use crate::models::weights::Weights;
use crate::{Error, Result};

/// Frames per chunk on the offline path (bounded memory, same results as any other size).
pub const OFFLINE_CHUNK_FRAMES: usize = 64;

/// Codes of a stretch of audio: `codes[k][t]` is codebook `k` at frame `t`.
pub type Codes = Vec<Vec<u32>>;

#[derive(Debug, Clone)]
pub struct Mimi {
    cfg: MimiConfig,
    encoder: SeanetEncoder,
    encoder_transformer: ProjectedTransformer,
    downsample: Option<StreamingConv1d>,
    quantizer: SplitRvq,
    upsample: Option<StreamingConvTr1d>,
    decoder_transformer: ProjectedTransformer,
    decoder: SeanetDecoder,
    num_codebooks: usize,
    /// The frame in progress, begun early ([`MimiEncoder::push_early`]).
    early: EarlyInput,
}

/// The first samples of the frame in progress, already through the SEANet encoder and the
/// encoder transformer, waiting for the rest of their frame.
#[derive(Debug, Clone, Default)]
struct EarlyInput {
    pcm: Vec<f32>,
    /// Their latents (before the downsampling, which needs the whole frame).
    latents: Option<Seq>,
}

impl Mimi {
    /// Loads a Mimi checkpoint (`.safetensors`, f32/f16/bf16) for `cfg`, using the first
    /// `num_codebooks` codebooks (8 for Moshi, 32 for the STT and TTS models).
    pub fn load(weights: &Path, cfg: MimiConfig, num_codebooks: usize) -> Result<Self> {
        cfg.validate().map_err(|reason| Error::Config {
            path: weights.to_path_buf(),
            reason,
        })?;
        let w = Weights::load(weights)?;
        Self::from_weights(&w, cfg, num_codebooks)
    }

    /// Builds Mimi from tensors already loaded. Fails on any missing, misshapen or unused
    /// tensor.
    pub fn from_weights(w: &Weights, cfg: MimiConfig, num_codebooks: usize) -> Result<Self> {
        let dim = cfg.seanet.dimension;
        let stride = cfg.downsample_stride();
        let (downsample, upsample) = if stride > 1 {
            let down = StreamingConv1d::load(
                &w.pp("downsample.conv.conv.conv"),
                ConvSpec {
                    stride,
                    bias: false,
                    pad_mode: PadMode::Replicate,
                    ..ConvSpec::new(dim, dim, 2 * stride)
                },
            )?;
            // The reference's `upsample_channel_wise_bug=True`: one group per channel.
            let up = StreamingConvTr1d::load(
                &w.pp("upsample.convtr.convtr.convtr"),
                ConvSpec {
                    stride,
                    bias: false,
                    groups: dim,
                    ..ConvSpec::new(dim, dim, 2 * stride)
                },
            )?;
            (Some(down), Some(up))
        } else {
            (None, None)
        };
        let mut mimi = Self {
            encoder: SeanetEncoder::load(&w.pp("encoder"), &cfg.seanet)?,
            encoder_transformer: ProjectedTransformer::load(
                &w.pp("encoder_transformer"),
                &cfg.transformer,
            )?,
            downsample,
            quantizer: SplitRvq::load(&w.pp("quantizer"), &cfg.quantizer)?,
            upsample,
            decoder_transformer: ProjectedTransformer::load(
                &w.pp("decoder_transformer"),
                &cfg.transformer,
            )?,
            decoder: SeanetDecoder::load(&w.pp("decoder"), &cfg.seanet)?,
            num_codebooks: 0,
            early: EarlyInput::default(),
            cfg,
        };
        w.finish()?;
        mimi.set_num_codebooks(num_codebooks)?;
        mimi.reset();
        Ok(mimi)
    }

    pub fn config(&self) -> &MimiConfig {
        &self.cfg
    }

    /// Samples per frame (1920).
    pub fn frame_size(&self) -> usize {
        self.cfg.frame_size()
    }

    pub fn sample_rate_hz(&self) -> u32 {
        self.cfg.sample_rate
    }

    pub fn num_codebooks(&self) -> usize {
        self.num_codebooks
    }

    pub fn total_codebooks(&self) -> usize {
        self.quantizer.total_codebooks()
    }

    /// Entries per codebook (2048).
    pub fn cardinality(&self) -> usize {
        self.quantizer.bins()
    }

    /// Holds the large weight matrices in `precision` (see [`WeightPrecision`]; f32 by
    /// default, which matches the reference to float rounding).
    pub fn set_weight_precision(&mut self, precision: WeightPrecision) -> Result<()> {
        self.encoder.set_precision(precision)?;
        self.encoder_transformer.set_precision(precision)?;
        if let Some(d) = &mut self.downsample {
            d.set_precision(precision)?;
        }
        self.quantizer.set_precision(precision)?;
        if let Some(u) = &mut self.upsample {
            u.set_precision(precision)?;
        }
        self.decoder_transformer.set_precision(precision)?;
        self.decoder.set_precision(precision)
    }

    pub fn set_num_codebooks(&mut self, n: usize) -> Result<()> {
        let total = self.total_codebooks();
        let min = self.cfg.quantizer.n_q_semantic;
        if n < min || n > total {
            return Err(Error::InvalidInput(format!(
                "{n} codebooks requested; this Mimi has {min} to {total}"
            )));
        }
        self.num_codebooks = n;
        Ok(())
    }

    /// Bytes of streaming state (convolution histories, attention rings). Fixed after the
    /// first step, whatever the length of the session.
    pub fn state_bytes(&self) -> usize {
        self.encoder.state_bytes()
            + self.encoder_transformer.state_bytes()
            + self
                .downsample
                .as_ref()
                .map_or(0, StreamingConv1d::state_bytes)
            + self
                .upsample
                .as_ref()
                .map_or(0, StreamingConvTr1d::state_bytes)
            + self.decoder_transformer.state_bytes()
            + self.decoder.state_bytes()
    }

    /// Clears all streaming state: the next step starts a new stream.
    pub fn reset(&mut self) {
        self.reset_encoder(false);
        self.reset_decoder(false);
    }

    fn reset_encoder(&mut self, exact_window: bool) {
        self.halves().0.reset_window(exact_window);
    }

    fn reset_decoder(&mut self, exact_window: bool) {
        self.halves().1.reset_window(exact_window);
    }

    /// Streaming: one frame of exactly [`Self::frame_size`] samples to one code per codebook.
    pub fn encode_step(&mut self, frame: &[f32]) -> Result<Vec<u32>> {
        self.halves().0.step(frame)
    }

    /// Streaming: starts on the next frame with its first samples
    /// ([`MimiEncoder::push_early`]).
    pub fn encode_early(&mut self, pcm: &[f32]) -> Result<()> {
        self.halves().0.push_early(pcm)
    }

    /// Streaming: one code per active codebook to one frame of audio.
    pub fn decode_step(&mut self, codes: &[u32]) -> Result<Vec<f32>> {
        self.halves().1.step(codes)
    }

    /// Offline: a whole signal (24 kHz mono) to codes; the signal is padded with silence to
    /// a whole number of frames. Uses and then clears the encoder's streaming state.
    pub fn encode(&mut self, pcm: &[f32]) -> Result<Codes> {
        let fs = self.frame_size();
        let n_frames = pcm.len().div_ceil(fs);
        let mut padded = pcm.to_vec();
        padded.resize(n_frames * fs, 0.0);
        self.reset_encoder(true);
        let mut codes: Codes = vec![Vec::with_capacity(n_frames); self.num_codebooks];
        let mut result = Ok(());
        for chunk in padded.chunks(OFFLINE_CHUNK_FRAMES * fs) {
            match self.encode_frames(chunk) {
                Ok(c) => codes
                    .iter_mut()
                    .zip(c)
                    .for_each(|(dst, src)| dst.extend(src)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.reset_encoder(false);
        result.map(|_| codes)
    }

    /// Offline: codes (`codes[k][t]`) to audio, `frame_size` samples per frame. Uses and
    /// then clears the decoder's streaming state.
    pub fn decode(&mut self, codes: &[Vec<u32>]) -> Result<Vec<f32>> {
        let n_frames = codes.first().map_or(0, Vec::len);
        self.reset_decoder(true);
        let mut pcm = Vec::with_capacity(n_frames * self.frame_size());
        let mut result = Ok(());
        for start in (0..n_frames).step_by(OFFLINE_CHUNK_FRAMES) {
            let end = (start + OFFLINE_CHUNK_FRAMES).min(n_frames);
            let chunk: Codes = codes
                .iter()
                .map(|row| row.get(start..end).map(<[u32]>::to_vec).unwrap_or_default())
                .collect();
            match self.decode_frames(&chunk) {
                Ok(p) => pcm.extend(p),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.reset_decoder(false);
        result.map(|_| pcm)
    }

    /// Streaming: one frame to its unquantized latent, `[1, dimension, 1]` (the
    /// reference's `encode_to_latent(quantize=False)`), continuing the encoder's stream.
    pub fn encode_latent_step(&mut self, frame: &[f32]) -> Result<Tensor> {
        if frame.len() != self.frame_size() {
            return Err(Error::InvalidInput(format!(
                "encode_latent_step takes one frame of {} samples, got {}",
                self.frame_size(),
                frame.len()
            )));
        }
        seq_to_conv_layout(self.latent_frames(frame)?)
    }

    /// Offline: whole frames (`pcm.len()` a multiple of the frame size) to unquantized
    /// latents `[1, dimension, frames]`. Uses and then clears the encoder's state.
    pub fn encode_latent(&mut self, pcm: &[f32]) -> Result<Tensor> {
        let fs = self.frame_size();
        if pcm.is_empty() || !pcm.len().is_multiple_of(fs) {
            return Err(Error::InvalidInput(format!(
                "encode_latent takes whole frames of {fs} samples, got {}",
                pcm.len()
            )));
        }
        self.reset_encoder(true);
        let parts: Result<Vec<Seq>> = pcm
            .chunks(OFFLINE_CHUNK_FRAMES * fs)
            .map(|chunk| self.latent_frames(chunk))
            .collect();
        self.reset_encoder(false);
        let parts = parts?;
        let c = parts[0].c;
        seq_to_conv_layout(Seq::new(
            c,
            parts.into_iter().flat_map(|p| p.data).collect(),
        ))
    }

    fn latent_frames(&mut self, pcm: &[f32]) -> Result<Seq> {
        self.halves().0.latent_frames(pcm)
    }

    /// Encodes whole frames, continuing the encoder's stream.
    fn encode_frames(&mut self, pcm: &[f32]) -> Result<Codes> {
        self.halves().0.encode_frames(pcm)
    }

    /// Decodes whole frames, continuing the decoder's stream.
    fn decode_frames(&mut self, codes: &[Vec<u32>]) -> Result<Vec<f32>> {
        self.halves().1.decode_frames(codes)
    }

    /// The encoder's and the decoder's streaming halves, borrowed apart: two pipeline
    /// stages (encode before the LM, decode after it) each stream one while sharing the
    /// quantizer's codebooks.
    pub fn halves(&mut self) -> (MimiEncoder<'_>, MimiDecoder<'_>) {
        let frame_size = self.cfg.frame_size();
        let window_steps = OFFLINE_CHUNK_FRAMES * self.cfg.downsample_stride();
        (
            MimiEncoder {
                encoder: &mut self.encoder,
                transformer: &mut self.encoder_transformer,
                downsample: &mut self.downsample,
                quantizer: &self.quantizer,
                num_codebooks: self.num_codebooks,
                frame_size,
                window_steps,
                early: &mut self.early,
            },
            MimiDecoder {
                upsample: &mut self.upsample,
                transformer: &mut self.decoder_transformer,
                decoder: &mut self.decoder,
                quantizer: &self.quantizer,
                window_steps,
            },
        )
    }
}

/// A streaming decoder of Mimi's codes: the CPU's [`Mimi`] or the GPU's
/// [`gpu::GpuMimi`], for code that decodes on whichever the session has.
pub trait FrameDecoder {
    /// Clears the decoder's streaming state.
    fn reset_decoder(&mut self);
    /// One code per active codebook to one frame of audio.
    fn decode_frame(&mut self, codes: &[u32]) -> Result<Vec<f32>>;
}

impl FrameDecoder for Mimi {
    fn reset_decoder(&mut self) {
        self.halves().1.reset();
    }
    fn decode_frame(&mut self, codes: &[u32]) -> Result<Vec<f32>> {
        self.decode_step(codes)
    }
}

impl FrameDecoder for gpu::GpuMimi {
    fn reset_decoder(&mut self) {
        self.halves().1.reset();
    }
    fn decode_frame(&mut self, codes: &[u32]) -> Result<Vec<f32>> {
        self.decode_step(codes)
    }
}

/// An encoder's input must be one whole frame.
fn check_frame(frame: &[f32], frame_size: usize) -> Result<()> {
    if frame.len() != frame_size {
        return Err(Error::InvalidInput(format!(
            "encode_step takes one frame of {frame_size} samples, got {}",
            frame.len()
        )));
    }
    Ok(())
}

/// The streaming encoder of a [`Mimi`] ([`Mimi::halves`]).
pub struct MimiEncoder<'a> {
    encoder: &'a mut SeanetEncoder,
    transformer: &'a mut ProjectedTransformer,
    downsample: &'a mut Option<StreamingConv1d>,
    quantizer: &'a SplitRvq,
    num_codebooks: usize,
    frame_size: usize,
    /// Attention steps an offline chunk spans (see [`Mimi::encode`]).
    window_steps: usize,
    early: &'a mut EarlyInput,
}

impl MimiEncoder<'_> {
    /// Clears the encoder's streaming state.
    pub fn reset(&mut self) {
        self.reset_window(false);
    }

    /// `exact_window`: attention rings that hold a whole offline chunk.
    fn reset_window(&mut self, exact_window: bool) {
        *self.early = EarlyInput::default();
        self.encoder.reset();
        self.transformer.set_window(exact_window, self.window_steps);
        if let Some(d) = self.downsample {
            d.reset();
        }
    }

    /// One frame of exactly `frame_size` samples to one code per codebook, as
    /// [`Mimi::encode_step`].
    pub fn step(&mut self, frame: &[f32]) -> Result<Vec<u32>> {
        check_frame(frame, self.frame_size)?;
        let codes = crate::compute::cpu::on_pool(|| self.encode_frames(frame))?;
        Ok(codes.into_iter().map(|row| row[0]).collect())
    }

    /// Samples of input one step of the SEANet encoder and the encoder transformer takes:
    /// the unit of [`Self::push_early`] (960, 40 ms, for the published Mimi).
    pub fn early_step_samples(&self) -> usize {
        let stride = self.downsample.as_ref().map_or(1, |d| d.spec().stride);
        self.frame_size / stride.max(1)
    }

    /// Starts on the frame in progress with its first samples (whole steps of
    /// [`Self::early_step_samples`], less than a frame in all): the SEANet encoder and the
    /// transformer run on them now, so the frame's [`Self::step`], which must begin with
    /// the same samples, has only the rest to do. For a live stream, where the first half
    /// of a frame is heard 40 ms before the frame is complete. The codes are those of
    /// encoding the whole frame at once (the layers are causal and every chunk is a whole
    /// number of their strides).
    pub fn push_early(&mut self, pcm: &[f32]) -> Result<()> {
        let step = self.early_step_samples();
        let held = self.early.pcm.len();
        if pcm.is_empty() || !pcm.len().is_multiple_of(step) || held + pcm.len() >= self.frame_size
        {
            return Err(Error::InvalidInput(format!(
                "push_early takes whole steps of {step} samples, less than a frame of {} in \
                 all; got {} with {held} already held",
                self.frame_size,
                pcm.len()
            )));
        }
        let ahead = (self.frame_size - held - pcm.len()) / step;
        let latents = crate::compute::cpu::on_pool(|| self.unsampled_latents(pcm, ahead))?;
        self.early.pcm.extend_from_slice(pcm);
        match &mut self.early.latents {
            Some(l) => l.data.extend(latents.data),
            None => self.early.latents = Some(latents),
        }
        Ok(())
    }

    /// Samples of the frame in progress given to [`Self::push_early`].
    pub fn early_samples(&self) -> usize {
        self.early.pcm.len()
    }

    /// The SEANet encoder and the transformer: latents at the SEANet's rate, for the
    /// first steps of a frame with `ahead` steps still to come (its attention sees what it
    /// would with the whole frame: the reference's streaming semantics).
    fn unsampled_latents(&mut self, pcm: &[f32], ahead: usize) -> Result<Seq> {
        let emb = self.encoder.step(Seq::new(1, pcm.to_vec()))?;
        crate::profile::span(
            || "encoder-transformer".into(),
            || self.transformer.step_part(&emb, ahead),
        )
    }

    fn latent_frames(&mut self, pcm: &[f32]) -> Result<Seq> {
        use crate::profile::span;
        let early = std::mem::take(self.early);
        let held = early.pcm.len();
        if held > 0 && pcm.get(..held) != Some(&early.pcm[..]) {
            return Err(Error::InvalidInput(format!(
                "the frame does not begin with the {held} samples given to push_early \
                 (the encoder's stream is now out of step: reset it)"
            )));
        }
        let mut emb = self.unsampled_latents(&pcm[held..], 0)?;
        if let Some(l) = early.latents {
            emb.data = [l.data, emb.data].concat();
        }
        match &mut self.downsample {
            Some(d) => {
                let spec = *d.spec();
                span(
                    move || format!("downsample {}", spec.describe()),
                    || d.step(&emb),
                )
            }
            None => Ok(emb),
        }
    }

    fn encode_frames(&mut self, pcm: &[f32]) -> Result<Codes> {
        let emb = self.latent_frames(pcm)?;
        crate::profile::span(
            || "quantizer-encode".into(),
            || self.quantizer.encode(&emb, self.num_codebooks),
        )
    }
}

/// The streaming decoder of a [`Mimi`] ([`Mimi::halves`]).
pub struct MimiDecoder<'a> {
    upsample: &'a mut Option<StreamingConvTr1d>,
    transformer: &'a mut ProjectedTransformer,
    decoder: &'a mut SeanetDecoder,
    quantizer: &'a SplitRvq,
    window_steps: usize,
}

impl MimiDecoder<'_> {
    /// Clears the decoder's streaming state.
    pub fn reset(&mut self) {
        self.reset_window(false);
    }

    fn reset_window(&mut self, exact_window: bool) {
        if let Some(u) = self.upsample {
            u.reset();
        }
        self.transformer.set_window(exact_window, self.window_steps);
        self.decoder.reset();
    }

    /// One code per active codebook to one frame of audio, as [`Mimi::decode_step`].
    pub fn step(&mut self, codes: &[u32]) -> Result<Vec<f32>> {
        let rows: Codes = codes.iter().map(|&c| vec![c]).collect();
        crate::compute::cpu::on_pool(|| self.decode_frames(&rows))
    }

    fn decode_frames(&mut self, codes: &[Vec<u32>]) -> Result<Vec<f32>> {
        if codes.first().is_none_or(Vec::is_empty) {
            return Ok(vec![]);
        }
        use crate::profile::span;
        let emb = span(
            || "quantizer-decode".into(),
            || self.quantizer.decode(codes),
        )?;
        let emb = match &mut self.upsample {
            Some(u) => {
                let spec = *u.spec();
                span(
                    move || format!("upsample {}", spec.describe()),
                    || u.step(&emb),
                )?
            }
            None => emb,
        };
        let emb = span(
            || "decoder-transformer".into(),
            || self.transformer.step(&emb),
        )?;
        Ok(self.decoder.step(emb)?.data)
    }
}

/// `T` rows of `C` to the reference's `[1, C, T]`.
fn seq_to_conv_layout(x: Seq) -> Result<Tensor> {
    let t = x.t();
    Ok(Tensor::from_vec(x.data, (1, t, x.c), &Device::Cpu)?
        .transpose(1, 2)?
        .contiguous()?)
}
