//! Kyutai's model repository layout: a `config.json` holding the language model's keyword
//! arguments plus the names of the other files (`moshi_name`, `mimi_name`,
//! `mimi_config_name`, `tokenizer_name`) and the per-use sections (`stt_config`,
//! `tts_config`, `lm_gen_config`), as read by the reference's `CheckpointInfo`. A model
//! directory on disk is laid out like the Hub repository it came from.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::checkpoint::Checkpoint;
use super::lm::generator::{GenConfig, Sampling};
use super::lm::{LmConfig, LmModel};
use super::mimi::{Mimi, MimiConfig};
use super::stt::SttConfig;
use super::tokenizer::TextTokenizer;
use super::weights::Weights;
use crate::compute::cpu::WeightPrecision;
use crate::{Error, Result};

/// The reference's defaults for repositories that leave a name out (`loaders.py`).
pub const DEFAULT_MIMI_NAME: &str = "tokenizer-e351c8d8-checkpoint125.safetensors";
pub const DEFAULT_MOSHI_NAME: &str = "model.safetensors";
/// The LM file of Kyutai's `-candle-q8` Moshi repositories (GGUF, q8_0), which have no
/// config.json either.
pub const CANDLE_Q8_MOSHI_NAME: &str = "model.q8.gguf";
pub const DEFAULT_TOKENIZER_NAME: &str = "tokenizer_spm_32k_3.model";

/// The file-naming part of `config.json`; the language model's own fields are read by the
/// language model.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct KyutaiConfig {
    pub moshi_name: Option<String>,
    pub mimi_name: Option<String>,
    pub mimi_config_name: Option<String>,
    pub tokenizer_name: Option<String>,
    pub model_type: Option<String>,
    /// Audio codebooks the LM sees in total, and those it generates (`n_q`, `dep_q`).
    pub n_q: Option<usize>,
    pub dep_q: Option<usize>,
    /// The padding token the reference STT script reads (default 3).
    pub text_padding_token_id: Option<u32>,
    #[serde(default)]
    pub tts_config: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub stt_config: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub lm_gen_config: serde_json::Map<String, serde_json::Value>,
}

/// A model directory: `config.json` and the files it names.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub root: PathBuf,
    pub config: KyutaiConfig,
}

impl ModelDir {
    /// Reads `root/config.json`. A directory without one that holds the default
    /// `model.safetensors` is taken, as the reference loader takes such a repository
    /// (kyutai/moshiko-pytorch-bf16 has no config.json), for a Moshi 7B with the default
    /// file names; one that holds `model.q8.gguf` (kyutai/moshiko-candle-q8) likewise,
    /// with that file as the LM.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.exists() {
            return Err(Error::config(
                root,
                "no such directory (a model directory was expected)",
            ));
        }
        if !root.is_dir() {
            return Err(Error::config(
                root,
                "not a directory (a model directory was expected)",
            ));
        }
        let path = root.join("config.json");
        if !path.exists() {
            for name in [DEFAULT_MOSHI_NAME, CANDLE_Q8_MOSHI_NAME] {
                if root.join(name).is_file() {
                    return Ok(Self {
                        root: root.to_path_buf(),
                        config: KyutaiConfig {
                            moshi_name: Some(name.to_string()),
                            ..KyutaiConfig::default()
                        },
                    });
                }
            }
            return Err(Error::config(
                &path,
                format!(
                    "missing: a Kyutai model directory has a config.json (or, for Moshi 7B, \
                     {DEFAULT_MOSHI_NAME} or {CANDLE_Q8_MOSHI_NAME} without one)"
                ),
            ));
        }
        let config = super::read_json_config(&path)?;
        Ok(Self {
            root: root.to_path_buf(),
            config,
        })
    }

    fn file(&self, name: &str) -> Result<PathBuf> {
        // A plain file name: a config never reaches outside its directory (`../x`, `/x`).
        if Path::new(name).file_name().and_then(|n| n.to_str()) != Some(name) {
            return Err(Error::config(
                self.root.join("config.json"),
                format!("names `{name}`, which is not a plain file name in the model directory"),
            ));
        }
        let path = self.root.join(name);
        if path.is_file() {
            Ok(path)
        } else if path.exists() {
            Err(Error::config(
                self.root.join("config.json"),
                format!(
                    "names `{name}`, which in {} is not a file",
                    self.root.display()
                ),
            ))
        } else if self.is_legacy_moshi() {
            Err(Error::config(
                self.root.join("config.json"),
                format!(
                    "missing, so {} was taken for Kyutai's Moshi 7B repository without one \
                     (it holds {}), but `{name}` of that repository is not there either; \
                     for any other model, the directory needs its config.json",
                    self.root.display(),
                    self.config
                        .moshi_name
                        .as_deref()
                        .unwrap_or(DEFAULT_MOSHI_NAME)
                ),
            ))
        } else {
            Err(Error::config(
                self.root.join("config.json"),
                format!("names `{name}`, which is not in {}", self.root.display()),
            ))
        }
    }

    pub fn mimi_weights(&self) -> Result<PathBuf> {
        self.file(
            self.config
                .mimi_name
                .as_deref()
                .unwrap_or(DEFAULT_MIMI_NAME),
        )
    }

    pub fn mimi_config(&self) -> Result<MimiConfig> {
        match &self.config.mimi_config_name {
            Some(name) => MimiConfig::from_json_file(&self.file(name)?),
            None => Ok(MimiConfig::default()),
        }
    }

    /// Codebooks the model's Mimi runs with, as the reference's `CheckpointInfo.get_mimi`:
    /// `max(dep_q, n_q - dep_q)` (halved for multistream TTS), 8 without an LM config.
    pub fn mimi_num_codebooks(&self) -> usize {
        let n = match (self.config.n_q, self.config.dep_q) {
            (Some(n_q), Some(dep_q)) => dep_q.max(n_q.saturating_sub(dep_q)),
            _ => 8,
        };
        let multistream = self
            .config
            .tts_config
            .get("multistream")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        if multistream {
            n / 2
        } else {
            n
        }
    }

    fn config_path(&self) -> PathBuf {
        self.root.join("config.json")
    }

    /// Whether this is a repository without config.json (see [`Self::open`]).
    pub fn is_legacy_moshi(&self) -> bool {
        !self.config_path().exists()
    }

    /// The language model's config (the LM keyword arguments of config.json; the
    /// reference loader's Moshi 7B defaults without one).
    pub fn lm_config(&self) -> Result<LmConfig> {
        if self.is_legacy_moshi() {
            return LmConfig::preset("moshi-7b")
                .ok_or_else(|| Error::config(self.config_path(), "no moshi-7b preset"));
        }
        LmConfig::from_json_file(&self.config_path())
    }

    /// The language model, loaded from `moshi_name`.
    /// Sampling as the model's `lm_gen_config` says (the reference's defaults for the
    /// keys it leaves out: text temperature 0.7, top 25; audio 0.8, top 250).
    pub fn gen_config(&self, seed: u64) -> GenConfig {
        let g = &self.config.lm_gen_config;
        let get = |k: &str, def: f64| g.get(k).and_then(serde_json::Value::as_f64).unwrap_or(def);
        GenConfig {
            text: Sampling {
                temp: get("temp_text", 0.7) as f32,
                top_k: get("top_k_text", 25.0) as usize,
            },
            audio: Sampling {
                temp: get("temp", 0.8) as f32,
                top_k: get("top_k", 250.0) as usize,
            },
            seed,
        }
    }

    pub fn load_lm(&self) -> Result<LmModel> {
        self.load_lm_as(WeightPrecision::F32)
    }

    /// The language model's checkpoint (`moshi_name`: safetensors or GGUF).
    pub fn lm_weights(&self) -> Result<PathBuf> {
        self.file(
            self.config
                .moshi_name
                .as_deref()
                .unwrap_or(DEFAULT_MOSHI_NAME),
        )
    }

    /// Weights in the language model's checkpoint, from its header alone (after the
    /// config is checked, so a config that describes no model says so first).
    pub fn lm_param_count(&self) -> Result<u64> {
        self.lm_config()?;
        Ok(Checkpoint::open(&self.lm_weights()?)?.param_count())
    }

    /// The language model with its matrices held in `precision` from the start: each
    /// tensor is read from disk and converted on its own (no f32 copy of a bf16
    /// checkpoint, no copy of the file in memory).
    pub fn load_lm_as(&self, precision: WeightPrecision) -> Result<LmModel> {
        let cfg = self.lm_config()?;
        let path = self.lm_weights()?;
        cfg.validate()
            .map_err(|r| Error::config(self.config_path(), r))?;
        LmModel::from_weights(&Weights::load(&path)?.with_precision(precision), cfg)
    }

    /// The text tokenizer named by `tokenizer_name`.
    pub fn load_tokenizer(&self) -> Result<TextTokenizer> {
        TextTokenizer::load(
            &self.file(
                self.config
                    .tokenizer_name
                    .as_deref()
                    .unwrap_or(DEFAULT_TOKENIZER_NAME),
            )?,
        )
    }

    /// `stt_config`, with the reference script's defaults.
    pub fn stt_config(&self) -> Result<SttConfig> {
        let c: SttConfig =
            serde_json::from_value(serde_json::Value::Object(self.config.stt_config.clone()))
                .map_err(|e| Error::config(self.config_path(), format!("stt_config: {e}")))?;
        c.validate()
            .map_err(|reason| Error::config(self.config_path(), reason))?;
        Ok(c)
    }

    /// The directory's Mimi with its config and codebook count.
    pub fn load_mimi(&self) -> Result<Mimi> {
        Mimi::load(
            &self.mimi_weights()?,
            self.mimi_config()?,
            self.mimi_num_codebooks(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codebooks_follow_the_reference_rule() {
        let mut dir = ModelDir {
            root: PathBuf::from("."),
            config: KyutaiConfig::default(),
        };
        assert_eq!(dir.mimi_num_codebooks(), 8);
        dir.config.n_q = Some(32);
        dir.config.dep_q = Some(0);
        assert_eq!(dir.mimi_num_codebooks(), 32); // stt
        dir.config.n_q = Some(16);
        dir.config.dep_q = Some(8);
        assert_eq!(dir.mimi_num_codebooks(), 8); // moshi
        dir.config.n_q = Some(32);
        dir.config.dep_q = Some(32);
        dir.config
            .tts_config
            .insert("multistream".into(), serde_json::json!(true));
        assert_eq!(dir.mimi_num_codebooks(), 16);
    }

    /// A negative, huge or absent-minded stt_config is an error naming the field (a delay
    /// of 1e12 s once stepped the model for ever).
    #[test]
    fn stt_config_out_of_sense_is_named() {
        let tmp = std::env::temp_dir().join(format!("parley-sttcfg-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).expect("dir");
        for (cfg, field) in [
            (
                r#"{"audio_delay_seconds": -1}"#,
                "audio_delay_seconds is -1",
            ),
            (r#"{"audio_delay_seconds": 1e12}"#, "audio_delay_seconds"),
            (
                r#"{"audio_silence_prefix_seconds": 1e9}"#,
                "audio_silence_prefix_seconds",
            ),
        ] {
            std::fs::write(
                tmp.join("config.json"),
                format!(r#"{{"stt_config": {cfg}}}"#),
            )
            .expect("write");
            let dir = ModelDir::open(&tmp).expect("open");
            let err = dir.stt_config().expect_err(cfg).to_string();
            assert!(
                err.contains(field)
                    && err.contains("config.json")
                    && err.contains("expected 0 to 60"),
                "{err}"
            );
        }
        std::fs::write(
            tmp.join("config.json"),
            r#"{"stt_config": {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 1.0}}"#,
        )
        .expect("write");
        let ok = ModelDir::open(&tmp)
            .expect("open")
            .stt_config()
            .expect("sane");
        assert_eq!(ok.audio_delay_seconds, 0.5);
        std::fs::remove_dir_all(&tmp).ok();
    }

    #[test]
    fn missing_files_are_named() {
        let tmp = std::env::temp_dir().join(format!("parley-modeldir-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).expect("dir");
        std::fs::write(
            tmp.join("config.json"),
            r#"{"mimi_name": "nope.safetensors"}"#,
        )
        .expect("write");
        let dir = ModelDir::open(&tmp).expect("open");
        let err = dir.load_mimi().expect_err("missing").to_string();
        assert!(err.contains("nope.safetensors"), "{err}");
        std::fs::write(tmp.join("config.json"), "{not json").expect("write");
        let err = ModelDir::open(&tmp).expect_err("bad json").to_string();
        assert!(err.contains("config.json"), "{err}");
        std::fs::remove_file(tmp.join("config.json")).expect("rm");
        let err = ModelDir::open(&tmp).expect_err("no config").to_string();
        assert!(err.contains("config.json"), "{err}");
    }

    #[test]
    fn a_repository_without_config_json_is_a_moshi_7b() {
        let tmp = std::env::temp_dir().join(format!("parley-legacy-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).expect("dir");
        std::fs::write(tmp.join(DEFAULT_MOSHI_NAME), b"").expect("write");
        let dir = ModelDir::open(&tmp).expect("legacy");
        assert!(dir.is_legacy_moshi());
        assert_eq!(dir.mimi_num_codebooks(), 8);
        let cfg = dir.lm_config().expect("lm config");
        assert_eq!(
            (cfg.dim, cfg.num_layers, cfg.n_q, cfg.dep_q),
            (4096, 32, 16, 8)
        );
        let err = dir.load_tokenizer().expect_err("no tokenizer").to_string();
        assert!(err.contains(DEFAULT_TOKENIZER_NAME), "{err}");
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
