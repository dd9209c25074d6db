//! The models of a session, by role, and the one place that turns a mode into stages.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::cascade::{CascadeModels, CascadeSlot, CascadeStage};
use super::stage::{Composition, FlushRequest};
use super::stages::{
    CodecDecoder, CodecEncoder, DecodeStage, DuplexLmStage, EncodeStage, ReplyOnsetStage, SttStage,
};
use super::turn::{TurnModels, TurnStage};
use crate::compute::gpu::{select_device, DeviceChoice};
use crate::compute::Dtype;
use crate::models::kyutai_config::ModelDir;
use crate::models::lm::generator::{GenConfig, LmBackend, LmGen};
use crate::models::mimi::gpu::GpuMimi;
use crate::models::mimi::Mimi;
use crate::models::stt::SttConfig;
use crate::models::tokenizer::TextTokenizer;
use crate::{Error, Result};

/// What the session does with the models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Mimi + a Moshi-style model: it listens and speaks at once.
    #[default]
    Duplex,
    /// Mimi + a speech-to-text model: live transcript, word times, end of turn.
    Listen,
    /// Listen, then a text LLM's answer spoken by the TTS, with turn-taking and barge-in.
    Cascade,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "duplex" => Ok(Self::Duplex),
            "listen" => Ok(Self::Listen),
            "cascade" => Ok(Self::Cascade),
            other => Err(format!(
                "unknown mode `{other}` (duplex, listen or cascade)"
            )),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Duplex => "duplex",
            Self::Listen => "listen",
            Self::Cascade => "cascade",
        })
    }
}

/// The listen role: a delayed-streams speech-to-text LM.
#[derive(Debug)]
pub struct ListenModel {
    pub gen: LmGen,
    /// None for random-weight models (text then shows as token ids).
    pub tokenizer: Option<TextTokenizer>,
    pub stt: SttConfig,
    pub padding_id: u32,
}

/// The duplex role: a Moshi-style LM that listens and speaks at once.
#[derive(Debug)]
pub struct DuplexModel {
    pub gen: LmGen,
    pub tokenizer: Option<TextTokenizer>,
    pub padding_id: u32,
}

/// The models of a session, by role, owned by its model thread (and handed back by
/// [`super::Session::join`] so a new session can reuse them). GPU models share one
/// device per process ([`select_device`]); with the LM on a GPU, Mimi runs there too
/// (falling back to the CPU, said in `device`, where its upload fails).
#[derive(Debug)]
pub struct Models {
    /// The codec every mode listens (and duplex speaks) through: the CPU's, the
    /// reference, and where the LM runs on a GPU, the same codec uploaded there.
    pub mimi: Mimi,
    pub gpu_mimi: Option<GpuMimi>,
    pub listen: Option<ListenModel>,
    pub duplex: Option<DuplexModel>,
    /// Silero VAD and Smart Turn, where ONNX Runtime and the models are found.
    pub turn: TurnModels,
    /// The cascade's LLM and TTS (the listen model hears); a session takes them and
    /// hands them back through `cascade_back` when its stage ends.
    pub cascade: Option<CascadeModels>,
    cascade_back: CascadeSlot,
    /// The line saying where the LM runs.
    pub device: String,
}

impl Models {
    /// The mode these models were loaded for.
    pub fn mode(&self) -> Mode {
        if self.duplex.is_some() {
            Mode::Duplex
        } else if self.cascade.is_some() {
            Mode::Cascade
        } else {
            Mode::Listen
        }
    }

    /// Loads a model directory for `mode` on `device`: the LM in `dtype`, Mimi beside it,
    /// and the turn-taking models where they are found. Duplex sampling follows the
    /// model's `lm_gen_config` unless `sampling` is given.
    pub fn load(
        dir: &Path,
        mode: Mode,
        device: DeviceChoice,
        dtype: Dtype,
        sampling: Option<GenConfig>,
    ) -> Result<Self> {
        let d = ModelDir::open(dir)?;
        let lm_cfg = d.lm_config()?;
        match (mode, lm_cfg.dep_q) {
            (Mode::Listen | Mode::Cascade, q) if q > 0 => {
                return Err(Error::config(
                    dir,
                    "this model speaks (dep_q > 0): use --mode duplex (the cascade hears with \
                     a speech-to-text model)",
                ))
            }
            (Mode::Duplex, 0) => {
                return Err(Error::config(
                    dir,
                    "this model does not speak (dep_q = 0): use --mode listen",
                ))
            }
            _ => {}
        }
        let mut mimi = d.load_mimi()?;
        mimi.set_weight_precision(dtype.mimi_precision())?;
        let (backend, device) = select_device(device)?;
        let (lm, weights) = LmBackend::open(&backend, dtype, Some(d.lm_param_count()?), |p| {
            d.load_lm_as(p)
        })?;
        let (gpu_mimi, codec) = GpuMimi::beside(backend.gpu(), &mimi);
        let device = format!("{device}; {weights}; {codec}");
        let gen = LmGen::with_backend(
            lm,
            match (mode, sampling) {
                (_, Some(s)) => s,
                (Mode::Listen | Mode::Cascade, None) => GenConfig::default(),
                (Mode::Duplex, None) => d.gen_config(0),
            },
        );
        Ok(Self::by_role(
            mode,
            (mimi, gpu_mimi),
            gen,
            Some(d.load_tokenizer()?),
            d.stt_config()?,
            d.config.text_padding_token_id.unwrap_or(3),
            device,
        ))
    }

    /// A full-size architecture with random weights (published Mimi, `preset` LM), for
    /// the latency harness's timings: speed does not depend on the values. No tokenizer.
    pub fn random(mode: Mode, preset: &str, device: DeviceChoice, dtype: Dtype) -> Result<Self> {
        use crate::models::lm::{LmConfig, LmModel};
        use crate::models::mimi::MimiConfig;
        use crate::models::weights::Weights;
        let cfg = LmConfig::preset(preset).ok_or_else(|| {
            Error::InvalidInput(format!(
                "unknown preset `{preset}`; known: {}",
                crate::models::lm::config::PRESETS.join(", ")
            ))
        })?;
        if cfg.is_tts() {
            return Err(Error::InvalidInput(format!(
                "{preset} is a text-to-speech model: `parley bench tts` times it"
            )));
        }
        if (mode != Mode::Duplex) != (cfg.dep_q == 0) {
            return Err(Error::InvalidInput(format!(
                "preset {preset} does not fit --mode {mode}"
            )));
        }
        // The user's audio codebooks: what the LM reads per step.
        let n_in = cfg.n_q - cfg.dep_q;
        let mut mimi = Mimi::from_weights(
            &Weights::random(1),
            MimiConfig::default(),
            n_in.max(cfg.dep_q),
        )?;
        mimi.set_weight_precision(dtype.mimi_precision())?;
        let (backend, device) = select_device(device)?;
        let (lm, weights) = LmBackend::open(&backend, dtype, None, |p| {
            LmModel::from_weights(&Weights::random(2).with_precision(p), cfg)
        })?;
        let (gpu_mimi, codec) = GpuMimi::beside(backend.gpu(), &mimi);
        let device = format!("{device}; {weights}; {codec}");
        // The reference STT procedure's defaults (1 s of silence before, 0.5 s delay).
        let stt = SttConfig {
            audio_silence_prefix_seconds: 1.0,
            audio_delay_seconds: 0.5,
        };
        let gen = LmGen::with_backend(lm, GenConfig::default());
        Ok(Self::by_role(
            mode,
            (mimi, gpu_mimi),
            gen,
            None,
            stt,
            3,
            device,
        ))
    }

    /// The LM in the role `mode` needs, with Mimi and the turn-taking models.
    fn by_role(
        mode: Mode,
        (mimi, gpu_mimi): (Mimi, Option<GpuMimi>),
        gen: LmGen,
        tokenizer: Option<TextTokenizer>,
        stt: SttConfig,
        padding_id: u32,
        device: String,
    ) -> Self {
        let (listen, duplex) = match mode {
            Mode::Listen | Mode::Cascade => (
                Some(ListenModel {
                    gen,
                    tokenizer,
                    stt,
                    padding_id,
                }),
                None,
            ),
            Mode::Duplex => (
                None,
                Some(DuplexModel {
                    gen,
                    tokenizer,
                    padding_id,
                }),
            ),
        };
        Self {
            mimi,
            gpu_mimi,
            listen,
            duplex,
            turn: TurnModels::load(),
            cascade: None,
            cascade_back: CascadeSlot::default(),
            device,
        }
    }

    /// The stages of `mode`, borrowing these models: the only place a mode is matched.
    ///
    /// - listen: encode (Mimi) → stt (the LM, words, the end-of-turn head) → turn
    /// - duplex: encode → lm (Moshi) → decode (Mimi) → turn → reply onset
    /// - cascade: encode → stt → turn → cascade (the LLM and the TTS on their threads)
    pub fn compose(&mut self, mode: Mode) -> Result<Composition<'_>> {
        let rate = self.mimi.config().frame_rate;
        let (enc, dec) = match self.gpu_mimi.as_mut() {
            Some(g) => {
                let (e, d) = g.halves();
                (CodecEncoder::Gpu(e), CodecDecoder::Gpu(d))
            }
            None => {
                let (e, d) = self.mimi.halves();
                (CodecEncoder::Cpu(e), CodecDecoder::Cpu(d))
            }
        };
        let turn = &mut self.turn;
        Ok(match mode {
            Mode::Listen => {
                let m = self.listen.as_mut().ok_or_else(|| {
                    Error::InvalidInput("listen mode needs a speech-to-text model".into())
                })?;
                Composition {
                    stages: vec![
                        Box::new(EncodeStage::new(enc)),
                        Box::new(SttStage::new(m, rate)),
                        Box::new(TurnStage::new(turn)?),
                    ],
                    speaks: false,
                }
            }
            Mode::Duplex => {
                let m = self.duplex.as_mut().ok_or_else(|| {
                    Error::InvalidInput("duplex mode needs a Moshi-style model".into())
                })?;
                Composition {
                    stages: vec![
                        Box::new(EncodeStage::new(enc)),
                        Box::new(DuplexLmStage::new(m)),
                        Box::new(DecodeStage::new(dec)),
                        Box::new(TurnStage::new(turn)?),
                        Box::new(ReplyOnsetStage::default()),
                    ],
                    speaks: true,
                }
            }
            Mode::Cascade => {
                let m = self.listen.as_mut().ok_or_else(|| {
                    Error::InvalidInput("the cascade needs a speech-to-text model".into())
                })?;
                let c = self.cascade.take().ok_or_else(|| {
                    Error::InvalidInput(
                        "the cascade needs its LLM and TTS (they serve one session)".into(),
                    )
                })?;
                // At an end of turn the STT brings out its last words before the reply.
                let flush = FlushRequest::default();
                Composition {
                    stages: vec![
                        Box::new(EncodeStage::new(enc)),
                        Box::new(SttStage::new(m, rate).flushing(flush.clone())),
                        Box::new(TurnStage::new(turn)?.flushing_stt(flush)),
                        Box::new(
                            CascadeStage::new(c)?
                                .give_back_to(self.cascade_back.clone())
                                .awaiting_stt_flush(),
                        ),
                    ],
                    speaks: true,
                }
            }
        })
    }

    /// Clears every model's streaming state.
    pub fn reset(&mut self) {
        self.mimi.reset();
        if let Some(g) = &mut self.gpu_mimi {
            g.reset();
        }
        if let Some(m) = &mut self.listen {
            m.gen.reset();
        }
        if let Some(m) = &mut self.duplex {
            m.gen.reset();
        }
        self.turn.reset();
        // The cascade's LLM and TTS, back from the stage, for a new conversation.
        if self.cascade.is_none() {
            let back = self.cascade_back.lock().map(|mut b| b.take());
            self.cascade = back.ok().flatten();
        }
        if let Some(c) = &mut self.cascade {
            c.history.clear();
        }
    }
}
