//! The stages of today's modes: Mimi's encoder and decoder, the speech-to-text LM, the
//! duplex LM, and the reply-onset detector. Turn-taking is in [`super::turn`].

use super::models::{DuplexModel, ListenModel};
use super::stage::{FlushRequest, Frame, HeadReading, Outbox, Stage};
use super::{Event, Speaker};
use crate::audio::FRAME_LEN_SAMPLES;
use crate::models::lm::generator::GenStep;
use crate::models::mimi::gpu::{GpuMimiDecoder, GpuMimiEncoder};
use crate::models::mimi::{MimiDecoder, MimiEncoder};
use crate::models::stt::{WordStream, END_OF_PADDING_ID};
use crate::models::tokenizer::TextTokenizer;
use crate::Result;

/// Which extra head of Kyutai's STT checkpoints says the user's turn has ended (the
/// `-candle` checkpoints carry four; the reference reads index 2).
pub const END_OF_TURN_HEAD: usize = 2;

/// Mimi's encoder on the CPU or the GPU.
pub enum CodecEncoder<'a> {
    Cpu(MimiEncoder<'a>),
    Gpu(GpuMimiEncoder<'a>),
}

impl CodecEncoder<'_> {
    fn step(&mut self, pcm: &[f32]) -> Result<Vec<u32>> {
        match self {
            Self::Cpu(e) => e.step(pcm),
            Self::Gpu(e) => e.step(pcm),
        }
    }

    fn reset(&mut self) {
        match self {
            Self::Cpu(e) => e.reset(),
            Self::Gpu(e) => e.reset(),
        }
    }

    /// Starts on a frame with its first samples where the encoder can (the CPU's, given
    /// whole steps of its SEANet); the GPU's encodes whole frames. Whether it started.
    fn push_early(&mut self, pcm: &[f32]) -> Result<bool> {
        match self {
            Self::Cpu(e)
                if !pcm.is_empty()
                    && pcm.len().is_multiple_of(e.early_step_samples())
                    && e.early_samples() + pcm.len() < FRAME_LEN_SAMPLES =>
            {
                e.push_early(pcm).map(|()| true)
            }
            _ => Ok(false),
        }
    }
}

/// Mimi's decoder on the CPU or the GPU.
pub enum CodecDecoder<'a> {
    Cpu(MimiDecoder<'a>),
    Gpu(GpuMimiDecoder<'a>),
}

impl CodecDecoder<'_> {
    fn step(&mut self, codes: &[u32]) -> Result<Vec<f32>> {
        match self {
            Self::Cpu(d) => d.step(codes),
            Self::Gpu(d) => d.step(codes),
        }
    }

    fn reset(&mut self) {
        match self {
            Self::Cpu(d) => d.reset(),
            Self::Gpu(d) => d.reset(),
        }
    }
}

/// Mimi's encoder: `frame.input` to `frame.codes`.
pub struct EncodeStage<'a> {
    enc: CodecEncoder<'a>,
}

impl<'a> EncodeStage<'a> {
    pub fn new(enc: CodecEncoder<'a>) -> Self {
        Self { enc }
    }
}

impl Stage for EncodeStage<'_> {
    fn name(&self) -> &'static str {
        "encode"
    }
    fn on_frame(&mut self, frame: &mut Frame, _out: &mut Outbox<'_>) -> Result<()> {
        frame.codes = self.enc.step(&frame.input)?;
        Ok(())
    }
    fn on_early(&mut self, part: &[f32]) -> Result<bool> {
        self.enc.push_early(part)
    }
    fn reset(&mut self) {
        self.enc.reset();
    }
}

/// The text token of a step, unless it is padding.
fn text_token(step: &GenStep, padding_id: u32) -> Option<u32> {
    let t = step.tokens.as_ref()?[0] as u32;
    (t != END_OF_PADDING_ID && t != padding_id).then_some(t)
}

/// A token as the text it stands for (a random-weight model has no tokenizer: `<id>`).
fn piece(tokenizer: Option<&TextTokenizer>, token: u32) -> Option<String> {
    match tokenizer {
        Some(t) => t.id_to_piece(token).map(|p| p.replace('\u{2581}', " ")),
        None => Some(format!("<{token}>")),
    }
}

/// The speech-to-text LM: the user's words as they are recognised, with their times, and
/// the end-of-turn head for the turn-taking stage.
pub struct SttStage<'a> {
    m: &'a mut ListenModel,
    frame_rate_hz: f64,
    words: WordStream,
    steps: u64,
    /// Mimi's codes for a frame of silence (the first prefix frame's), for the flush.
    silence_codes: Option<Vec<u32>>,
    flush: Option<FlushRequest>,
}

impl<'a> SttStage<'a> {
    pub fn new(m: &'a mut ListenModel, frame_rate_hz: f64) -> Self {
        let mut s = Self {
            words: WordStream::new(frame_rate_hz, m.padding_id, 0.0),
            m,
            frame_rate_hz,
            steps: 0,
            silence_codes: None,
            flush: None,
        };
        s.words = WordStream::new(frame_rate_hz, s.m.padding_id, s.offset_s());
        s
    }

    /// Answers `flush` requests (an end of turn): the words the model's delay still holds
    /// come out at once, from steps on silence, instead of up to the delay later.
    pub fn flushing(mut self, flush: FlushRequest) -> Self {
        self.flush = Some(flush);
        self
    }

    /// Seconds of model time before the input's time 0 (the reference STT procedure).
    fn offset_s(&self) -> f64 {
        (self.prefix_frames() as f64 / self.frame_rate_hz).trunc() + self.m.stt.audio_delay_seconds
    }

    /// Reports the words a step completes and (on reported frames) its text, as of
    /// `frame`.
    fn report(&mut self, step: &GenStep, frame: &mut Frame, out: &Outbox<'_>) -> Result<()> {
        if let (Some(t), true) = (text_token(step, self.m.padding_id), frame.reported) {
            if let Some(text) = piece(self.m.tokenizer.as_ref(), t) {
                frame.heard.get_or_insert_with(String::new).push_str(&text);
                out.send(Event::TextDelta {
                    speaker: Speaker::User,
                    text,
                    frame: frame.index,
                });
            }
        }
        if let (Some(tokens), Some(tok)) = (&step.tokens, &self.m.tokenizer) {
            for w in self.words.push(tokens[0] as u32, tok)? {
                out.send(Event::Word {
                    speaker: Speaker::User,
                    text: w.text,
                    start_s: w.start_s,
                    end_s: w.end_s,
                    frame: frame.index,
                });
            }
        }
        Ok(())
    }

    /// The flush: as many steps on silence as the delay still needs after `silence_s` of
    /// silence (one more for the token's own step), at most the whole delay.
    fn flush_now(&mut self, silence_s: f64, frame: &mut Frame, out: &Outbox<'_>) -> Result<()> {
        let delay = self.m.stt.audio_delay_seconds;
        let steps = (((delay - silence_s).max(0.0) * self.frame_rate_hz).ceil() as usize + 1)
            .min(self.flush_frames());
        // Said even when there is nothing to step on: the cascade waits for it.
        frame.stt_flushed = true;
        let Some(codes) = self.silence_codes.clone() else {
            return Ok(());
        };
        for _ in 0..steps {
            let step = self.m.gen.step(&codes)?;
            self.report(&step, frame, out)?;
        }
        // The model's clock is now ahead of the input's by these steps.
        self.words.shift(steps as f64 / self.frame_rate_hz);
        Ok(())
    }
}

impl Stage for SttStage<'_> {
    fn name(&self) -> &'static str {
        "stt"
    }

    fn prefix_frames(&self) -> usize {
        (self.m.stt.audio_silence_prefix_seconds * self.frame_rate_hz).ceil() as usize
    }

    fn flush_frames(&self) -> usize {
        (self.m.stt.audio_delay_seconds * self.frame_rate_hz).ceil() as usize
    }

    fn on_frame(&mut self, frame: &mut Frame, out: &mut Outbox<'_>) -> Result<()> {
        if !frame.reported && self.silence_codes.is_none() {
            self.silence_codes = Some(frame.codes.clone());
        }
        let step = self.m.gen.step(&frame.codes)?;
        self.steps += 1;
        frame.text = text_token(&step, self.m.padding_id);
        self.report(&step, frame, out)?;
        frame.end_of_turn = step
            .extra_heads
            .get(END_OF_TURN_HEAD)
            .and_then(|h| h.first().copied())
            .map(|probability| HeadReading {
                probability,
                time_s: (self.steps as f64 / self.frame_rate_hz - self.offset_s()).max(0.0),
            });
        if let Some(silence_s) = self.flush.as_ref().and_then(FlushRequest::take) {
            if frame.reported && !frame.flushing {
                self.flush_now(silence_s, frame, out)?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, last: u64, out: &mut Outbox<'_>) -> Result<()> {
        // The last words come out with the last flush frame.
        let words = match &self.m.tokenizer {
            Some(t) => self.words.finish(t)?,
            None => vec![],
        };
        for w in words {
            out.send(Event::Word {
                speaker: Speaker::User,
                text: w.text,
                start_s: w.start_s,
                end_s: w.end_s,
                frame: last,
            });
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.m.gen.reset();
        self.words = WordStream::new(self.frame_rate_hz, self.m.padding_id, self.offset_s());
        self.steps = 0;
        self.silence_codes = None;
    }
}

/// A Moshi-style LM: its own words as text, its voice as codes for the decoder.
pub struct DuplexLmStage<'a> {
    m: &'a mut DuplexModel,
}

impl<'a> DuplexLmStage<'a> {
    pub fn new(m: &'a mut DuplexModel) -> Self {
        Self { m }
    }
}

impl Stage for DuplexLmStage<'_> {
    fn name(&self) -> &'static str {
        "lm"
    }

    fn flush_frames(&self) -> usize {
        self.m.gen.max_delay() + 1
    }

    fn on_frame(&mut self, frame: &mut Frame, out: &mut Outbox<'_>) -> Result<()> {
        let step = self.m.gen.step(&frame.codes)?;
        frame.text = text_token(&step, self.m.padding_id);
        if let (Some(t), true) = (frame.text, frame.reported) {
            if let Some(text) = piece(self.m.tokenizer.as_ref(), t) {
                out.send(Event::TextDelta {
                    speaker: Speaker::Assistant,
                    text,
                    frame: frame.index,
                });
            }
        }
        frame.reply_codes = step
            .tokens
            .map(|t| t[1..].iter().map(|&c| c as u32).collect());
        Ok(())
    }

    fn reset(&mut self) {
        self.m.gen.reset();
    }
}

/// Mimi's decoder: the reply's codes to audio, queued for the speaker. Every reported
/// frame yields one output frame (silence while the LM's delays hold the codes back).
pub struct DecodeStage<'a> {
    dec: CodecDecoder<'a>,
}

impl<'a> DecodeStage<'a> {
    pub fn new(dec: CodecDecoder<'a>) -> Self {
        Self { dec }
    }
}

impl Stage for DecodeStage<'_> {
    fn name(&self) -> &'static str {
        "decode"
    }

    fn on_frame(&mut self, frame: &mut Frame, out: &mut Outbox<'_>) -> Result<()> {
        if !frame.reported {
            return Ok(());
        }
        let pcm = match &frame.reply_codes {
            Some(codes) => self.dec.step(codes)?,
            None => vec![0f32; FRAME_LEN_SAMPLES],
        };
        out.play(pcm.clone())?;
        frame.output = Some(pcm);
        Ok(())
    }

    fn reset(&mut self) {
        self.dec.reset();
    }
}

/// Input louder than this (RMS, about -34 dBFS) counts as the user speaking, for
/// [`Event::ResponseStarted`]'s `after_user_ms`.
pub const USER_LOUD_RMS: f32 = 0.02;
/// Output louder than this (RMS, -40 dBFS) is audible.
pub const REPLY_AUDIBLE_RMS: f32 = 0.01;
/// Quiet output frames (0.4 s) before audible output counts as a new reply.
pub const REPLY_QUIET_FRAMES: u64 = 5;
/// How recent (frames, 5 s) the user's speech must be for a reply to answer it.
pub const USER_RECENT_FRAMES: u64 = 62;

pub fn rms(pcm: &[f32]) -> f32 {
    (pcm.iter().map(|v| v * v).sum::<f32>() / pcm.len().max(1) as f32).sqrt()
}

/// Says when the assistant starts speaking after silence, and how long after the user.
#[derive(Debug)]
pub struct ReplyOnsetStage {
    quiet_frames: u64,
    /// The last input frame in which the user was loud.
    user_loud: Option<u64>,
}

impl Default for ReplyOnsetStage {
    fn default() -> Self {
        Self {
            quiet_frames: u64::MAX,
            user_loud: None,
        }
    }
}

impl Stage for ReplyOnsetStage {
    fn name(&self) -> &'static str {
        "reply"
    }

    fn on_frame(&mut self, frame: &mut Frame, out: &mut Outbox<'_>) -> Result<()> {
        if !frame.reported {
            return Ok(());
        }
        let index = frame.index;
        if rms(&frame.input) > USER_LOUD_RMS {
            self.user_loud = Some(index);
        }
        let Some(pcm) = &frame.output else {
            return Ok(());
        };
        if rms(pcm) > REPLY_AUDIBLE_RMS {
            if self.quiet_frames >= REPLY_QUIET_FRAMES {
                let after_user_ms = self
                    .user_loud
                    .filter(|&u| u < index && index - u <= USER_RECENT_FRAMES)
                    .map(|u| {
                        (index - u) as f64 * 80.0 + frame.available.elapsed().as_secs_f64() * 1e3
                    });
                out.send(Event::ResponseStarted {
                    frame: index,
                    after_user_ms,
                });
            }
            self.quiet_frames = 0;
        } else {
            self.quiet_frames = self.quiet_frames.saturating_add(1);
        }
        Ok(())
    }

    fn reset(&mut self) {
        *self = Self::default();
    }

    fn cancel(&mut self) {
        // The next audible output is a new reply.
        self.quiet_frames = u64::MAX;
    }
}
