//! Speech-to-text with a delayed-streams model, following the procedure of Kyutai's
//! reference script (delayed-streams-modeling, `scripts/stt_from_file_pytorch.py`): a
//! silence prefix, the audio frame by frame, silence for the model's audio delay at the
//! end, one text token per frame, and words with start and end times taken from the
//! end-of-padding tokens.

use serde::Deserialize;

use super::lm::generator::LmGen;
use super::mimi::Mimi;
use super::tokenizer::TextTokenizer;
use crate::Result;

/// The token that marks the start of a word (end of the padding before it).
pub const END_OF_PADDING_ID: u32 = 0;

/// `stt_config` in a model's config.json; defaults as the reference script's.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default)]
pub struct SttConfig {
    pub audio_silence_prefix_seconds: f64,
    pub audio_delay_seconds: f64,
}

impl Default for SttConfig {
    fn default() -> Self {
        Self {
            audio_silence_prefix_seconds: 1.0,
            audio_delay_seconds: 5.0,
        }
    }
}

impl SttConfig {
    /// The longest silence prefix or delay taken, in seconds (the published models use 1 s
    /// and 0.5 or 2.5 s): a larger one would step the model for ever.
    pub const MAX_SECONDS: f64 = 60.0;

    /// Each field finite and within 0..=[`Self::MAX_SECONDS`], or what is wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (name, v) in [
            (
                "audio_silence_prefix_seconds",
                self.audio_silence_prefix_seconds,
            ),
            ("audio_delay_seconds", self.audio_delay_seconds),
        ] {
            if !(v.is_finite() && (0.0..=Self::MAX_SECONDS).contains(&v)) {
                return Err(format!(
                    "stt_config.{name} is {v}; expected 0 to {} seconds",
                    Self::MAX_SECONDS
                ));
            }
        }
        Ok(())
    }
}

/// A transcribed word with its time span in the input audio, in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Word {
    pub text: String,
    pub start_s: f64,
    pub end_s: f64,
}

/// Words and their times from one text token per frame, as the reference's
/// `tokens_to_timestamped_text`: each word is the text between two end-of-padding tokens
/// (ids above `padding_id` only); a segment holding several words gives each as many
/// frames as it has tokens; the last word ends at the end-of-stream token, else one second
/// later or at the end of the stream, whichever is first. Times are frame positions over
/// `frame_rate_hz` minus `offset_s`, floored at 0. (Where the reference script would fail,
/// the last word ending a second before the stream does, its end is taken as one second.)
pub fn timestamped_words(
    tokens: &[u32],
    tokenizer: &TextTokenizer,
    frame_rate_hz: f64,
    padding_id: u32,
    offset_s: f64,
) -> Result<Vec<Word>> {
    let mut stream = WordStream::new(frame_rate_hz, padding_id, offset_s);
    let mut words = vec![];
    for &t in tokens {
        words.extend(stream.push(t, tokenizer)?);
    }
    words.extend(stream.finish(tokenizer)?);
    Ok(words)
}

/// [`timestamped_words`] one token at a time, for live transcription: a segment's words
/// come out when the end-of-padding token that closes it arrives, the last ones at
/// [`WordStream::finish`]. Only the open segment is kept.
#[derive(Debug, Clone)]
pub struct WordStream {
    frame_rate_hz: f64,
    padding_id: u32,
    offset_s: f64,
    /// Tokens pushed so far.
    count: usize,
    /// Index of the first token of the open segment (after an end-of-padding token), and
    /// the segment's tokens; None before the first end-of-padding token.
    open: Option<(usize, Vec<u32>)>,
}

impl WordStream {
    pub fn new(frame_rate_hz: f64, padding_id: u32, offset_s: f64) -> Self {
        Self {
            frame_rate_hz,
            padding_id,
            offset_s,
            count: 0,
            open: None,
        }
    }

    /// The model's clock went `seconds` ahead of the input's (steps on silence the input
    /// does not have, to bring words out early): later times are taken back by as much.
    pub fn shift(&mut self, seconds: f64) {
        self.offset_s += seconds;
    }

    /// Time in seconds of frame position `pos`.
    pub fn time_s(&self, pos: f64) -> f64 {
        (pos / self.frame_rate_hz - self.offset_s).max(0.0)
    }

    /// Adds the next token; returns the words it completes.
    pub fn push(&mut self, token: u32, tokenizer: &TextTokenizer) -> Result<Vec<Word>> {
        let i = self.count;
        self.count += 1;
        if token == END_OF_PADDING_ID {
            let words = match self.open.take() {
                Some((start, seg)) => self.segment(start, &seg, i as f64, tokenizer)?,
                None => vec![],
            };
            self.open = Some((i + 1, vec![]));
            return Ok(words);
        }
        // A token the tokenizer does not have (a model whose text vocabulary is larger
        // than its tokenizer, as the tiny fixtures' are) is not text: it keeps its step
        // but joins no word, rather than failing the stream.
        if let (Some((_, seg)), true) = (&mut self.open, tokenizer.id_to_piece(token).is_some()) {
            seg.push(token);
        }
        Ok(vec![])
    }

    /// The words of the open segment at the end of the stream: the last word ends at the
    /// end-of-stream token, else one second after the segment starts or at the end of
    /// the stream, whichever is first.
    pub fn finish(&mut self, tokenizer: &TextTokenizer) -> Result<Vec<Word>> {
        let Some((start, seg)) = self.open.take() else {
            return Ok(vec![]);
        };
        let eos = tokenizer
            .eos_id()
            .and_then(|eos| seg.iter().position(|&t| t == eos));
        match eos {
            Some(i) => self.segment(start, &seg[..i], (start + i) as f64, tokenizer),
            None => {
                let end = (self.count as f64).min(start as f64 + self.frame_rate_hz);
                let keep = (end.floor() as usize).saturating_sub(start).min(seg.len());
                self.segment(start, &seg[..keep], end, tokenizer)
            }
        }
    }

    fn segment(
        &self,
        start: usize,
        seg: &[u32],
        end_time: f64,
        tokenizer: &TextTokenizer,
    ) -> Result<Vec<Word>> {
        let ids: Vec<u32> = seg
            .iter()
            .copied()
            .filter(|&t| t > self.padding_id)
            .collect();
        let text = tokenizer.decode(&ids)?;
        let parts: Vec<&str> = text.split_whitespace().collect();
        let mut words = vec![];
        let word = |text: String, a: f64, b: f64| Word {
            text,
            start_s: self.time_s(a),
            end_s: self.time_s(b),
        };
        match parts.len() {
            0 => {}
            1 => words.push(word(text.clone(), start as f64, end_time)),
            n => {
                let mut at = start;
                for w in &parts[..n - 1] {
                    let len = tokenizer.encode(w)?.len();
                    words.push(word(w.to_string(), at as f64, (at + len) as f64));
                    at += len;
                }
                words.push(word(parts[n - 1].to_string(), at as f64, end_time));
            }
        }
        Ok(words)
    }
}

/// What one frame of transcription gives.
#[derive(Debug, Clone, PartialEq)]
pub struct SttStep {
    /// The text token of this frame (None while the model's delays hold output back).
    pub token: Option<u32>,
    /// Probability that the speaker's turn has ended (extra head 2, entry 0, as the
    /// reference script reads it), for models with that head.
    pub end_of_turn: Option<f32>,
}

/// The result of transcribing a recording.
#[derive(Debug, Clone)]
pub struct Transcript {
    /// One text token per frame, silence prefix and suffix included.
    pub tokens: Vec<u32>,
    pub words: Vec<Word>,
    /// Per frame, the end-of-turn probability (empty for models without that head).
    pub end_of_turn: Vec<f32>,
    /// Seconds of model time before the input's time 0 (prefix and delay).
    pub offset_s: f64,
}

/// Mimi and an STT model, run frame by frame.
#[derive(Debug)]
pub struct Transcriber {
    pub mimi: Mimi,
    pub gen: LmGen,
    pub tokenizer: TextTokenizer,
    pub cfg: SttConfig,
    pub padding_id: u32,
}

impl Transcriber {
    fn frame_rate_hz(&self) -> f64 {
        self.mimi.config().frame_rate
    }

    /// Frames of silence before the audio.
    pub fn prefix_frames(&self) -> usize {
        (self.cfg.audio_silence_prefix_seconds * self.frame_rate_hz()).ceil() as usize
    }

    /// Frames of silence after the audio, to flush the model's delay.
    pub fn suffix_frames(&self) -> usize {
        (self.cfg.audio_delay_seconds * self.frame_rate_hz()).ceil() as usize
    }

    /// The time offset of the reference script: whole seconds of prefix, plus the delay.
    pub fn offset_s(&self) -> f64 {
        (self.prefix_frames() as f64 / self.frame_rate_hz()).trunc() + self.cfg.audio_delay_seconds
    }

    /// Starts a new stream.
    pub fn reset(&mut self) {
        self.mimi.reset();
        self.gen.reset();
    }

    /// One frame of audio (exactly the frame size).
    pub fn step(&mut self, frame: &[f32]) -> Result<SttStep> {
        let codes = self.mimi.encode_step(frame)?;
        let step = self.gen.step(&codes)?;
        Ok(SttStep {
            token: step.tokens.map(|t| t[0] as u32),
            end_of_turn: step.extra_heads.get(2).and_then(|h| h.first().copied()),
        })
    }

    /// Transcribes a whole recording (24 kHz mono), calling `on_step` after every frame.
    pub fn transcribe(
        &mut self,
        pcm: &[f32],
        mut on_step: impl FnMut(&SttStep, &TextTokenizer),
    ) -> Result<Transcript> {
        self.reset();
        let fs = self.mimi.frame_size();
        let silence = vec![0f32; fs];
        let mut audio = pcm.to_vec();
        audio.resize(pcm.len().div_ceil(fs) * fs, 0.0);
        let frames = std::iter::repeat_n(silence.as_slice(), self.prefix_frames())
            .chain(audio.chunks(fs))
            .chain(std::iter::repeat_n(
                silence.as_slice(),
                self.suffix_frames(),
            ));
        let mut tokens = vec![];
        let mut end_of_turn = vec![];
        for frame in frames {
            let step = self.step(frame)?;
            if let Some(t) = step.token {
                tokens.push(t);
            }
            if let Some(p) = step.end_of_turn {
                end_of_turn.push(p);
            }
            on_step(&step, &self.tokenizer);
        }
        let offset_s = self.offset_s();
        let words = timestamped_words(
            &tokens,
            &self.tokenizer,
            self.frame_rate_hz(),
            self.padding_id,
            offset_s,
        )?;
        Ok(Transcript {
            tokens,
            words,
            end_of_turn,
            offset_s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn timestamps_match_the_reference_script() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/stt-tiny");
        let tok = TextTokenizer::load(&dir.join("tokenizer.model")).expect("tokenizer");
        let text = std::fs::read_to_string(dir.join("timestamp_cases.json")).expect("cases");
        let cases: serde_json::Value = serde_json::from_str(&text).expect("json");
        let mut nonempty = 0;
        for case in cases.as_array().expect("cases") {
            let name = case["name"].as_str().expect("name");
            let tokens: Vec<u32> = case["tokens"]
                .as_array()
                .expect("tokens")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect();
            let offset = case["offset_seconds"].as_f64().expect("offset");
            let got = timestamped_words(&tokens, &tok, 12.5, 3, offset).expect("words");
            let want = case["words"].as_array().expect("words");
            assert_eq!(got.len(), want.len(), "{name} @ {offset}: {got:?}");
            for (g, w) in got.iter().zip(want) {
                assert_eq!(g.text, w["text"].as_str().expect("text"), "{name}");
                // The reference computes times in float32 tensors.
                assert!(
                    (g.start_s - w["start"].as_f64().expect("s")).abs() < 1e-5,
                    "{name}: {g:?} vs {w}"
                );
                assert!(
                    (g.end_s - w["end"].as_f64().expect("e")).abs() < 1e-5,
                    "{name}: {g:?} vs {w}"
                );
            }
            nonempty += usize::from(!got.is_empty());
        }
        assert!(nonempty >= 6, "too few cases with words");
    }
}
