//! Property-based tests of every file parser and loader against hostile bytes: audio files
//! (WAV and the formats symphonia reads), safetensors and GGUF checkpoints, `config.json`
//! (the LM's and the STT's keys) and Mimi's config, `.npy` codes. Each input is a valid
//! file with some of its bytes or values replaced by hostile ones (huge, zero, negative,
//! of the wrong type), or arbitrary bytes. The property is the same everywhere: the
//! loader returns, with a value that holds what it claims or an error; it never panics,
//! never aborts on an allocation sized from the input, never loops for ever.
//!
//! CI runs 64 cases per property. The longer run (documented in README.md):
//! `PROPTEST_CASES=5000 cargo test --release -p parley-engine --test hostile_inputs`.
//! A failure prints the smallest input found.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use parley_engine::audio::file::{read_audio_24k, read_audio_mono, SAMPLE_RATES_HZ};
use parley_engine::compute::cpu::WeightPrecision;
use parley_engine::models::checkpoint::Checkpoint;
use parley_engine::models::kyutai_config::ModelDir;
use parley_engine::models::lm::generator::{GenConfig, LmGen};
use parley_engine::models::mimi::{Mimi, MimiConfig};
use parley_engine::models::tokenizer::TextTokenizer;
use parley_engine::npy;
use proptest::prelude::*;
use serde_json::Value;

/// 64 cases from a fixed seed (CI: the same cases every run), or with `PROPTEST_CASES`
/// set, that many from a random seed (the longer run, new cases each time).
fn config() -> ProptestConfig {
    let base = ProptestConfig {
        // No regression files written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_some() {
        base
    } else {
        ProptestConfig {
            cases: 64,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x9a71e5),
            ..base
        }
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A file in this process's scratch directory, removed when dropped (thousands of cases
/// leave nothing behind).
struct TempFile(PathBuf);

impl std::ops::Deref for TempFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempFile {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A fresh file path in this process's scratch directory.
fn scratch(name: &str) -> TempFile {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("parley-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    TempFile(dir.join(format!("{}-{name}", N.fetch_add(1, Ordering::Relaxed))))
}

/// Byte edits: (position as a fraction of the length, new byte), then a truncation.
#[derive(Debug, Clone)]
struct Mutation {
    edits: Vec<(f64, u8)>,
    /// Keep this fraction of the bytes (1.0: all).
    keep: f64,
    /// Edit only the first this-many bytes (the header), if set.
    header: Option<usize>,
}

fn mutation(header_bias: usize) -> impl Strategy<Value = Mutation> {
    (
        prop::collection::vec((0.0..1.0f64, any::<u8>()), 0..8),
        prop_oneof![3 => Just(1.0), 1 => 0.0..1.0f64],
        prop::bool::weighted(0.7),
    )
        .prop_map(move |(edits, keep, in_header)| Mutation {
            edits,
            keep,
            header: in_header.then_some(header_bias),
        })
}

impl Mutation {
    fn apply(&self, mut bytes: Vec<u8>) -> Vec<u8> {
        if !bytes.is_empty() {
            let span = self.header.map_or(bytes.len(), |h| h.min(bytes.len()));
            for &(at, b) in &self.edits {
                let i = ((at * span as f64) as usize).min(span - 1);
                bytes[i] = b;
            }
        }
        let keep = (bytes.len() as f64 * self.keep) as usize;
        bytes.truncate(keep);
        bytes
    }
}

fn write(name: &str, bytes: &[u8]) -> TempFile {
    let path = scratch(name);
    std::fs::write(&path, bytes).expect("write");
    path
}

// ----- audio -----

#[derive(Debug, Clone)]
struct WavSpec {
    channels: u16,
    rate: u32,
    bits: u16,
    float: bool,
    frames: usize,
}

fn wav_spec() -> impl Strategy<Value = WavSpec> {
    (
        1u16..4,
        prop_oneof![
            Just(8000u32),
            Just(16000),
            Just(22050),
            Just(24000),
            Just(44100),
            Just(48000),
            4000u32..96000
        ],
        prop_oneof![
            Just((8u16, false)),
            Just((16, false)),
            Just((24, false)),
            Just((32, false)),
            Just((32, true))
        ],
        0usize..600,
    )
        .prop_map(|(channels, rate, (bits, float), frames)| WavSpec {
            channels,
            rate,
            bits,
            float,
            frames,
        })
}

/// A WAV of `spec` holding a ramp; the samples as f32 in [-1, 1).
fn wav_bytes(spec: &WavSpec) -> (Vec<u8>, Vec<f32>) {
    let mut cursor = std::io::Cursor::new(Vec::new());
    let hspec = hound::WavSpec {
        channels: spec.channels,
        sample_rate: spec.rate,
        bits_per_sample: spec.bits,
        sample_format: if spec.float {
            hound::SampleFormat::Float
        } else {
            hound::SampleFormat::Int
        },
    };
    let mut mono = vec![];
    {
        let mut w = hound::WavWriter::new(&mut cursor, hspec).expect("writer");
        let full = 1i64 << (spec.bits - 1);
        for i in 0..spec.frames {
            let v = ((i * 37) % 200) as f32 / 100.0 - 1.0;
            let q = ((v * full as f32) as i64).clamp(-full, full - 1);
            for _ in 0..spec.channels {
                if spec.float {
                    w.write_sample(v).expect("f32");
                } else {
                    w.write_sample(q as i32).expect("int");
                }
            }
            mono.push(if spec.float {
                v
            } else {
                q as f32 / full as f32
            });
        }
        w.finalize().expect("finalize");
    }
    (cursor.into_inner(), mono)
}

/// What a successful read must hold.
fn check_audio(path: &Path, file_len: usize) {
    if let Ok(a) = read_audio_mono(path) {
        assert!(!a.pcm.is_empty());
        assert!(
            SAMPLE_RATES_HZ.contains(&a.sample_rate_hz),
            "{}",
            a.sample_rate_hz
        );
        assert!(a.pcm.iter().all(|x| x.is_finite()));
        // Uncompressed: never more samples than bytes.
        if path.extension().is_some_and(|e| e == "wav") {
            assert!(
                a.pcm.len() <= file_len,
                "{} samples from {file_len} bytes",
                a.pcm.len()
            );
        }
    }
    if let Ok(pcm) = read_audio_24k(path) {
        assert!(pcm.iter().all(|x| x.is_finite()));
    }
}

proptest! {
    #![proptest_config(config())]

    /// A WAV of any format reads back as its samples, averaged to mono.
    #[test]
    fn wav_files_read_back_exactly(spec in wav_spec()) {
        let (bytes, mono) = wav_bytes(&spec);
        let path = write("rt.wav", &bytes);
        match read_audio_mono(&path) {
            Ok(a) => {
                prop_assert_eq!(a.sample_rate_hz, spec.rate);
                prop_assert_eq!(a.pcm.len(), mono.len());
                for (x, y) in a.pcm.iter().zip(&mono) {
                    prop_assert!((x - y).abs() < 1e-5, "{} vs {}", x, y);
                }
            }
            Err(e) => {
                // Only an empty file may fail.
                prop_assert_eq!(spec.frames, 0, "{}", e);
            }
        }
    }

    /// Damaged WAV headers and data, and arbitrary bytes: a value or an error.
    #[test]
    fn damaged_wav_files_never_panic(spec in wav_spec(), m in mutation(64)) {
        let bytes = m.apply(wav_bytes(&spec).0);
        let path = write("bad.wav", &bytes);
        check_audio(&path, bytes.len());
    }

    #[test]
    fn arbitrary_bytes_as_audio_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
        ext in prop_oneof![Just("wav"), Just("mp3"), Just("flac"), Just("ogg"), Just("m4a")],
        magic in prop_oneof![Just(&b""[..]), Just(&b"RIFF\x10\x00\x00\x00WAVEfmt "[..]), Just(&b"fLaC"[..]), Just(&b"ID3\x03\x00"[..]), Just(&b"OggS"[..]), Just(&b"\xff\xfb"[..])],
    ) {
        let mut all = magic.to_vec();
        all.extend_from_slice(&bytes);
        let path = write(&format!("x.{ext}"), &all);
        check_audio(&path, all.len());
    }
}

// ----- checkpoints -----

/// A safetensors file of a few small tensors of every float dtype.
fn safetensors_bytes(shapes: &[(usize, usize)]) -> Vec<u8> {
    let mut tensors = std::collections::HashMap::new();
    for (i, &(r, c)) in shapes.iter().enumerate() {
        let dtype = [DType::F32, DType::F16, DType::BF16][i % 3];
        let t = Tensor::arange(0f32, (r * c) as f32, &Device::Cpu)
            .and_then(|t| t.reshape((r, c)))
            .and_then(|t| t.to_dtype(dtype))
            .expect("tensor");
        tensors.insert(format!("t{i}.weight"), t);
    }
    let path = scratch("src.safetensors");
    candle_core::safetensors::save(&tensors, &path).expect("save");
    std::fs::read(&path).expect("read")
}

/// Opens `path` and reads every tensor it lists; whatever is read has its listed shape.
fn check_checkpoint(path: &Path) {
    let Ok(mut c) = Checkpoint::open(path) else {
        return;
    };
    let _ = c.param_count();
    let entries: Vec<(String, Vec<usize>)> = c
        .entries()
        .iter()
        .map(|(k, e)| (k.clone(), e.shape.clone()))
        .collect();
    for (name, shape) in entries {
        if let Ok(raw) = c.read(&name) {
            if let Ok(t) = raw.into_dense(DType::F32) {
                assert_eq!(t.dims(), &shape[..], "{name}");
            }
        }
    }
}

fn header_json() -> impl Strategy<Value = String> {
    let dim = prop_oneof![0u64..8, Just(1 << 31), Just(1 << 62), Just(u64::MAX)];
    let entry = (
        prop_oneof![
            Just("F32"),
            Just("F16"),
            Just("BF16"),
            Just("I8"),
            Just("U64"),
            Just("F64"),
            Just("??")
        ],
        prop::collection::vec(dim, 0..4),
        prop_oneof![0u64..64, Just(u64::MAX)],
        prop_oneof![0u64..64, Just(u64::MAX)],
    );
    prop::collection::vec(entry, 0..4).prop_map(|entries| {
        let map: serde_json::Map<String, Value> = entries
            .into_iter()
            .enumerate()
            .map(|(i, (dtype, shape, a, b))| {
                (
                    format!("t{i}"),
                    serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [a, b]}),
                )
            })
            .collect();
        Value::Object(map).to_string()
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn damaged_safetensors_never_panic(
        shapes in prop::collection::vec((1usize..6, 1usize..6), 1..4),
        m in mutation(200),
    ) {
        let bytes = m.apply(safetensors_bytes(&shapes));
        check_checkpoint(&write("bad.safetensors", &bytes));
    }

    /// Headers with any shapes, dtypes and offsets (huge ones included) over a little data.
    #[test]
    fn forged_safetensors_headers_never_panic(header in header_json(), data in 0usize..256) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0x3fu8, data));
        check_checkpoint(&write("forged.safetensors", &bytes));
    }

    /// GGUF (the `-candle-q8` checkpoints): a q8_0 and an f32 tensor and some metadata,
    /// damaged anywhere in the header.
    #[test]
    fn damaged_gguf_never_panic(rows in 1usize..4, m in mutation(400)) {
        let w = Tensor::arange(0f32, (rows * 64) as f32, &Device::Cpu)
            .and_then(|t| t.reshape((rows, 64)))
            .expect("w");
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).expect("q8");
        let f = QTensor::quantize(&w, GgmlDType::F32).expect("f32");
        let mut cursor = std::io::Cursor::new(Vec::new());
        gguf_file::write(
            &mut cursor,
            &[("general.name", &gguf_file::Value::String("x".into())), ("n", &gguf_file::Value::U32(3))],
            &[("a.weight", &q), ("b.weight", &f)],
        )
        .expect("gguf");
        let bytes = m.apply(cursor.into_inner());
        check_checkpoint(&write("bad.gguf", &bytes));
    }
}

// ----- tokenizer -----

proptest! {
    #![proptest_config(config())]

    /// The SentencePiece model (a protobuf Parley reads itself), damaged anywhere: a
    /// tokenizer that loads also encodes and decodes.
    #[test]
    fn damaged_tokenizers_never_panic(m in mutation(4096), text in "[ -~àéèçü]{0,30}") {
        let bytes = m.apply(std::fs::read(fixtures().join("stt-tiny/tokenizer.model")).expect("tokenizer"));
        let path = write("tok.model", &bytes);
        if let Ok(t) = TextTokenizer::load(&path) {
            if let Ok(ids) = t.encode(&text) {
                let _ = t.decode(&ids);
            }
        }
    }
}

// ----- .npy -----

proptest! {
    #![proptest_config(config())]

    #[test]
    fn damaged_npy_never_panic(
        rows in 1usize..4,
        cols in 0usize..20,
        m in mutation(128),
        card in 1u32..3000,
    ) {
        let path = scratch("codes.npy");
        let data: Vec<Vec<u32>> = (0..rows)
            .map(|r| (0..cols).map(|c| ((r * 31 + c * 7) % 2048) as u32).collect())
            .collect();
        npy::write_i64_2d(&path, &data).expect("write");
        let bytes = m.apply(std::fs::read(&path).expect("read"));
        std::fs::write(&path, &bytes).expect("write");
        if let Ok(got) = npy::read_u32_2d(&path, card) {
            let width = got.first().map_or(0, Vec::len);
            prop_assert!(got.iter().all(|r| r.len() == width));
            prop_assert!(got.iter().flatten().all(|&v| v < card));
            // At least one byte per value (the smallest integer dtype).
            prop_assert!(got.len() * width <= bytes.len());
        }
    }

    #[test]
    fn forged_npy_headers_never_panic(
        descr in prop_oneof![Just("<i8"), Just("<i4"), Just("<u2"), Just("|u1"), Just("<f4"), Just(">i8"), Just("<i16"), Just("zz")],
        fortran in any::<bool>(),
        shape in prop::collection::vec(prop_oneof![0u64..5, Just(1 << 40), Just(u64::MAX)], 0..4),
        data in 0usize..200,
    ) {
        let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
        let header = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': ({}{}), }}",
            if fortran { "True" } else { "False" },
            dims.join(", "),
            if dims.len() == 1 { "," } else { "" }
        );
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        let padded = format!("{header:<width$}\n", width = (header.len() + 11).div_ceil(64) * 64 - 11);
        bytes.extend_from_slice(&(padded.len() as u16).to_le_bytes());
        bytes.extend_from_slice(padded.as_bytes());
        bytes.extend(std::iter::repeat_n(1u8, data));
        let path = write("forged.npy", &bytes);
        let _ = npy::read_u32_2d(&path, 2048);
    }
}

// ----- configs -----

/// A hostile JSON value for a field.
fn hostile_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(serde_json::json!(0)),
        Just(serde_json::json!(1)),
        Just(serde_json::json!(-1)),
        Just(serde_json::json!(2)),
        Just(serde_json::json!(1u64 << 31)),
        Just(serde_json::json!(1u64 << 40)),
        Just(serde_json::json!(u64::MAX)),
        Just(serde_json::json!(-1e300)),
        Just(serde_json::json!(1e300)),
        Just(serde_json::json!(0.5)),
        Just(serde_json::json!(-0.0)),
        Just(serde_json::json!("x")),
        Just(Value::Null),
        Just(serde_json::json!([])),
        Just(serde_json::json!([1, 2, 3])),
        Just(serde_json::json!({})),
        Just(serde_json::json!(true)),
        (0i64..5000).prop_map(|v| serde_json::json!(v)),
    ]
}

/// Every path to a number (or a list of numbers) in `v`.
fn numeric_paths(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                at.push(k.clone());
                numeric_paths(x, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            if a.iter().all(Value::is_number) {
                out.push(at.clone());
            }
            for (i, x) in a.iter().enumerate() {
                at.push(i.to_string());
                numeric_paths(x, at, out);
                at.pop();
            }
        }
        Value::Number(_) | Value::Bool(_) => out.push(at.clone()),
        _ => {}
    }
}

fn set_path(v: &mut Value, path: &[String], new: Value) {
    let mut cur = v;
    for k in path {
        cur = match cur {
            Value::Object(m) => m.entry(k.clone()).or_insert(Value::Null),
            Value::Array(a) => match k.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                Some(x) => x,
                None => return,
            },
            _ => return,
        };
    }
    *cur = new;
}

/// A change to one field: a hostile value, or the field's own number scaled or shifted
/// (so that many configs still describe a model that loads and runs).
#[derive(Debug, Clone)]
enum Change {
    Hostile(Value),
    Scale(f64),
    Add(i64),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        1 => hostile_value().prop_map(Change::Hostile),
        1 => prop_oneof![Just(0.5), Just(2.0), Just(1.5), Just(3.0)].prop_map(Change::Scale),
        1 => prop_oneof![Just(-1i64), Just(1), Just(2), Just(-2)].prop_map(Change::Add),
    ]
}

fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, k| match cur {
        Value::Object(m) => m.get(k),
        Value::Array(a) => a.get(k.parse::<usize>().ok()?),
        _ => None,
    })
}

/// `base` with some of its numeric fields changed.
fn mutated_json(base: &Value, picks: &[(f64, Change)]) -> Value {
    let mut paths = vec![];
    numeric_paths(base, &mut vec![], &mut paths);
    let mut v = base.clone();
    for (at, change) in picks {
        let p = &paths[((at * paths.len() as f64) as usize).min(paths.len() - 1)];
        let old = get_path(&v, p).and_then(Value::as_f64);
        let new = match (change, old) {
            (Change::Hostile(x), _) => x.clone(),
            (Change::Scale(f), Some(o)) if (o * f).fract() == 0.0 => {
                serde_json::json!((o * f) as i64)
            }
            (Change::Scale(f), Some(o)) => serde_json::json!(o * f),
            (Change::Add(d), Some(o)) => serde_json::json!((o as i64).saturating_add(*d)),
            // A boolean: flipped.
            (_, None) => match get_path(&v, p) {
                Some(Value::Bool(b)) => Value::Bool(!b),
                _ => continue,
            },
        };
        set_path(&mut v, p, new);
    }
    v
}

/// A copy of a fixture model directory to rewrite configs in (made once per process).
fn model_copy(fixture: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("parley-hostile-{}-{fixture}", std::process::id()));
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir).expect("dir");
        for e in std::fs::read_dir(fixtures().join(fixture)).expect("fixture") {
            let e = e.expect("entry");
            std::fs::copy(e.path(), dir.join(e.file_name())).expect("copy");
        }
    }
    dir
}

fn write_json(path: &Path, v: &Value) {
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(v.to_string().as_bytes()).expect("write");
}

proptest! {
    #![proptest_config(config())]

    /// The STT's config.json with hostile sizes, delays and STT timings: loading the model
    /// (Mimi, LM, tokenizer, stt_config) and a few steps either work or name a field.
    #[test]
    fn hostile_model_configs_load_or_fail_cleanly(
        picks in prop::collection::vec((0.0..1.0f64, change()), 1..4),
    ) {
        let dir = model_copy("stt-tiny");
        let base: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("stt-tiny/config.json")).expect("config"),
        )
        .expect("json");
        write_json(&dir.join("config.json"), &mutated_json(&base, &picks));
        let Ok(md) = ModelDir::open(&dir) else { return Ok(()) };
        let _ = md.stt_config();
        let _ = md.load_tokenizer();
        let Ok(mut mimi) = md.load_mimi() else { return Ok(()) };
        let Ok(lm) = md.load_lm_as(WeightPrecision::F32) else { return Ok(()) };
        let mut gen = LmGen::new(lm, GenConfig::default());
        let frame = vec![0.01f32; mimi.frame_size()];
        for _ in 0..3 {
            let Ok(codes) = mimi.encode_step(&frame) else { break };
            let _ = gen.step(&codes);
        }
    }

    /// Mimi's own config with hostile values: a codec that loads also encodes and decodes.
    #[test]
    fn hostile_mimi_configs_load_or_fail_cleanly(
        picks in prop::collection::vec((0.0..1.0f64, change()), 1..4),
    ) {
        let dir = model_copy("mimi-tiny");
        let base: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("mimi-tiny/mimi_config.json")).expect("config"),
        )
        .expect("json");
        let path = dir.join("mimi_config.json");
        write_json(&path, &mutated_json(&base, &picks));
        let Ok(cfg) = MimiConfig::from_json_file(&path) else { return Ok(()) };
        let Ok(mut mimi) = Mimi::load(&dir.join("mimi.safetensors"), cfg, 8) else { return Ok(()) };
        let frame = vec![0.01f32; mimi.frame_size()];
        if let Ok(codes) = mimi.encode_step(&frame) {
            let _ = mimi.decode_step(&codes);
        }
    }
}
