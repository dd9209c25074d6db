//! The presets registry: `models/presets.json`, embedded at build time. Data, not code:
//! adding a preset is an edit to that file (its schema is in `models/README.md`).

use std::sync::OnceLock;

use serde::Deserialize;

use crate::{Error, Result};

/// The registry as shipped, parsed once.
const REGISTRY_JSON: &str = include_str!("../../../models/presets.json");

/// What a preset's models do, which decides the session mode that can run them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresetMode {
    /// Speech to text: a live transcript (Mimi + DSM STT).
    Listen,
    /// Full duplex: one model listens and speaks (Mimi + Moshi).
    Duplex,
    /// Text to speech (Mimi + DSM TTS).
    Tts,
    /// A text chat model (one GGUF file) for the cascade, run in process by llama.cpp.
    Llm,
}

impl PresetMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Listen => "listen",
            Self::Duplex => "duplex",
            Self::Tts => "tts",
            Self::Llm => "llm",
        }
    }
}

/// What a file is for in a Kyutai model directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileRole {
    /// `config.json`: the LM's keyword arguments and the other files' names.
    Config,
    /// The language model's safetensors (`moshi_name`).
    Lm,
    /// The Mimi codec's safetensors (`mimi_name`).
    Mimi,
    /// Mimi's own config (`mimi_config_name`), for non-default codecs.
    MimiConfig,
    /// The SentencePiece text tokenizer (`tokenizer_name`).
    Tokenizer,
    /// A TTS voice (`speaker_wavs` latents, kyutai/tts-voices).
    Voice,
    /// A GGUF chat model for llama.cpp (its chat template inside).
    Gguf,
}

/// One file of a preset, named by its path in the Hub repository.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresetFile {
    /// Path in the repository (and in the local snapshot directory).
    pub name: String,
    pub role: FileRole,
    /// Size in bytes, for display and disk-space checks only: downloads take the Hub's
    /// own size (`X-Linked-Size` / `Content-Length`), which wins when they differ.
    pub size_bytes: u64,
    /// `true` when `size_bytes` was computed or taken from a sibling repository rather
    /// than published for this file.
    pub size_is_estimate: bool,
    /// Where `size_bytes` comes from.
    #[serde(default)]
    pub size_source: String,
}

/// A named set of files in one Hub repository that together make a runnable model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub name: String,
    pub title: String,
    pub mode: PresetMode,
    /// `owner/name` on the Hub.
    pub repo: String,
    /// A branch, tag or commit hash.
    pub revision: String,
    /// Why this revision (a branch where no commit could be pinned, and so on).
    #[serde(default)]
    pub revision_note: String,
    /// Whether Parley can run this preset today.
    pub supported: bool,
    /// Why not, when `supported` is false.
    #[serde(default)]
    pub unsupported_reason: Option<String>,
    #[serde(default)]
    pub notes: Option<String>,
    /// Whether the model detects the end of the user's turn itself (the STT's semantic
    /// end-of-turn head), which the model manager says.
    #[serde(default)]
    pub end_of_turn: bool,
    pub files: Vec<PresetFile>,
}

impl Preset {
    /// Total bytes of the preset's files as the registry gives them.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size_bytes).sum()
    }

    /// The chat model's file of an `llm` preset (validated: exactly one `gguf` file).
    pub fn gguf_file(&self) -> Option<&PresetFile> {
        self.files.iter().find(|f| f.role == FileRole::Gguf)
    }

    /// Whether any file's registry size is an estimate.
    pub fn size_is_estimate(&self) -> bool {
        self.files.iter().any(|f| f.size_is_estimate)
    }

    /// Checks what serde cannot: unique, relative, non-empty file names; a reason when
    /// unsupported.
    fn validate(&self) -> std::result::Result<(), String> {
        if self.name.is_empty() || self.repo.split('/').count() != 2 || self.revision.is_empty() {
            return Err(format!(
                "preset `{}`: name, repo (owner/name) and revision are required",
                self.name
            ));
        }
        if self.files.is_empty() {
            return Err(format!("preset `{}` lists no files", self.name));
        }
        for (i, f) in self.files.iter().enumerate() {
            let bad = f.name.is_empty()
                || f.name.starts_with('/')
                || f.name.contains('\\')
                || f.name
                    .split('/')
                    .any(|part| part.is_empty() || part == "..");
            if bad {
                return Err(format!(
                    "preset `{}`: file name `{}` must be a relative path in the repository",
                    self.name, f.name
                ));
            }
            if self.files[..i].iter().any(|g| g.name == f.name) {
                return Err(format!("preset `{}` lists `{}` twice", self.name, f.name));
            }
        }
        let ggufs = self
            .files
            .iter()
            .filter(|f| f.role == FileRole::Gguf)
            .count();
        if (self.mode == PresetMode::Llm) != (ggufs == 1 && self.files.len() == 1) {
            return Err(format!(
                "preset `{}`: an llm preset has exactly one file, of role gguf, and only llm presets have one",
                self.name
            ));
        }
        if !self.supported && self.unsupported_reason.as_deref().is_none_or(str::is_empty) {
            return Err(format!(
                "preset `{}` is unsupported but gives no unsupported_reason",
                self.name
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registry {
    schema_version: u32,
    presets: Vec<Preset>,
}

/// Parses a registry in the `models/presets.json` format (the embedded one, or a test's).
pub fn parse_registry(json: &str) -> Result<Vec<Preset>> {
    let bad = |reason: String| Error::Config {
        path: "models/presets.json".into(),
        reason,
    };
    let registry: Registry = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    if registry.schema_version != 1 {
        return Err(bad(format!(
            "schema_version {} is not supported (1 is)",
            registry.schema_version
        )));
    }
    for (i, p) in registry.presets.iter().enumerate() {
        p.validate().map_err(bad)?;
        if registry.presets[..i].iter().any(|q| q.name == p.name) {
            return Err(bad(format!("preset `{}` is defined twice", p.name)));
        }
    }
    Ok(registry.presets)
}

/// Every preset of the embedded registry, in its order.
pub fn presets() -> &'static [Preset] {
    static PRESETS: OnceLock<Vec<Preset>> = OnceLock::new();
    PRESETS.get_or_init(|| {
        // Invariant: the embedded registry parses; `tests::embedded_registry_is_valid`
        // checks it, so a bad edit fails the tests rather than a user.
        parse_registry(REGISTRY_JSON).expect("models/presets.json is valid")
    })
}

/// The preset called `name`, or an error listing the known ones.
pub fn preset(name: &str) -> Result<&'static Preset> {
    presets()
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| Error::UnknownPreset {
            name: name.to_string(),
            known: presets()
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_registry_is_valid() {
        let all = parse_registry(REGISTRY_JSON).expect("registry");
        let names: Vec<&str> = all.iter().map(|p| p.name.as_str()).collect();
        for want in [
            "stt-1b-en_fr",
            "stt-2.6b-en",
            "moshiko-bf16",
            "moshika-bf16",
            "moshiko-q8",
            "moshika-q8",
            "tts-1.6b-en_fr",
            "tts-voices",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        for p in all
            .iter()
            .filter(|p| p.name != "tts-voices" && p.mode != PresetMode::Llm)
        {
            assert!(p.files.iter().any(|f| f.role == FileRole::Lm), "{}", p.name);
            assert!(
                p.files.iter().any(|f| f.role == FileRole::Mimi),
                "{}",
                p.name
            );
            assert!(
                p.files.iter().any(|f| f.role == FileRole::Tokenizer),
                "{}",
                p.name
            );
            assert!(p.total_bytes() > 0);
        }
        let llms: Vec<&Preset> = all.iter().filter(|p| p.mode == PresetMode::Llm).collect();
        assert!(llms.len() >= 3, "a few GGUF chat models for the cascade");
        for p in llms {
            let file = p.gguf_file().expect("gguf");
            assert!(file.name.ends_with(".gguf") && file.size_bytes > 100_000_000);
            assert_eq!(p.revision.len(), 40, "{} is pinned", p.name);
        }
        let tts = preset("tts-1.6b-en_fr").expect("tts");
        assert!(tts.supported && tts.mode == PresetMode::Tts);
        let voices = preset("tts-voices").expect("voices");
        assert!(voices.files.iter().all(|f| f.role == FileRole::Voice));
        assert!(!preset("moshiko-q8-bnb").expect("bnb").supported);
        assert!(preset("moshiko-q8").expect("q8").supported);
        // The listen preset is the -candle repository, pinned: it has the end-of-turn head.
        let stt = preset("stt-1b-en_fr").expect("stt");
        assert!(stt.supported && stt.mode == PresetMode::Listen && stt.end_of_turn);
        assert_eq!(stt.repo, "kyutai/stt-1b-en_fr-candle");
        assert_eq!(stt.revision, "095e38f6242006a93c2541149b181988397f5c7c");
        assert!(!preset("stt-1b-en_fr-pytorch").expect("plain").end_of_turn);
        assert_eq!(
            preset("moshika-bf16").expect("moshika").revision,
            "a49141e28b3d9c947cf9aa5314431e1b11cbd2f5"
        );
    }

    #[test]
    fn registry_names_agree_with_the_file_roles() {
        // The STT presets' config.json names these files (Kyutai's published configs).
        let stt = preset("stt-2.6b-en").expect("stt");
        let names: Vec<&str> = stt.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "config.json",
                "model.safetensors",
                "mimi-pytorch-e351c8d8@125.safetensors",
                "tokenizer_en_audio_4000.model"
            ]
        );
        // Repositories without config.json use the reference loader's default names.
        let moshi = preset("moshiko-bf16").expect("moshi");
        let lm = moshi.files.iter().find(|f| f.role == FileRole::Lm);
        assert_eq!(
            lm.map(|f| f.name.as_str()),
            Some(crate::models::kyutai_config::DEFAULT_MOSHI_NAME)
        );
        let mimi = moshi.files.iter().find(|f| f.role == FileRole::Mimi);
        assert_eq!(
            mimi.map(|f| f.name.as_str()),
            Some(crate::models::kyutai_config::DEFAULT_MIMI_NAME)
        );
        // The -candle-q8 repositories: the GGUF that ModelDir takes for Moshi 7B.
        for name in ["moshiko-q8", "moshika-q8"] {
            let q8 = preset(name).expect("q8");
            let lm = q8.files.iter().find(|f| f.role == FileRole::Lm);
            assert_eq!(
                lm.map(|f| f.name.as_str()),
                Some(crate::models::kyutai_config::CANDLE_Q8_MOSHI_NAME)
            );
            assert!(q8.repo.ends_with("-candle-q8"), "{}", q8.repo);
        }
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let err = preset("stt-9b").expect_err("unknown").to_string();
        assert!(err.contains("stt-9b"), "{err}");
        assert!(
            err.contains("stt-1b-en_fr") && err.contains("moshiko-bf16"),
            "{err}"
        );
    }

    #[test]
    fn bad_registries_are_named_errors() {
        let one = |files: &str, extra: &str| {
            format!(
                r#"{{"schema_version": 1, "presets": [{{"name": "x", "title": "t",
                "mode": "listen", "repo": "a/b", "revision": "main", "supported": true{extra},
                "files": {files}}}]}}"#
            )
        };
        let file = |name: &str| {
            format!(
                r#"{{"name": "{name}", "role": "lm", "size_bytes": 1, "size_is_estimate": true}}"#
            )
        };
        let ok = one(&format!("[{}]", file("model.safetensors")), "");
        assert_eq!(parse_registry(&ok).expect("ok").len(), 1);
        for (json, want) in [
            (one("[]", ""), "no files"),
            (one(&format!("[{}]", file("../x")), ""), "relative path"),
            (one(&format!("[{}]", file("/x")), ""), "relative path"),
            (
                one(&format!("[{0}, {0}]", file("a.safetensors")), ""),
                "twice",
            ),
            (
                one(&format!("[{}]", file("a")), r#", "mode2": 1"#),
                "unknown field",
            ),
            (
                ok.replace("\"supported\": true", "\"supported\": false"),
                "unsupported_reason",
            ),
            (
                ok.replace("\"schema_version\": 1", "\"schema_version\": 2"),
                "schema_version",
            ),
            (
                ok.replace("\"listen\"", "\"llm\""),
                "exactly one file, of role gguf",
            ),
            (
                ok.replace("\"lm\"", "\"gguf\""),
                "exactly one file, of role gguf",
            ),
        ] {
            let err = parse_registry(&json).expect_err(want).to_string();
            assert!(err.contains(want), "{want}: {err}");
            assert!(err.contains("presets.json"), "{err}");
        }
    }
}
