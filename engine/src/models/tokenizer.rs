//! SentencePiece text tokenizers (Kyutai's `.model` files) read into the `tokenizers`
//! crate: a Unigram model over the file's pieces and scores, with its precompiled
//! normalisation map and the `▁` word-boundary convention.
//!
//! The `.model` file is a protobuf `ModelProto`; only the fields a unigram model needs are
//! read, with a small wire-format reader below (pulling a protobuf code generator and the
//! schema in for four fields would cost more than it saves).

use std::path::Path;

use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::precompiled::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::Tokenizer;

use crate::{Error, Result};

/// A piece's kind in the `.model` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

#[derive(Debug, Clone)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    pieces: Vec<(String, PieceKind)>,
    unk_id: Option<u32>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    /// SentencePiece's `remove_extra_whitespaces`: trim, and collapse runs of spaces.
    squeeze_spaces: bool,
    add_dummy_prefix: bool,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// The next field: (number, wire type, payload as bytes or as an integer).
    fn field(&mut self) -> Option<(u64, Field<'a>)> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Field::Int(self.varint()?),
            1 => {
                let b = self.buf.get(self.pos..self.pos + 8)?;
                self.pos += 8;
                Field::Int(u64::from_le_bytes(b.try_into().ok()?))
            }
            2 => {
                let len = self.varint()? as usize;
                let b = self.buf.get(self.pos..self.pos.checked_add(len)?)?;
                self.pos += len;
                Field::Bytes(b)
            }
            5 => {
                let b = self.buf.get(self.pos..self.pos + 4)?;
                self.pos += 4;
                Field::Fixed32(u32::from_le_bytes(b.try_into().ok()?))
            }
            _ => return None,
        };
        Some((key >> 3, value))
    }
}

enum Field<'a> {
    Int(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

fn bad(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::BadFile {
        path: path.to_path_buf(),
        reason: format!("not a SentencePiece model: {reason}"),
    }
}

/// Checks a `precompiled_charsmap` (a darts-clone double-array trie of `u32` units, then
/// the NUL-separated replacement strings) before `tokenizers` reads it: its reader sizes
/// the trie from the first word and indexes units and strings as the file says, so a
/// damaged map would allocate gigabytes or index out of bounds (a panic). Every node the
/// lookup can reach is walked: each child block and leaf unit must lie in the trie, each
/// replacement must start on a character of the strings.
fn check_charsmap(map: &[u8]) -> std::result::Result<(), String> {
    let trie_bytes = map
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or("shorter than its 4-byte length")?;
    if trie_bytes > map.len() - 4 || trie_bytes % 4 != 0 || trie_bytes == 0 {
        return Err(format!(
            "a trie of {trie_bytes} bytes in a map of {}",
            map.len()
        ));
    }
    let units: Vec<usize> = map[4..4 + trie_bytes]
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let strings = std::str::from_utf8(&map[4 + trie_bytes..])
        .map_err(|_| "its replacement strings are not UTF-8")?;
    // darts-clone's unit fields.
    let offset = |u: usize| (u >> 10) << ((u & (1 << 9)) >> 6);
    let has_leaf = |u: usize| (u >> 8) & 1 == 1;
    let label = |u: usize| u & ((1 << 31) | 0xff);
    let value = |u: usize| u & ((1 << 31) - 1);
    let n = units.len();
    let mut seen = vec![false; n];
    let mut stack = vec![0usize];
    seen[0] = true;
    while let Some(node) = stack.pop() {
        let base = node ^ offset(units[node]);
        // A child is looked up at base ^ c for every byte c: the whole 256-unit block.
        if (base | 0xff) >= n {
            return Err(format!("trie node {node} points past the trie's {n} units"));
        }
        for c in 1..=255usize {
            let child = base ^ c;
            if label(units[child]) != c || seen[child] {
                continue;
            }
            seen[child] = true;
            let leaf = child ^ offset(units[child]);
            if has_leaf(units[child]) {
                let v = units.get(leaf).map(|&u| value(u));
                if v.is_none_or(|v| v >= strings.len() || !strings.is_char_boundary(v)) {
                    return Err(format!("trie node {child} names no replacement string"));
                }
            }
            stack.push(child);
        }
    }
    Ok(())
}

impl TextTokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|reason| bad(path, reason))
    }

    fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut pieces: Vec<(String, f64, PieceKind)> = vec![];
        let mut charsmap: &[u8] = &[];
        let (mut unk_id, mut bos_id, mut eos_id, mut pad_id) = (Some(0), Some(1), Some(2), None);
        let mut model_type = 1; // UNIGRAM
        let mut byte_fallback = false;
        let mut add_dummy_prefix = true;
        let mut squeeze_spaces = true;
        let mut r = Reader { buf: bytes, pos: 0 };
        while r.pos < bytes.len() {
            let (num, field) = r.field().ok_or("truncated or corrupt protobuf")?;
            match (num, field) {
                (1, Field::Bytes(b)) => {
                    let (mut piece, mut score, mut kind) = (String::new(), 0f32, 1u64);
                    let mut pr = Reader { buf: b, pos: 0 };
                    while pr.pos < b.len() {
                        match pr.field().ok_or("corrupt piece")? {
                            (1, Field::Bytes(s)) => {
                                piece = String::from_utf8(s.to_vec())
                                    .map_err(|_| "piece is not UTF-8")?
                            }
                            (2, Field::Fixed32(f)) => score = f32::from_bits(f),
                            (3, Field::Int(k)) => kind = k,
                            _ => {}
                        }
                    }
                    let kind = match kind {
                        2 => PieceKind::Unknown,
                        3 => PieceKind::Control,
                        4 => PieceKind::UserDefined,
                        5 => PieceKind::Unused,
                        6 => PieceKind::Byte,
                        _ => PieceKind::Normal,
                    };
                    pieces.push((piece, score as f64, kind));
                }
                (2, Field::Bytes(b)) => {
                    let mut tr = Reader { buf: b, pos: 0 };
                    while tr.pos < b.len() {
                        let (n, f) = tr.field().ok_or("corrupt trainer spec")?;
                        let id = |f: &Field| match f {
                            Field::Int(v) => {
                                let v = *v as i64 as i32;
                                (v >= 0).then_some(v as u32)
                            }
                            _ => None,
                        };
                        match n {
                            3 => {
                                if let Field::Int(v) = f {
                                    model_type = v
                                }
                            }
                            35 => byte_fallback = matches!(f, Field::Int(1)),
                            40 => unk_id = id(&f),
                            41 => bos_id = id(&f),
                            42 => eos_id = id(&f),
                            43 => pad_id = id(&f),
                            _ => {}
                        }
                    }
                }
                (3, Field::Bytes(b)) => {
                    let mut nr = Reader { buf: b, pos: 0 };
                    while nr.pos < b.len() {
                        match nr.field().ok_or("corrupt normalizer spec")? {
                            (2, Field::Bytes(m)) => charsmap = m,
                            (3, Field::Int(v)) => add_dummy_prefix = v != 0,
                            (4, Field::Int(v)) => squeeze_spaces = v != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if pieces.is_empty() {
            return Err("no pieces".into());
        }
        if model_type != 1 {
            return Err(format!("model type {model_type} is not unigram (1)"));
        }
        let vocab: Vec<(String, f64)> = pieces.iter().map(|(p, s, _)| (p.clone(), *s)).collect();
        let unigram = Unigram::from(vocab, unk_id.map(|u| u as usize), byte_fallback)
            .map_err(|e| format!("unigram model: {e}"))?;
        let mut tokenizer = Tokenizer::new(unigram);
        if !charsmap.is_empty() {
            check_charsmap(charsmap).map_err(|e| format!("normalizer: {e}"))?;
            let pre = Precompiled::from(charsmap).map_err(|e| format!("normalizer: {e}"))?;
            tokenizer
                .with_normalizer(Some(pre))
                .map_err(|e| format!("normalizer: {e}"))?;
        }
        let scheme = if add_dummy_prefix {
            PrependScheme::Always
        } else {
            PrependScheme::Never
        };
        tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, true)));
        Ok(Self {
            tokenizer,
            pieces: pieces.into_iter().map(|(p, _, k)| (p, k)).collect(),
            unk_id,
            bos_id,
            eos_id,
            pad_id,
            squeeze_spaces,
            add_dummy_prefix,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }

    /// The piece of `id` as stored (`▁` marks a word start), None if out of range.
    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(|(p, _)| p.as_str())
    }

    /// Token ids of `text` (no bos/eos added), as `SentencePieceProcessor.encode`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let squeezed;
        let text = if self.squeeze_spaces {
            squeezed = text
                .split(' ')
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            squeezed.as_str()
        } else {
            text
        };
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::InvalidInput(format!("tokenizing {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, as `SentencePieceProcessor.decode`: control ids dropped, unknown
    /// ones shown as ` ⁇ `, byte pieces joined into UTF-8, `▁` turned into spaces and the
    /// dummy prefix's leading space removed. (Written here rather than through the
    /// `tokenizers` decoder, whose unknown-token and prefix handling differ from
    /// SentencePiece's.)
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some((piece, kind)) = self.pieces.get(id as usize) else {
                return Err(Error::InvalidInput(format!(
                    "token {id} is outside this tokenizer's {} pieces",
                    self.pieces.len()
                )));
            };
            match kind {
                PieceKind::Control | PieceKind::Unused => {}
                PieceKind::Unknown => bytes.extend_from_slice(" \u{2047} ".as_bytes()),
                PieceKind::Byte => {
                    let hex = piece.trim_start_matches("<0x").trim_end_matches('>');
                    match u8::from_str_radix(hex, 16) {
                        Ok(b) => bytes.push(b),
                        Err(_) => bytes.extend_from_slice(piece.as_bytes()),
                    }
                }
                PieceKind::Normal | PieceKind::UserDefined => {
                    bytes.extend_from_slice(piece.replace('\u{2581}', " ").as_bytes())
                }
            }
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if self.add_dummy_prefix && text.starts_with(' ') {
            text.remove(0);
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
    }

    #[test]
    fn agrees_with_the_sentencepiece_library() {
        for name in ["stt-tiny", "moshi-tiny"] {
            let tok = TextTokenizer::load(&fixture(name).join("tokenizer.model")).expect("load");
            let text =
                std::fs::read_to_string(fixture(name).join("tokenizer_cases.json")).expect("cases");
            let cases: serde_json::Value = serde_json::from_str(&text).expect("json");
            assert_eq!(
                tok.vocab_size() as u64,
                cases["vocab_size"].as_u64().expect("n")
            );
            assert_eq!(tok.eos_id().map(u64::from), cases["eos_id"].as_u64());
            for (i, p) in cases["pieces"]
                .as_array()
                .expect("pieces")
                .iter()
                .enumerate()
            {
                assert_eq!(tok.id_to_piece(i as u32), p.as_str(), "{name}: piece {i}");
            }
            for case in cases["encode"].as_array().expect("encode") {
                let text = case["text"].as_str().expect("text");
                let want: Vec<u32> = case["ids"]
                    .as_array()
                    .expect("ids")
                    .iter()
                    .map(|v| v.as_u64().expect("id") as u32)
                    .collect();
                assert_eq!(
                    tok.encode(text).expect("encode"),
                    want,
                    "{name}: encode {text:?}"
                );
            }
            for case in cases["decode"].as_array().expect("decode") {
                let ids: Vec<u32> = case["ids"]
                    .as_array()
                    .expect("ids")
                    .iter()
                    .map(|v| v.as_u64().expect("id") as u32)
                    .collect();
                let want = case["text"].as_str().expect("text");
                assert_eq!(
                    tok.decode(&ids).expect("decode"),
                    want,
                    "{name}: decode {ids:?}"
                );
            }
        }
    }

    #[test]
    fn garbage_is_a_named_error() {
        let dir = std::env::temp_dir().join(format!("parley-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("bad.model");
        std::fs::write(&path, b"\xff\xff\xff\xff not protobuf").expect("write");
        let err = TextTokenizer::load(&path).expect_err("garbage").to_string();
        assert!(err.contains("bad.model"), "{err}");
    }
}
