//! Kyutai's delayed-streams text-to-speech model (`kyutai/tts-1.6b-en_fr`; the reference's
//! `moshi.models.tts` and `moshi.conditioners`): the delayed-streams LM run the other way,
//! conditioned on a voice through cross-attention and on `cfg` and `control` values summed
//! into every step's input.
//!
//! Here: the voice files ([`Voice`]), the conditioners ([`Conditioners`]: the voice
//! latents projected, unused speaker slots filled with the learnt padding, a sinusoidal
//! position embedding added; the `cfg` and `control` lookup tables projected and summed),
//! the model ([`TtsModel`]), the reference's text procedure ([`script_to_entries`],
//! [`StateMachine`]), generation one step at a time with words arriving while it runs
//! ([`TtsStream`], [`WordFeed`]) and the decoding of its frames ([`TtsDecoder`]). Greedy,
//! it gives the reference's tokens and audio (`tests/tts_reference.rs`). CPU only so far.

use std::path::Path;

use serde_json::Value;

use crate::compute::cpu::{Matrix, WeightPrecision};
use crate::models::lm::gpu::{GpuLm, GpuLmOptions};
use crate::models::lm::{LmConfig, LmModel};
use crate::models::transformer::add_sin_embedding;
use crate::models::weights::Weights;
use crate::{Error, Result};

/// Speaker slots of the cross-attention conditioning (the reference's `max_speakers`).
pub const MAX_SPEAKERS: usize = 5;
/// A voice's latent: channels and frames (10 s at 12.5 Hz), as `kyutai/tts-voices` has it.
pub const VOICE_DIM: usize = 512;
pub const VOICE_FRAMES: usize = 125;
/// The position embedding of the conditioning (the fuser's `cross_attention_pos_emb`).
const POS_MAX_PERIOD: f32 = 10_000.0;

/// A voice: `speaker_wavs` f32 `[1, 512, 125]` from a `kyutai/tts-voices` file.
#[derive(Debug, Clone, PartialEq)]
pub struct Voice {
    /// `[VOICE_FRAMES][VOICE_DIM]`: one row per frame (the file's transpose).
    rows: Vec<f32>,
}

impl Voice {
    /// Where voice `voice` is: a file, or the name of one of the `tts-voices` preset's
    /// voices (its path without the `.1e68beda@240.safetensors` suffix, or its last part:
    /// `robert`), which must have been pulled.
    pub fn resolve(voice: &str) -> Result<std::path::PathBuf> {
        let path = std::path::PathBuf::from(voice);
        if path.is_file() {
            return Ok(path);
        }
        let preset = crate::hub::preset("tts-voices")?;
        // `expresso/ex03-ex01_happy_001_channel1_334s.wav.1e68beda@240.safetensors` is
        // `expresso/ex03-ex01_happy_001_channel1_334s.wav`, `..._334s` or `ex03-..._334s`.
        let names = |file: &str| -> Vec<String> {
            let stem = file.split(".wav").next().unwrap_or(file).to_string();
            let last = stem.rsplit('/').next().unwrap_or(&stem).to_string();
            vec![format!("{stem}.wav"), stem, last]
        };
        let Some(file) = preset
            .files
            .iter()
            .find(|f| names(&f.name).iter().any(|n| n == voice))
        else {
            let known: Vec<String> = preset
                .files
                .iter()
                .map(|f| names(&f.name)[2].clone())
                .collect();
            return Err(Error::InvalidInput(format!(
                "voice `{voice}` is neither a file nor a voice of the tts-voices preset ({})",
                known.join(", ")
            )));
        };
        let dir = crate::hub::Hub::from_env()?
            .local_dir(preset)
            .map_err(|e| {
                Error::InvalidInput(format!(
                    "voice `{voice}`: run `parley models pull tts-voices` first ({e})"
                ))
            })?;
        Ok(dir.join(&file.name))
    }

    /// A voice from its latent as the file holds it, `[VOICE_DIM][VOICE_FRAMES]` row-major
    /// (for benchmarks: random latents of the published shape).
    pub fn from_latent(latent: &[f32]) -> Result<Self> {
        if latent.len() != VOICE_DIM * VOICE_FRAMES || latent.iter().any(|v| !v.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "a voice latent of {} values ({VOICE_DIM} x {VOICE_FRAMES} finite ones expected)",
                latent.len()
            )));
        }
        let mut rows = vec![0f32; latent.len()];
        for c in 0..VOICE_DIM {
            for f in 0..VOICE_FRAMES {
                rows[f * VOICE_DIM + c] = latent[c * VOICE_FRAMES + f];
            }
        }
        Ok(Self { rows })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let w = Weights::load(path)?;
        let t = w
            .get("speaker_wavs", &[1, VOICE_DIM, VOICE_FRAMES])
            .map_err(|e| {
                // The inner error names the file too: said once.
                let e = e.to_string();
                let prefix = format!("{}: ", path.display());
                Error::InvalidInput(format!(
                    "{}: not a voice (a `speaker_wavs` tensor of [1, {VOICE_DIM}, \
                     {VOICE_FRAMES}] from kyutai/tts-voices expected): {}",
                    path.display(),
                    e.strip_prefix(&prefix).unwrap_or(&e)
                ))
            })?;
        let rows: Vec<f32> = t.squeeze(0)?.t()?.contiguous()?.flatten_all()?.to_vec1()?;
        if rows.iter().any(|v| !v.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "{}: the voice has values that are not finite numbers",
                path.display()
            )));
        }
        Ok(Self { rows })
    }
}

/// A lookup-table conditioner (`cfg`, `control`): one of its `possible_values`, embedded
/// and projected to the model's width.
#[derive(Debug, Clone)]
struct Lut {
    values: Vec<String>,
    embed: Matrix,
    output_proj: Matrix,
}

impl Lut {
    fn load(w: &Weights, spec: &Value, dim: usize) -> Result<Self> {
        let lut = &spec["lut"];
        let n_bins = lut["n_bins"].as_u64().unwrap_or(0) as usize;
        let width = lut["dim"].as_u64().unwrap_or(0) as usize;
        let values: Vec<String> = lut["possible_values"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if n_bins == 0 || width == 0 || values.len() != n_bins {
            return Err(Error::config(
                w.path(),
                format!("a lookup-table conditioner needs n_bins, dim and n_bins possible_values: {spec}"),
            ));
        }
        // The padding of a missing condition: every condition is given here.
        w.skip("learnt_padding");
        Ok(Self {
            values,
            // One row per value and one for "none".
            embed: Matrix::with_precision(
                &w.get("embed.weight", &[n_bins + 1, width])?,
                WeightPrecision::F32,
            )?,
            output_proj: Matrix::with_precision(
                &w.get("output_proj.weight", &[dim, width])?,
                WeightPrecision::F32,
            )?,
        })
    }

    /// `value`'s projected embedding.
    fn forward(&self, value: &str, what: &str) -> Result<Vec<f32>> {
        let i = self.values.iter().position(|v| v == value).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{what} `{value}` is not one of {}",
                self.values.join(", ")
            ))
        })?;
        let mut row = vec![0f32; self.embed.cols()];
        self.embed.add_row_to(i, &mut row)?;
        self.output_proj.matmul_t(&row, 1)
    }
}

/// The TTS's conditioners and their fuser (`condition_provider` in the checkpoint).
#[derive(Debug, Clone)]
pub struct Conditioners {
    dim: usize,
    /// `[dim, VOICE_DIM]`.
    speaker_proj: Matrix,
    speaker_padding: Vec<f32>,
    cfg: Lut,
    control: Lut,
    pos_scale: f32,
}

impl Conditioners {
    /// `w`: the checkpoint at `condition_provider.conditioners`; `cfg`: the model's config.
    pub fn load(w: &Weights, cfg: &LmConfig) -> Result<Self> {
        let dim = cfg.dim;
        let conds = cfg.conditioners.clone().unwrap_or(Value::Null);
        let fuser = cfg.fuser.clone().unwrap_or(Value::Null);
        let names = |key: &str| -> Vec<String> {
            fuser[key]
                .as_array()
                .map(|v| {
                    v.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let (mut sum, cross) = (names("sum"), names("cross"));
        sum.sort();
        if sum != ["cfg", "control"]
            || cross != ["speaker_wavs"]
            || !names("prepend").is_empty()
            || conds["speaker_wavs"]["tensor"]["dim"].as_u64() != Some(VOICE_DIM as u64)
        {
            return Err(Error::config(
                w.path(),
                format!(
                    "conditioners Parley knows are `cfg` and `control` summed and \
                     `speaker_wavs` ({VOICE_DIM} channels) by cross-attention; this model \
                     has {conds} fused as {fuser}"
                ),
            ));
        }
        let pos_scale = if fuser["cross_attention_pos_emb"].as_bool() == Some(true) {
            fuser["cross_attention_pos_emb_scale"]
                .as_f64()
                .unwrap_or(1.0) as f32
        } else {
            0.0
        };
        let sp = w.pp("speaker_wavs");
        Ok(Self {
            dim,
            speaker_proj: Matrix::with_precision(
                &sp.get("output_proj.weight", &[dim, VOICE_DIM])?,
                WeightPrecision::F32,
            )?,
            speaker_padding: sp
                .get("learnt_padding", &[1, 1, dim])?
                .flatten_all()?
                .to_vec1()?,
            cfg: Lut::load(&w.pp("cfg"), &conds["cfg"], dim)?,
            control: Lut::load(&w.pp("control"), &conds["control"], dim)?,
            pos_scale,
        })
    }

    /// What the `sum` fuser adds to every step's input: `cfg` (for example "2.0", the
    /// distilled guidance value) and `control` ("ok").
    pub fn condition_sum(&self, cfg: &str, control: &str) -> Result<Vec<f32>> {
        let a = self.cfg.forward(cfg, "cfg")?;
        let b = self.control.forward(control, "control")?;
        Ok(a.iter().zip(&b).map(|(x, y)| x + y).collect())
    }

    /// The cross-attention conditioning of `voices` (1 to [`MAX_SPEAKERS`]):
    /// `MAX_SPEAKERS * VOICE_FRAMES` rows of `dim`, each voice's frames projected, the
    /// unused slots the learnt padding, plus the sinusoidal position embedding.
    pub fn cross_source(&self, voices: &[&Voice]) -> Result<(Vec<f32>, usize)> {
        if voices.is_empty() || voices.len() > MAX_SPEAKERS {
            return Err(Error::InvalidInput(format!(
                "{} voices: the model takes 1 to {MAX_SPEAKERS}",
                voices.len()
            )));
        }
        let d = self.dim;
        let n = MAX_SPEAKERS * VOICE_FRAMES;
        let mut out = Vec::with_capacity(n * d);
        for slot in 0..MAX_SPEAKERS {
            match voices.get(slot) {
                Some(v) => out.extend(self.speaker_proj.matmul_t(&v.rows, VOICE_FRAMES)?),
                None => {
                    for _ in 0..VOICE_FRAMES {
                        out.extend_from_slice(&self.speaker_padding);
                    }
                }
            }
        }
        if self.pos_scale != 0.0 {
            add_sin_embedding(&mut out, d, 0, POS_MAX_PERIOD, self.pos_scale);
        }
        Ok((out, n))
    }
}

/// The TTS's own settings (`tts_config` in config.json).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TtsConfig {
    /// Seconds the audio comes after its text (1.28: 16 steps).
    pub audio_delay: f64,
    /// How many words ahead the second text stream runs (2).
    pub second_stream_ahead: usize,
}

/// The model with its conditioners.
#[derive(Debug)]
pub struct TtsModel {
    pub lm: LmModel,
    pub conditioners: Conditioners,
    pub tts: TtsConfig,
    /// The step on the GPU, when put there ([`Self::to_gpu`]); the CPU model keeps the
    /// conditioners and the text state machine's embeddings.
    gpu: Option<Box<GpuLm>>,
}

impl TtsModel {
    /// Loads a checkpoint laid out as `kyutai/tts-1.6b-en_fr` is (`cfg` from its
    /// config.json), the large matrices in `precision`; the conditioners stay f32.
    pub fn load(weights: &Path, cfg: LmConfig, precision: WeightPrecision) -> Result<Self> {
        cfg.validate_tts().map_err(|r| Error::config(weights, r))?;
        let tts_json = cfg.other.get("tts_config").cloned().unwrap_or(Value::Null);
        let tts = TtsConfig {
            audio_delay: tts_json["audio_delay"].as_f64().unwrap_or(1.28),
            second_stream_ahead: tts_json["second_stream_ahead"].as_u64().unwrap_or(2) as usize,
        };
        if !(0.0..=60.0).contains(&tts.audio_delay) || tts.second_stream_ahead > 64 {
            return Err(Error::config(
                weights,
                format!("tts_config out of range: {tts_json}"),
            ));
        }
        Self::from_weights(&Weights::load(weights)?.with_precision(precision), cfg, tts)
    }

    /// A full-size architecture (`cfg`, for example the `tts-1.6b-en_fr` preset) with
    /// random weights, for benchmarks: speed does not depend on the values.
    pub fn random(cfg: LmConfig, precision: WeightPrecision) -> Result<Self> {
        cfg.validate_tts().map_err(Error::InvalidInput)?;
        let tts_json = cfg.other.get("tts_config").cloned().unwrap_or(Value::Null);
        let tts = TtsConfig {
            audio_delay: tts_json["audio_delay"].as_f64().unwrap_or(1.28),
            second_stream_ahead: tts_json["second_stream_ahead"].as_u64().unwrap_or(2) as usize,
        };
        Self::from_weights(&Weights::random(3).with_precision(precision), cfg, tts)
    }

    fn from_weights(w: &Weights, cfg: LmConfig, tts: TtsConfig) -> Result<Self> {
        // The conditioners first: the LM's loader checks that every tensor was used.
        let conditioners = Conditioners::load(&w.pp("condition_provider.conditioners"), &cfg)?;
        let lm = LmModel::from_weights(w, cfg)?;
        Ok(Self {
            lm,
            conditioners,
            tts,
            gpu: None,
        })
    }

    /// Puts the step on `gpu` with its weights in `format`, drawing `codebooks` audio
    /// codebooks a step (a stream must ask for as many); condition after this.
    pub fn to_gpu(
        &mut self,
        gpu: &std::sync::Arc<crate::compute::gpu::Gpu>,
        format: crate::compute::gpu::GpuFormat,
        codebooks: usize,
    ) -> Result<()> {
        let opts = GpuLmOptions {
            format,
            depformer_steps: Some(codebooks),
            cross_rows: MAX_SPEAKERS * VOICE_FRAMES,
            tts: true,
            ..Default::default()
        };
        self.gpu = Some(Box::new(GpuLm::new(gpu, &self.lm, opts)?));
        Ok(())
    }

    /// The GPU step, when the model is on one.
    pub fn gpu(&self) -> Option<&GpuLm> {
        self.gpu.as_deref()
    }

    /// Conditions the model on `voices` with guidance `cfg` (and `control` "ok") for the
    /// next utterance. On the GPU the conditioning's keys and values are made there.
    pub fn condition(&mut self, voices: &[&Voice], cfg: &str) -> Result<()> {
        let (src, n) = self.conditioners.cross_source(voices)?;
        let bias = self.conditioners.condition_sum(cfg, "ok")?;
        match &mut self.gpu {
            Some(g) => {
                g.set_cross_source(&src, n)?;
                g.set_input_bias(&bias)?;
            }
            None => self.lm.set_cross_source(&src, n)?,
        }
        self.lm.set_input_bias(Some(bias))
    }
}

/// The text stream's special tokens (the reference's `TokenIds`).
pub mod ids {
    /// A new word starts.
    pub const NEW_WORD: u32 = 0;
    /// The main speaker's turn starts.
    pub const MAIN: u32 = 1;
    /// The other speaker's turn starts.
    pub const OTHER: u32 = 2;
    /// Nothing happens.
    pub const PAD: u32 = 3;
}

/// One word to say (or, with no tokens, a pause of `padding` steps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub tokens: Vec<u32>,
    pub text: String,
    /// Steps during which no new word may start after this one.
    pub padding: usize,
}

/// Python's `round` (halves to even), as the reference rounds a break's steps.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// A script's turns as the words the model is fed (the reference's `script_to_entries`):
/// `’` read as `'`, `:` as a space, parentheses dropped; words split on whitespace;
/// `<break time="1.5s"/>` a pause of round(1.5 x frame rate) steps; the first word of
/// each turn led by its speaker's token (main, other, main, ...) when the speaker changes;
/// each word padded by `padding_between + its tokens - 1` steps.
pub fn script_to_entries(
    tokenizer: &crate::models::tokenizer::TextTokenizer,
    script: &[&str],
    frame_rate: f64,
    multi_speaker: bool,
    padding_between: usize,
) -> Result<Vec<Entry>> {
    let mut entries = vec![];
    let mut last_speaker = None;
    for (turn, line) in script.iter().enumerate() {
        let speaker = turn % 2;
        let token = (multi_speaker && last_speaker != Some(speaker))
            .then_some([ids::MAIN, ids::OTHER][speaker]);
        let had_words = text_entries(
            tokenizer,
            line,
            frame_rate,
            token,
            padding_between,
            &mut entries,
        )?;
        if had_words && token.is_some() {
            last_speaker = Some(speaker);
        }
    }
    if !entries.iter().any(|e| !e.tokens.is_empty()) {
        return Err(Error::InvalidInput("the text has no words to say".into()));
    }
    Ok(entries)
}

/// The entries of one turn's text (or a piece of it, as it streams in) appended to
/// `entries`, `speaker` leading the first word; whether it had a word.
pub fn text_entries(
    tokenizer: &crate::models::tokenizer::TextTokenizer,
    text: &str,
    frame_rate: f64,
    speaker: Option<u32>,
    padding_between: usize,
    entries: &mut Vec<Entry>,
) -> Result<bool> {
    text_entries_as(
        tokenizer,
        text,
        frame_rate,
        speaker,
        padding_between,
        entries,
        None,
    )
}

/// The tokens of `word`, or (leniently) of the nearest spelling the tokenizer knows: its
/// lower case, then its lower case without the characters it does not know.
fn lenient_tokens(
    tokenizer: &crate::models::tokenizer::TextTokenizer,
    word: &str,
) -> Result<Option<Vec<u32>>> {
    let known = |t: &[u32]| !t.is_empty() && !tokenizer.unk_id().is_some_and(|u| t.contains(&u));
    let lower = word.to_lowercase();
    for candidate in [word.to_string(), lower.clone()] {
        let t = tokenizer.encode(&candidate)?;
        if known(&t) {
            return Ok(Some(t));
        }
    }
    let mut kept = String::new();
    for c in lower.chars() {
        if known(&tokenizer.encode(&c.to_string())?) {
            kept.push(c);
        }
    }
    let t = tokenizer.encode(&kept)?;
    Ok(known(&t).then_some(t))
}

/// [`text_entries`]; with `lenient` (text an LLM wrote, not a user's script) a word the
/// tokenizer cannot say is respelt ([`lenient_tokens`]) or, failing that, skipped and
/// recorded there instead of refused.
#[allow(clippy::too_many_arguments)]
pub fn text_entries_as(
    tokenizer: &crate::models::tokenizer::TextTokenizer,
    text: &str,
    frame_rate: f64,
    speaker: Option<u32>,
    padding_between: usize,
    entries: &mut Vec<Entry>,
    mut lenient: Option<&mut Vec<String>>,
) -> Result<bool> {
    let line = text
        .replace('\u{2019}', "'")
        .replace(':', " ")
        .replace(['(', ')'], "");
    let mut first = true;
    let mut add = |word: &str, entries: &mut Vec<Entry>| -> Result<()> {
        let mut tokens = match lenient.as_deref_mut() {
            None => tokenizer.encode(word)?,
            Some(skipped) => match lenient_tokens(tokenizer, word)? {
                Some(t) => t,
                None => {
                    skipped.push(word.to_string());
                    return Ok(());
                }
            },
        };
        if tokens.is_empty() {
            return Err(Error::InvalidInput(format!(
                "the word `{word}` has no tokens in this model's tokenizer"
            )));
        }
        // The unknown piece would be fed as a word of its own id (0 is `new_word`).
        if tokenizer.unk_id().is_some_and(|u| tokens.contains(&u)) {
            if word.starts_with("<break") || word.starts_with("time=") {
                return Err(Error::InvalidInput(format!(
                    "`{word}` is not a pause: a pause is written <break time=\"1.5s\"/>, with 0 to 60 seconds"
                )));
            }
            return Err(Error::InvalidInput(format!(
                "the word `{word}` has characters this model's tokenizer does not know \
                 (the model says English and French)"
            )));
        }
        if first {
            if let Some(t) = speaker {
                tokens.insert(0, t);
            }
            first = false;
        }
        let padding = if padding_between > 0 {
            padding_between + tokens.len() - 1
        } else {
            0
        };
        entries.push(Entry {
            tokens,
            text: word.to_string(),
            padding,
        });
        Ok(())
    };
    let mut rest = line.as_str();
    while !rest.is_empty() {
        match next_event(rest) {
            Some((start, end, pause)) => {
                let word = &rest[..start];
                if !word.is_empty() {
                    add(word, entries)?;
                }
                if let Some(seconds) = pause {
                    entries.push(Entry {
                        tokens: vec![],
                        text: String::new(),
                        padding: round_half_even(seconds * frame_rate) as usize,
                    });
                }
                rest = &rest[end..];
            }
            None => {
                add(rest, entries)?;
                break;
            }
        }
    }
    Ok(!first)
}

/// Text arriving in pieces of any size, cut into entries as whole words come: a word is
/// whole once whitespace (or a break) follows it, or the input ends.
#[derive(Debug, Default)]
pub struct WordFeed {
    pending: String,
    started: bool,
    /// With `Some`, words the tokenizer cannot say are respelt or skipped (and listed).
    lenient: Option<Vec<String>>,
}

impl WordFeed {
    /// A feed for text an LLM writes: a word the tokenizer cannot say (an emoji, another
    /// alphabet) is respelt in lower case or without its unknown characters, or skipped,
    /// rather than failing the whole reply ([`Self::take_skipped`] says which).
    pub fn lenient() -> Self {
        Self {
            lenient: Some(vec![]),
            ..Self::default()
        }
    }

    /// The words skipped since the last call.
    pub fn take_skipped(&mut self) -> Vec<String> {
        self.lenient
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The entries of the whole words in `piece` and what came before it.
    pub fn push(
        &mut self,
        tokenizer: &crate::models::tokenizer::TextTokenizer,
        piece: &str,
        frame_rate: f64,
    ) -> Result<Vec<Entry>> {
        self.pending.push_str(piece);
        // Up to the last whitespace, unless a break tag is still open there.
        let mut cut = self.pending.rfind(char::is_whitespace).map_or(0, |i| {
            i + self.pending[i..].chars().next().map_or(1, char::len_utf8)
        });
        // A break tag has whitespace inside: a cut there waits for the tag to close, and
        // a closed tag (a separator itself) goes whole.
        if let Some(open) = self.pending.rfind("<break").filter(|&o| o < cut) {
            match self.pending[open..].find('>') {
                None => cut = open,
                Some(close) => cut = cut.max(open + close + 1),
            }
        }
        let done: String = self.pending.drain(..cut).collect();
        self.entries(tokenizer, &done, frame_rate)
    }

    /// The entries of what is left once the input has ended.
    pub fn finish(
        &mut self,
        tokenizer: &crate::models::tokenizer::TextTokenizer,
        frame_rate: f64,
    ) -> Result<Vec<Entry>> {
        let rest = std::mem::take(&mut self.pending);
        self.entries(tokenizer, &rest, frame_rate)
    }

    fn entries(
        &mut self,
        tokenizer: &crate::models::tokenizer::TextTokenizer,
        text: &str,
        frame_rate: f64,
    ) -> Result<Vec<Entry>> {
        let mut out = vec![];
        let speaker = (!self.started).then_some(ids::MAIN);
        if text_entries_as(
            tokenizer,
            text,
            frame_rate,
            speaker,
            1,
            &mut out,
            self.lenient.as_mut(),
        )? {
            self.started = true;
        }
        Ok(out)
    }
}

/// The first separator in `s`: a run of whitespace, or `<break time="Xs"/>` (X a number
/// of seconds, at most 60). Returns its span and, for a break, its seconds.
fn next_event(s: &str) -> Option<(usize, usize, Option<f64>)> {
    // The leftmost separator, a break tried before whitespace at each position (as the
    // reference's regular expression).
    s.char_indices().find_map(|(i, c)| {
        if let Some((len, secs)) = parse_break(&s[i..]) {
            Some((i, i + len, Some(secs)))
        } else if c.is_whitespace() {
            Some((i, i + whitespace_run(&s[i..]), None))
        } else {
            None
        }
    })
}

fn whitespace_run(s: &str) -> usize {
    s.find(|c: char| !c.is_whitespace()).unwrap_or(s.len())
}

/// `<break time="1.5s"/>` (spaces as the reference's pattern allows) at the start of `s`:
/// its length and seconds.
fn parse_break(s: &str) -> Option<(usize, f64)> {
    let rest = s.strip_prefix("<break")?;
    let body = rest.trim_start();
    if body.len() == rest.len() {
        return None; // `<break` needs whitespace before `time`
    }
    let body = body.strip_prefix("time=\"")?;
    let num_len = body.find("s\"")?;
    let secs: f64 = body[..num_len].parse().ok()?;
    if !(0.0..=60.0).contains(&secs) || !body[..num_len].starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let after = body[num_len + 2..].trim_start();
    let after = after.strip_prefix('/').unwrap_or(after);
    let after = after.strip_prefix('>')?;
    Some((s.len() - after.len(), secs))
}

/// Where the text stands (the reference's `State`).
#[derive(Debug, Clone)]
pub struct TextState {
    entries: std::collections::VecDeque<Entry>,
    remaining_padding: usize,
    forced_padding: usize,
    queued: std::collections::VecDeque<u32>,
    lookahead: std::collections::VecDeque<u32>,
    /// The step at which a word was asked for after the last one.
    pub end_step: Option<usize>,
    /// Each word and the step it was fed at.
    pub transcript: Vec<(String, usize)>,
}

/// Turns the model's text predictions into what it is fed (the reference's
/// `StateMachine`): words are fed when the model asks for one (or when it has padded for
/// `max_padding` steps), never while a word's tokens are still being fed or its padding
/// lasts; the word `second_stream_ahead` on goes on the second stream.
#[derive(Debug, Clone, Copy)]
pub struct StateMachine {
    /// Multiplexing base: the text vocabulary with its initial token (`text_card + 1`).
    pub card: u32,
    pub second_stream_ahead: usize,
    pub max_padding: usize,
    pub initial_padding: usize,
}

impl StateMachine {
    pub fn new_state(&self, entries: Vec<Entry>) -> TextState {
        TextState {
            entries: entries.into(),
            remaining_padding: self.initial_padding,
            forced_padding: self.initial_padding,
            queued: Default::default(),
            lookahead: Default::default(),
            end_step: None,
            transcript: vec![],
        }
    }

    /// The text token to feed after the model predicted `token` at `step`.
    pub fn process(&self, step: usize, st: &mut TextState, token: u32) -> i64 {
        let mut token = if token == ids::NEW_WORD {
            ids::NEW_WORD
        } else {
            ids::PAD
        };
        if !st.queued.is_empty() || st.forced_padding > 0 {
            token = ids::PAD;
        } else if st.remaining_padding == 0 {
            token = ids::NEW_WORD;
        }
        if token == ids::NEW_WORD {
            match st.entries.pop_front() {
                Some(entry) => {
                    if entry.tokens.is_empty() {
                        token = ids::PAD; // a pause
                    } else {
                        st.transcript.push((entry.text.clone(), step));
                        st.queued.extend(&entry.tokens);
                        if self.second_stream_ahead > 0 {
                            let ahead = st
                                .entries
                                .iter()
                                .filter(|e| !e.tokens.is_empty())
                                .nth(self.second_stream_ahead - 1);
                            if let Some(e) = ahead {
                                st.lookahead.extend(&e.tokens);
                            }
                        }
                        st.remaining_padding = self.max_padding;
                    }
                    st.forced_padding = entry.padding;
                }
                None => {
                    token = if self.second_stream_ahead > 0 && st.end_step.is_none() {
                        ids::NEW_WORD
                    } else {
                        ids::PAD
                    };
                    st.end_step.get_or_insert(step);
                }
            }
        }
        let mut output = if token == ids::PAD {
            st.remaining_padding = st.remaining_padding.saturating_sub(1);
            st.forced_padding = st.forced_padding.saturating_sub(1);
            st.queued.pop_front().unwrap_or(ids::PAD)
        } else {
            ids::NEW_WORD
        } as i64;
        if self.second_stream_ahead > 0 {
            let mut second = -1i64;
            if output == ids::NEW_WORD as i64 {
                second = ids::NEW_WORD as i64;
                output = st.queued.pop_front().unwrap_or(ids::PAD) as i64;
            } else if let Some(t) = st.lookahead.pop_front() {
                second = t as i64;
            }
            output += (second + 1) * self.card as i64;
        }
        output
    }
}

/// Steps generated after the end of the text once the audio has caught up.
pub const FINAL_PADDING: usize = 4;
/// The reference's `from_checkpoint_info` defaults.
pub const MAX_PADDING: usize = 8;
pub const INITIAL_PADDING: usize = 2;

/// How to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TtsOptions {
    /// Temperature of text and audio (0: greedy; the reference's default 0.6).
    pub temp: f32,
    pub seed: u64,
    /// Audio codebooks to generate (at most the model's; fewer is faster).
    pub codebooks: usize,
    /// A bound on the steps (the reference's `max_gen_length`, 30000: 40 minutes).
    pub max_steps: usize,
}

impl Default for TtsOptions {
    fn default() -> Self {
        Self {
            temp: 0.6,
            seed: 0,
            codebooks: usize::MAX,
            max_steps: 30_000,
        }
    }
}

/// What a generation gave.
#[derive(Debug, Clone)]
pub struct TtsOutput {
    /// Per step: the text token fed (multiplexed), then each generated codebook's token
    /// sampled at that step (-1 while the audio delay masks it).
    pub steps: Vec<Vec<i64>>,
    /// Per step: the text token the model predicted.
    pub predicted: Vec<u32>,
    /// The step at which the text ran out (None: it did not within `max_steps`).
    pub end_step: Option<usize>,
    /// Each word and the step it was fed at.
    pub transcript: Vec<(String, usize)>,
    /// Steps the audio comes after its text.
    pub delay_steps: usize,
    /// Each stream's delay (text first).
    pub delays: Vec<usize>,
}

impl TtsOutput {
    /// The frames with the codebooks' delays undone, as the reference's `LMGen` returns
    /// them (`[1 + codebooks]` per frame: frame f holds the text fed at step f and each
    /// codebook's token of time f).
    pub fn frames(&self) -> Vec<Vec<i64>> {
        let q = self.steps.first().map_or(0, |s| s.len() - 1);
        let max = self.delays[1..=q].iter().copied().max().unwrap_or(0);
        (0..self.steps.len().saturating_sub(max))
            .map(|f| {
                let mut frame = vec![self.steps[f][0]];
                frame.extend((0..q).map(|k| self.steps[f + self.delays[k + 1]][k + 1]));
                frame
            })
            .collect()
    }

    /// The speech, decoded by `mimi` (whose codebooks must be the generated ones) as
    /// [`TtsDecoder`] does, frame after frame.
    pub fn decode(&self, mimi: &mut dyn crate::models::mimi::FrameDecoder) -> Result<Vec<f32>> {
        let mut dec = TtsDecoder::new(mimi, self.delay_steps, &self.delays);
        let mut pcm = vec![];
        for f in self.frames() {
            if let Some(p) = dec.push(&f)? {
                pcm.extend(p);
            }
        }
        Ok(pcm)
    }
}

/// Mimi on the frames of a generation as they come, the reference's way: frames before
/// the audio delay skipped, the first `max delay` decoded frames dropped (the acoustic
/// codebooks' delay), samples clipped to [-1, 1].
pub struct TtsDecoder<'a> {
    mimi: &'a mut dyn crate::models::mimi::FrameDecoder,
    delay_steps: usize,
    drop: usize,
    frames: usize,
}

impl<'a> TtsDecoder<'a> {
    /// `delays`: each stream's delay, text first (the model's config).
    pub fn new(
        mimi: &'a mut dyn crate::models::mimi::FrameDecoder,
        delay_steps: usize,
        delays: &[usize],
    ) -> Self {
        mimi.reset_decoder();
        Self {
            drop: delays.iter().skip(1).copied().max().unwrap_or(0),
            mimi,
            delay_steps,
            frames: 0,
        }
    }

    /// One frame of tokens (`[text, codebooks...]`, delays undone); its audio when it
    /// has some (80 ms, 1920 samples at 24 kHz).
    pub fn push(&mut self, frame: &[i64]) -> Result<Option<Vec<f32>>> {
        let f = self.frames;
        self.frames += 1;
        if f < self.delay_steps {
            return Ok(None);
        }
        let codes: Vec<u32> = frame[1..]
            .iter()
            .map(|&c| u32::try_from(c))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::InvalidInput(format!("frame {f} after the delay has no audio")))?;
        let pcm = self.mimi.decode_frame(&codes)?;
        Ok((f - self.delay_steps >= self.drop)
            .then(|| pcm.iter().map(|v| v.clamp(-1.0, 1.0)).collect()))
    }
}

impl TtsModel {
    /// The text state machine of this model.
    pub fn machine(&self) -> StateMachine {
        StateMachine {
            card: self.lm.config().text_card as u32 + 1,
            second_stream_ahead: self.tts.second_stream_ahead,
            max_padding: MAX_PADDING,
            initial_padding: INITIAL_PADDING,
        }
    }

    /// Says `entries` in the conditioned voice (see [`Self::condition`]): the whole text
    /// at once through a [`TtsStream`].
    pub fn generate(
        &mut self,
        entries: Vec<Entry>,
        frame_rate: f64,
        opts: &TtsOptions,
    ) -> Result<TtsOutput> {
        let mut s = TtsStream::new(self, frame_rate, opts)?;
        s.push(entries);
        s.finish_input();
        loop {
            match s.step()? {
                Step::Stepped { .. } => {}
                Step::Done => break,
                Step::NeedWords => {
                    return Err(Error::InvalidInput(
                        "the generator asked for words after the input ended".into(),
                    ))
                }
            }
        }
        Ok(s.into_output())
    }
}

/// What [`TtsStream::step`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// One step ran; `frame`: the frame of tokens (delays undone) it completed, if any.
    Stepped { frame: Option<Vec<i64>> },
    /// The model asks for a word that has not arrived: push more (or finish the input)
    /// and step again. Nothing was emitted; the step resumes where it stopped.
    NeedWords,
    /// The text has been said and the audio has caught up.
    Done,
}

/// The reference's TTS procedure one step at a time, with words arriving while it runs:
/// the text fed as the state machine decides, the audio masked until the delay has
/// passed, the end `delay_steps + FINAL_PADDING` steps after the text ran out. The result
/// does not depend on when words arrive: a step that needs a word (or the word
/// `second_stream_ahead` on, for the second stream) waits for it.
pub struct TtsStream<'m> {
    model: &'m mut TtsModel,
    machine: StateMachine,
    st: TextState,
    text_s: crate::models::lm::generator::Sampling,
    audio_s: crate::models::lm::generator::Sampling,
    rng: rand::rngs::StdRng,
    codebooks: usize,
    max_steps: usize,
    input_done: bool,
    /// The current step's text prediction and hidden state, when it waits for words.
    pending: Option<(u32, Vec<f32>)>,
    prev_text: i64,
    prev_audio: Vec<i64>,
    out: TtsOutput,
}

impl<'m> TtsStream<'m> {
    pub fn new(model: &'m mut TtsModel, frame_rate: f64, opts: &TtsOptions) -> Result<Self> {
        use crate::models::lm::generator::Sampling;
        use rand::SeedableRng;
        let cfg = model.lm.config().clone();
        let codebooks = opts.codebooks.min(cfg.dep_q);
        if codebooks == 0 {
            return Err(Error::InvalidInput("0 codebooks to generate".into()));
        }
        // `int(audio_delay * frame_rate)`, as the reference.
        let delay_steps = (model.tts.audio_delay * frame_rate) as usize;
        let machine = model.machine();
        model.lm.reset();
        if let Some(g) = &mut model.gpu {
            if g.depformer_steps() != codebooks {
                return Err(Error::InvalidInput(format!(
                    "{codebooks} codebooks asked of a model put on the GPU for {}",
                    g.depformer_steps()
                )));
            }
            g.reset();
        }
        Ok(Self {
            machine,
            st: machine.new_state(vec![]),
            text_s: Sampling {
                temp: opts.temp,
                top_k: 25,
            },
            audio_s: Sampling {
                temp: opts.temp,
                top_k: 250,
            },
            rng: rand::rngs::StdRng::seed_from_u64(opts.seed),
            codebooks,
            max_steps: opts.max_steps,
            input_done: false,
            pending: None,
            prev_text: cfg.text_card as i64,
            prev_audio: vec![ZERO; cfg.n_q],
            out: TtsOutput {
                steps: vec![],
                predicted: vec![],
                end_step: None,
                transcript: vec![],
                delay_steps,
                delays: cfg.delays.clone(),
            },
            model,
        })
    }

    /// More words to say.
    pub fn push(&mut self, entries: Vec<Entry>) {
        self.st.entries.extend(entries);
    }

    /// No more words will come.
    pub fn finish_input(&mut self) {
        self.input_done = true;
    }

    /// Words queued and not yet fed.
    pub fn queued_words(&self) -> usize {
        self.st.entries.len()
    }

    /// Whether feeding after `pred` takes a word, and the words it needs are not all here.
    fn waits_for_words(&self, pred: u32) -> bool {
        if self.input_done {
            return false;
        }
        let st = &self.st;
        let takes_word = st.queued.is_empty()
            && st.forced_padding == 0
            && (pred == ids::NEW_WORD || st.remaining_padding == 0);
        let with_tokens = st.entries.iter().filter(|e| !e.tokens.is_empty()).count();
        takes_word && with_tokens < 1 + self.machine.second_stream_ahead
    }

    pub fn step(&mut self) -> Result<Step> {
        let t = self.out.steps.len();
        let delay_steps = self.out.delay_steps;
        if t >= self.max_steps
            || self
                .st
                .end_step
                .is_some_and(|e| t >= e + delay_steps + FINAL_PADDING)
        {
            return Ok(Step::Done);
        }
        if self.model.gpu.is_some() {
            return self.step_gpu(t);
        }
        let (pred, hidden) = match self.pending.take() {
            Some(p) => p,
            None => {
                let input = self.input(t);
                // On the pool: a step's many fork-joins among workers that are awake.
                let lm = &mut self.model.lm;
                let o = crate::compute::cpu::on_pool(|| lm.temporal_step(&input))?;
                let pred = self.text_s.choose(&o.text_logits, &mut self.rng);
                (pred, o.hidden)
            }
        };
        if self.waits_for_words(pred) {
            self.pending = Some((pred, hidden));
            return Ok(Step::NeedWords);
        }
        let fed = self.machine.process(t, &mut self.st, pred);
        let mut picked = vec![];
        if t >= delay_steps {
            let (audio_s, rng) = (self.audio_s, &mut self.rng);
            let (lm, n) = (&mut self.model.lm, self.codebooks);
            picked = crate::compute::cpu::on_pool(|| {
                lm.depformer_step_first(n, fed, &hidden, |_, l| audio_s.choose(l, rng))
            })?;
        }
        Ok(self.record(t, pred, fed, &picked))
    }

    /// The step on the GPU: one submit when the step cannot wait for words (the two
    /// texts the state machine may feed prepared, the GPU picking by its prediction);
    /// otherwise the temporal step, then (once the words are here) the depformer.
    fn step_gpu(&mut self, t: usize) -> Result<Step> {
        let audio = t >= self.out.delay_steps;
        let pred = match self.pending.take() {
            // The temporal step ran; its hidden state waits on the GPU.
            Some((pred, _)) => pred,
            None => {
                let input = self.input(t);
                let mut draws = vec![self.draw(self.text_s)];
                if audio && !self.waits_for_words(ids::NEW_WORD) {
                    let fed = [ids::NEW_WORD, ids::PAD].map(|p| {
                        let mut st = self.st.clone();
                        self.machine.process(t, &mut st, p)
                    });
                    let emb = [
                        self.model.lm.depformer_text_embedding(fed[0])?,
                        self.model.lm.depformer_text_embedding(fed[1])?,
                    ];
                    for _ in 0..self.codebooks {
                        draws.push(self.draw(self.audio_s));
                    }
                    let (text_s, audio_s) = (self.text_s, self.audio_s);
                    let g = self.model.gpu.as_mut().expect("on the GPU");
                    let o =
                        g.tts_step(&input, text_s, audio_s, &draws, Some((&emb[0], &emb[1])))?;
                    let pred = o.text_token;
                    let fed_now = self.machine.process(t, &mut self.st, pred);
                    debug_assert_eq!(fed_now, fed[usize::from(pred != ids::NEW_WORD)]);
                    return Ok(self.record(t, pred, fed_now, &o.audio));
                }
                let (text_s, audio_s) = (self.text_s, self.audio_s);
                let g = self.model.gpu.as_mut().expect("on the GPU");
                g.tts_step(&input, text_s, audio_s, &draws, None)?
                    .text_token
            }
        };
        if self.waits_for_words(pred) {
            self.pending = Some((pred, vec![]));
            return Ok(Step::NeedWords);
        }
        let fed = self.machine.process(t, &mut self.st, pred);
        let mut picked = vec![];
        if audio {
            let emb = self.model.lm.depformer_text_embedding(fed)?;
            let mut draws = vec![0f32];
            for _ in 0..self.codebooks {
                draws.push(self.draw(self.audio_s));
            }
            let audio_s = self.audio_s;
            let g = self.model.gpu.as_mut().expect("on the GPU");
            picked = g.tts_depformer(&emb, audio_s, &draws)?;
        }
        Ok(self.record(t, pred, fed, &picked))
    }

    /// One uniform draw for a sampled stream, in the CPU path's order (none when greedy).
    fn draw(&mut self, s: crate::models::lm::generator::Sampling) -> f32 {
        use rand::Rng;
        if s.temp > 0.0 {
            (self.rng.random::<f64>() as f32).min(0.999_999_9)
        } else {
            0.0
        }
    }

    /// The temporal step's input at step `t`: the text fed and the codebooks drawn
    /// before, the initial tokens while the delays hold them.
    fn input(&self, t: usize) -> Vec<i64> {
        let cfg = self.model.lm.config();
        let mut input = vec![if t == 0 {
            cfg.text_card as i64
        } else {
            self.prev_text
        }];
        for (q, &prev) in self.prev_audio.iter().enumerate() {
            input.push(if t <= cfg.delays[q + 1] {
                cfg.card as i64
            } else {
                prev
            });
        }
        input
    }

    /// Records step `t` (the text predicted and fed, the codebooks drawn, masked where
    /// the delays say) and returns the frame it completed.
    fn record(&mut self, t: usize, pred: u32, fed: i64, picked: &[u32]) -> Step {
        let delay_steps = self.out.delay_steps;
        let mut audio = vec![ZERO; self.codebooks];
        for (q, &tok) in picked.iter().enumerate().take(self.codebooks) {
            if t >= self.out.delays[q + 1] + delay_steps {
                audio[q] = tok as i64;
            }
        }
        let mut step = vec![fed];
        step.extend(&audio);
        self.out.steps.push(step);
        self.out.predicted.push(pred);
        self.prev_text = fed;
        self.prev_audio[..self.codebooks].copy_from_slice(&audio);
        self.out.end_step = self.st.end_step;
        // The frame this step completed: its last codebook's token has now come.
        let max = self.out.delays[1..=self.codebooks]
            .iter()
            .copied()
            .max()
            .unwrap_or(0);
        let frame = t.checked_sub(max).map(|f| {
            let mut frame = vec![self.out.steps[f][0]];
            frame.extend(
                (0..self.codebooks).map(|k| self.out.steps[f + self.out.delays[k + 1]][k + 1]),
            );
            frame
        });
        Step::Stepped { frame }
    }

    /// Each word fed so far, with the step it was fed at.
    pub fn transcript(&self) -> &[(String, usize)] {
        &self.st.transcript
    }

    /// The generation so far.
    pub fn output(&self) -> &TtsOutput {
        &self.out
    }

    pub fn into_output(mut self) -> TtsOutput {
        self.out.transcript = std::mem::take(&mut self.st.transcript);
        self.out
    }
}

/// No token here: embedded as zero.
const ZERO: i64 = crate::models::lm::ZERO_TOKEN;
