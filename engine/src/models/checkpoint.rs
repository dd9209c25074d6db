//! Checkpoint files read one tensor at a time: safetensors (f32, f16, bf16, as Kyutai
//! publishes for PyTorch) and GGUF (the `-candle-q8` repositories: q8_0 matrices, f32
//! for the rest).
//!
//! Only the header is read when a file is opened; each tensor's bytes are read when the
//! model asks for it and converted to its run-time format straight away, so loading never
//! holds the whole file plus its copy: peak memory is the loaded model plus one tensor in
//! flight. The tensors are read with positioned reads rather than a memory map: the
//! workspace denies `unsafe` (which `memmap2` needs), and a map's pages would stay resident
//! (and counted) until it is dropped, which bounds nothing; reading into the tensor's own
//! buffer costs the same single copy a mapped checkpoint needs to convert its dtype.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// A safetensors header larger than this is refused before it is read (the published
/// headers are 10-40 KB; this bounds what a hostile file can make us allocate).
pub const MAX_HEADER_BYTES: u64 = 64 << 20;

/// How a tensor is stored in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredDType {
    Dense(DType),
    Ggml(GgmlDType),
    /// A dtype Parley does not read (int8, bool, ...), as the file names it.
    Other(String),
}

impl StoredDType {
    pub fn name(&self) -> String {
        match self {
            Self::Dense(d) => format!("{d:?}").to_uppercase(),
            Self::Ggml(g) => format!("{g:?}"),
            Self::Other(s) => s.clone(),
        }
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dtype: StoredDType,
    pub shape: Vec<usize>,
    /// Byte range in the file (safetensors; GGUF tensors are found through their header).
    range: (u64, u64),
}

impl Entry {
    /// Elements in the tensor (saturating: a hostile header cannot overflow it).
    pub fn elem_count(&self) -> usize {
        self.shape.iter().fold(1usize, |n, &d| n.saturating_mul(d))
    }
}

/// A tensor as read: dense (in its stored dtype) or GGML-quantized.
#[derive(Debug)]
pub enum Raw {
    Dense(Tensor),
    Quantized(QTensor),
}

impl Raw {
    /// As a dense tensor of `dtype` (quantized ones dequantized).
    pub fn into_dense(self, dtype: DType) -> Result<Tensor> {
        Ok(match self {
            Raw::Dense(t) => t.to_dtype(dtype)?,
            Raw::Quantized(q) => q.dequantize(&Device::Cpu)?.to_dtype(dtype)?,
        })
    }
}

enum Format {
    Safetensors,
    Gguf(gguf_file::Content),
}

/// An open checkpoint file.
pub struct Checkpoint {
    path: PathBuf,
    file: File,
    format: Format,
    entries: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Checkpoint({}, {} tensors)",
            self.path.display(),
            self.entries.len()
        )
    }
}

impl Checkpoint {
    /// Opens `path` and reads its header: GGUF if the file starts with `GGUF`,
    /// safetensors otherwise. A truncated or inconsistent header is an error naming the
    /// file and what is wrong.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut magic = [0u8; 4];
        let is_gguf = len >= 4 && {
            file.read_exact(&mut magic)
                .map_err(|e| Error::io(path, e))?;
            &magic == b"GGUF"
        };
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::Safetensors {
            path: path.to_path_buf(),
            reason,
        };
        if is_gguf {
            let content = gguf_file::Content::read(&mut file)
                .map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
            let mut entries = BTreeMap::new();
            for (name, info) in &content.tensor_infos {
                let shape = info.shape.dims().to_vec();
                let n = shape.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64));
                let dtype = info.ggml_dtype;
                let bytes =
                    (n / dtype.block_size() as u64).saturating_mul(dtype.type_size() as u64);
                let start = content.tensor_data_offset.saturating_add(info.offset);
                if start.checked_add(bytes).is_none_or(|end| end > len) {
                    return Err(bad(format!(
                        "tensor `{name}` lies past the end of the file (truncated download?)"
                    )));
                }
                let dtype = match dtype {
                    GgmlDType::F32 => StoredDType::Dense(DType::F32),
                    GgmlDType::F16 => StoredDType::Dense(DType::F16),
                    GgmlDType::BF16 => StoredDType::Dense(DType::BF16),
                    q => StoredDType::Ggml(q),
                };
                entries.insert(
                    name.clone(),
                    Entry {
                        dtype,
                        shape,
                        range: (start, start + bytes),
                    },
                );
            }
            return Ok(Self {
                path: path.to_path_buf(),
                file,
                format: Format::Gguf(content),
                entries,
            });
        }
        let entries = read_safetensors_header(&mut file, len).map_err(bad)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            format: Format::Safetensors,
            entries,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }

    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    /// Weights in the file (elements, all tensors).
    pub fn param_count(&self) -> u64 {
        self.entries
            .values()
            .fold(0u64, |n, e| n.saturating_add(e.elem_count() as u64))
    }

    /// Reads tensor `name` from disk.
    pub fn read(&mut self, name: &str) -> Result<Raw> {
        let entry = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        let shape = entry.shape.clone();
        let (start, end) = entry.range;
        match (&entry.dtype, &self.format) {
            (StoredDType::Ggml(_), Format::Gguf(content)) => {
                let q = content
                    .tensor(&mut self.file, name, &Device::Cpu)
                    .map_err(|e| Error::Safetensors {
                        path: self.path.clone(),
                        reason: format!("tensor `{name}`: {e}"),
                    })?;
                self.check_finite(name, &shape, quantized_non_finite(&q)?)?;
                Ok(Raw::Quantized(q))
            }
            (StoredDType::Dense(dtype), _) => {
                let dtype = *dtype;
                self.file
                    .seek(SeekFrom::Start(start))
                    .map_err(|e| Error::io(&self.path, e))?;
                let n = (end - start) as usize / dtype.size_in_bytes();
                let t = match dtype {
                    DType::F32 => {
                        let v = self.read_vec::<f32>(n, name)?;
                        let bad =
                            first_non_finite(bytemuck::cast_slice::<f32, u32>(&v), 0x7f80_0000);
                        self.check_finite(name, &shape, bad)?;
                        Tensor::from_vec(v, shape, &Device::Cpu)?
                    }
                    DType::F16 => {
                        let v = self.read_vec::<half::f16>(n, name)?;
                        let bad = first_non_finite(bytemuck::cast_slice::<_, u16>(&v), 0x7c00);
                        self.check_finite(name, &shape, bad)?;
                        Tensor::from_vec(v, shape, &Device::Cpu)?
                    }
                    _ => {
                        let v = self.read_vec::<half::bf16>(n, name)?;
                        let bad = first_non_finite(bytemuck::cast_slice::<_, u16>(&v), 0x7f80);
                        self.check_finite(name, &shape, bad)?;
                        Tensor::from_vec(v, shape, &Device::Cpu)?
                    }
                };
                Ok(Raw::Dense(t))
            }
            (other, _) => Err(Error::BadDType {
                path: self.path.clone(),
                name: name.to_string(),
                found: other.name(),
            }),
        }
    }

    /// An error naming the tensor when `bad` holds the index of a non-finite value.
    fn check_finite(&self, name: &str, shape: &[usize], bad: Option<usize>) -> Result<()> {
        match bad {
            None => Ok(()),
            Some(index) => Err(Error::NonFinite {
                path: self.path.clone(),
                name: name.to_string(),
                shape: shape.to_vec(),
                index,
            }),
        }
    }

    fn read_vec<T: bytemuck::Pod + Default + Clone>(
        &mut self,
        n: usize,
        name: &str,
    ) -> Result<Vec<T>> {
        let mut v = vec![T::default(); n];
        self.file
            .read_exact(bytemuck::cast_slice_mut(&mut v))
            .map_err(|e| Error::Safetensors {
                path: self.path.clone(),
                reason: format!("tensor `{name}` could not be read: {e}"),
            })?;
        Ok(v)
    }
}

/// The index of the first value whose exponent bits (`exponent_mask`) are all set: NaN or
/// infinity in IEEE formats (f32 `0x7f80_0000`, f16 `0x7c00`, bf16 `0x7f80`). Checked a
/// block at a time with a branch-free OR, which the compiler vectorises, so a checkpoint
/// costs a fraction of the time its bytes take to read.
fn first_non_finite<T>(bits: &[T], exponent_mask: T) -> Option<usize>
where
    T: Copy + PartialEq + std::ops::BitAnd<Output = T>,
{
    const BLOCK: usize = 4096;
    bits.chunks(BLOCK).enumerate().find_map(|(b, chunk)| {
        let any = chunk.iter().fold(false, |any, &x| {
            any | ((x & exponent_mask) == exponent_mask)
        });
        any.then(|| {
            b * BLOCK
                + chunk
                    .iter()
                    .position(|&x| (x & exponent_mask) == exponent_mask)
                    .unwrap_or(0)
        })
    })
}

/// The first non-finite weight of a GGML-quantized tensor, as an element index. The block
/// formats that start with their f16 scale (q8_0, q4_0, q4_1, q5_0, q5_1: what Kyutai's
/// and llama.cpp's files use for these models) are checked on the scales in place (a
/// block's values are integers times its scale, so they are finite when it is; q4_1's and
/// q5_1's second f16, the minimum, is checked too); other formats are dequantized.
fn quantized_non_finite(q: &QTensor) -> Result<Option<usize>> {
    let dtype = q.dtype();
    let halves: usize = match dtype {
        GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q5_0 => 1,
        GgmlDType::Q4_1 | GgmlDType::Q5_1 => 2,
        _ => {
            let t = q
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            return Ok(first_non_finite(
                bytemuck::cast_slice::<f32, u32>(&t),
                0x7f80_0000,
            ));
        }
    };
    let data = q.data()?;
    let block_bytes = dtype.type_size();
    Ok(data
        .chunks_exact(block_bytes)
        .enumerate()
        .find_map(|(b, block)| {
            (0..halves)
                .any(|h| u16::from_le_bytes([block[2 * h], block[2 * h + 1]]) & 0x7c00 == 0x7c00)
                .then(|| b * dtype.block_size())
        }))
}

/// Parses and checks a safetensors header: its length against the file, every tensor's
/// dtype, shape and byte range against the data that follows.
fn read_safetensors_header(
    file: &mut File,
    len: u64,
) -> std::result::Result<BTreeMap<String, Entry>, String> {
    if len < 8 {
        return Err(format!(
            "{len} bytes is too short for a safetensors file (an 8-byte header length first)"
        ));
    }
    let mut n = [0u8; 8];
    file.read_exact(&mut n).map_err(|e| e.to_string())?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES || n > len - 8 {
        return Err(format!(
            "the header claims {n} bytes, the file has {} after its length (truncated, or not a safetensors file)",
            len - 8
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let data_start = 8 + n;
    let data_len = len - data_start;
    let json: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| format!("its header is not the expected JSON object: {e}"))?;
    let mut entries = BTreeMap::new();
    for (name, v) in json {
        if name == "__metadata__" {
            continue;
        }
        #[derive(serde::Deserialize)]
        struct Info {
            dtype: String,
            shape: Vec<usize>,
            data_offsets: (u64, u64),
        }
        let info: Info = serde_json::from_value(v)
            .map_err(|e| format!("tensor `{name}` has a malformed entry: {e}"))?;
        let (dtype, size) = match info.dtype.as_str() {
            "F32" => (StoredDType::Dense(DType::F32), 4u64),
            "F16" => (StoredDType::Dense(DType::F16), 2),
            "BF16" => (StoredDType::Dense(DType::BF16), 2),
            other => (StoredDType::Other(other.to_string()), 0),
        };
        let (a, b) = info.data_offsets;
        if b < a {
            return Err(format!(
                "tensor `{name}` has data_offsets [{a}, {b}]: its end is before its start"
            ));
        }
        if b > data_len {
            return Err(format!(
                "tensor `{name}` has bytes {a}..{b} but the data is {data_len} bytes (truncated file?)"
            ));
        }
        if size > 0 {
            let want = info
                .shape
                .iter()
                .try_fold(size, |acc, &d| acc.checked_mul(d as u64));
            if want != Some(b - a) {
                return Err(format!(
                    "tensor `{name}` of shape {:?} in {} needs {} bytes, its entry spans {}",
                    info.shape,
                    info.dtype,
                    want.map_or("too many".to_string(), |w| w.to_string()),
                    b - a
                ));
            }
        }
        entries.insert(
            name,
            Entry {
                dtype,
                shape: info.shape,
                range: (data_start + a, data_start + b),
            },
        );
    }
    // Tensors never share bytes (the format lays them end to end).
    let mut spans: Vec<(&String, (u64, u64))> = entries
        .iter()
        .map(|(n, e)| (n, e.range))
        .filter(|(_, (a, b))| a < b)
        .collect();
    spans.sort_by_key(|(_, r)| *r);
    if let Some(w) = spans.windows(2).find(|w| w[1].1 .0 < w[0].1 .1) {
        return Err(format!(
            "tensors `{}` and `{}` overlap (bytes {}..{} and {}..{} of the data)",
            w[0].0,
            w[1].0,
            w[0].1 .0 - data_start,
            w[0].1 .1 - data_start,
            w[1].1 .0 - data_start,
            w[1].1 .1 - data_start
        ));
    }
    Ok(entries)
}

/// Writes `tensors` (name, tensor) as a safetensors file with the layout the reference's
/// writer gives (no metadata, sorted by name, header padded to 8 bytes), streaming one
/// tensor at a time, to `path` through a temporary file renamed into place.
pub fn write_safetensors<I>(
    path: &Path,
    layout: &[(String, DType, Vec<usize>)],
    mut data: I,
) -> Result<u64>
where
    I: FnMut(&str, DType, &[usize]) -> Result<Vec<u8>>,
{
    use std::io::Write;
    let sorted = file_order(layout);
    let header = safetensors_header(&sorted);
    let tmp = path.with_extension("partial");
    let mut f = std::io::BufWriter::with_capacity(
        8 << 20,
        File::create(&tmp).map_err(|e| Error::io(&tmp, e))?,
    );
    let mut written = 0u64;
    let mut put = |f: &mut std::io::BufWriter<File>, b: &[u8]| -> Result<()> {
        written += b.len() as u64;
        f.write_all(b).map_err(|e| Error::io(&tmp, e))
    };
    put(&mut f, &(header.len() as u64).to_le_bytes())?;
    put(&mut f, &header)?;
    for (name, dtype, shape) in sorted {
        let bytes = data(name, *dtype, shape)?;
        let want = shape.iter().product::<usize>() * dtype.size_in_bytes();
        if bytes.len() != want {
            return Err(Error::InvalidInput(format!(
                "tensor `{name}`: {} bytes given for {want}",
                bytes.len()
            )));
        }
        put(&mut f, &bytes)?;
    }
    f.into_inner()
        .map_err(|e| Error::io(&tmp, e.into_error()))?
        .sync_all()
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(written)
}

/// Writes a safetensors file of `layout` with random values (seeded): uniform in
/// ±1/sqrt(fan-in) for matrices, in [0.5, 1.5] for vectors (norm gains), so a model made
/// from it computes sane numbers. For tests and benchmarks of published layouts at full
/// size: values are generated one tensor at a time, so memory stays at one tensor.
pub fn write_random_safetensors(
    path: &Path,
    layout: &[(String, DType, Vec<usize>)],
    seed: u64,
) -> Result<u64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    write_safetensors(path, layout, |_, dtype, shape| {
        let n: usize = shape.iter().product();
        let matrix = shape.iter().filter(|&&d| d > 1).count() >= 2;
        let (lo, width) = if matrix {
            let fan_in = shape.last().copied().unwrap_or(1).max(1) as f32;
            let b = 1.0 / fan_in.sqrt();
            (-b, 2.0 * b)
        } else {
            (0.5, 1.0)
        };
        let mut next = || {
            // xorshift64*: fast enough for gigabytes, and not a security matter.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
            lo + width * ((r >> 40) as f32 / (1u64 << 24) as f32)
        };
        Ok(match dtype {
            DType::F32 => (0..n).flat_map(|_| next().to_le_bytes()).collect(),
            DType::F16 => (0..n)
                .flat_map(|_| half::f16::from_f32(next()).to_le_bytes())
                .collect(),
            _ => (0..n)
                .flat_map(|_| half::bf16::from_f32(next()).to_le_bytes())
                .collect(),
        })
    })
}

/// A published checkpoint's layout as `tests/reference/make_published_layouts.py` records
/// it from the reference: every tensor's name, dtype and shape, the config the reference
/// builds from (config.json, or the loader's defaults where the repository has none), and
/// the weights file's name. For tests and benchmarks at full size.
#[derive(Debug, Clone)]
pub struct PublishedLayout {
    pub tensors: Vec<(String, DType, Vec<usize>)>,
    pub config: serde_json::Value,
    pub weights_file: String,
    /// The published tensor count and file size.
    pub published_tensors: u64,
    pub published_bytes: u64,
}

impl PublishedLayout {
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |r: String| Error::config(path, r);
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let m: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let tensors = m["tensors"]
            .as_array()
            .ok_or_else(|| bad("no `tensors` list".into()))?
            .iter()
            .map(|t| {
                let name = t[0].as_str().ok_or_else(|| bad(format!("bad entry {t}")))?;
                let dtype = match t[1].as_str() {
                    Some("F32") => DType::F32,
                    Some("BF16") => DType::BF16,
                    Some("F16") => DType::F16,
                    _ => return Err(bad(format!("`{name}`: dtype {} (F32, BF16, F16)", t[1]))),
                };
                let shape = t[2]
                    .as_array()
                    .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
                    .ok_or_else(|| bad(format!("`{name}`: bad shape {}", t[2])))?;
                Ok((name.to_string(), dtype, shape))
            })
            .collect::<Result<Vec<_>>>()?;
        let config = if m["config"].is_null() {
            m["lm_kwargs"].clone()
        } else {
            m["config"].clone()
        };
        Ok(Self {
            tensors,
            config,
            weights_file: m["weights_file"]
                .as_str()
                .ok_or_else(|| bad("no `weights_file`".into()))?
                .to_string(),
            published_tensors: m["published"]["tensors"].as_u64().unwrap_or(0),
            published_bytes: m["published"]["bytes"].as_u64().unwrap_or(0),
        })
    }

    /// Writes a model directory in this layout: config.json (with `num_layers`, and
    /// `depformer_num_layers` where present, set to `layers` when given) and random
    /// weights for the layers kept. Returns the weights file's size.
    pub fn write_random_dir(&self, dir: &Path, layers: Option<usize>, seed: u64) -> Result<u64> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut config = self.config.clone();
        if let Some(n) = layers {
            config["num_layers"] = n.into();
            if config.get("depformer_num_layers").is_some() {
                config["depformer_num_layers"] = n.into();
            }
        }
        let path = dir.join("config.json");
        std::fs::write(&path, config.to_string()).map_err(|e| Error::io(&path, e))?;
        let kept: Vec<(String, DType, Vec<usize>)> = self
            .tensors
            .iter()
            .filter(|(n, _, _)| layers.is_none_or(|l| layer_of(n).is_none_or(|i| i < l)))
            .cloned()
            .collect();
        write_random_safetensors(&dir.join(&self.weights_file), &kept, seed)
    }
}

/// The layer index of a temporal or depformer layer's tensor, if `name` is one.
fn layer_of(name: &str) -> Option<usize> {
    let mut parts = name.split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("transformer" | "depformer"), Some("layers"), Some(i)) => i.parse().ok(),
        _ => None,
    }
}

/// The order in which the safetensors writer lays tensors out: wider dtypes first
/// (F32, then BF16, then F16), then by name.
fn file_order(layout: &[(String, DType, Vec<usize>)]) -> Vec<&(String, DType, Vec<usize>)> {
    let rank = |d: DType| match d {
        DType::F64 => 0,
        DType::F32 => 1,
        DType::BF16 => 2,
        DType::F16 => 3,
        _ => 4,
    };
    let mut sorted: Vec<&(String, DType, Vec<usize>)> = layout.iter().collect();
    sorted.sort_by(|a, b| rank(a.1).cmp(&rank(b.1)).then(a.0.cmp(&b.0)));
    sorted
}

/// The header bytes (JSON, padded with spaces to a multiple of 8) of a safetensors file
/// holding `layout` in that order.
fn safetensors_header(layout: &[&(String, DType, Vec<usize>)]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    let mut off = 0usize;
    for (name, dtype, shape) in layout {
        let n = shape.iter().product::<usize>() * dtype.size_in_bytes();
        map.insert(
            name.clone(),
            serde_json::json!({
                "dtype": format!("{dtype:?}").to_uppercase(),
                "shape": shape,
                "data_offsets": [off, off + n],
            }),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&map).unwrap_or_default();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    h
}

/// Bytes of a safetensors file holding `layout` (header included), as the reference's
/// writer lays it out.
pub fn safetensors_file_size(layout: &[(String, DType, Vec<usize>)]) -> u64 {
    let sorted = file_order(layout);
    let data: usize = sorted
        .iter()
        .map(|(_, d, s)| s.iter().product::<usize>() * d.size_in_bytes())
        .sum();
    8 + safetensors_header(&sorted).len() as u64 + data as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("parley-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("dir");
        d.join(name)
    }

    #[test]
    fn written_files_read_back_and_match_candle() {
        let a = Tensor::arange(0f32, 12., &Device::Cpu)
            .and_then(|t| t.reshape((3, 4)))
            .expect("a");
        let b = a.to_dtype(DType::BF16).expect("b");
        let path = tmp("rt.safetensors");
        let layout = vec![
            ("b".to_string(), DType::BF16, vec![3, 4]),
            ("a".to_string(), DType::F32, vec![3, 4]),
        ];
        let size = write_safetensors(&path, &layout, |name, _, _| {
            let t = if name == "a" { &a } else { &b };
            let bytes = match t.dtype() {
                DType::F32 => bytemuck::cast_slice(&t.flatten_all()?.to_vec1::<f32>()?).to_vec(),
                _ => bytemuck::cast_slice(&t.flatten_all()?.to_vec1::<half::bf16>()?).to_vec(),
            };
            Ok(bytes)
        })
        .expect("write");
        assert_eq!(size, std::fs::metadata(&path).expect("meta").len());
        assert_eq!(size, safetensors_file_size(&layout));
        // candle (the safetensors crate) reads what we wrote, and writes the same bytes.
        let theirs = candle_core::safetensors::load(&path, &Device::Cpu).expect("candle");
        assert_eq!(theirs["b"].dtype(), DType::BF16);
        let path2 = tmp("rt2.safetensors");
        candle_core::safetensors::save(
            &HashMap::from([("a".to_string(), a.clone()), ("b".to_string(), b.clone())]),
            &path2,
        )
        .expect("save");
        assert_eq!(std::fs::read(&path2).expect("r2").len() as u64, size);
        let mut c = Checkpoint::open(&path).expect("open");
        assert_eq!(c.param_count(), 24);
        let Raw::Dense(t) = c.read("b").expect("read") else {
            panic!("dense expected")
        };
        assert_eq!(t.dtype(), DType::BF16);
        let v: Vec<f32> = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("v");
        assert_eq!(v, (0..12).map(|i| i as f32).collect::<Vec<_>>());
    }

    #[test]
    fn inconsistent_headers_are_named_errors() {
        let path = tmp("bad.safetensors");
        let write = |header: &str, data: usize| {
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend(std::iter::repeat_n(0u8, data));
            std::fs::write(&path, bytes).expect("write");
        };
        write(
            r#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            8,
        );
        let err = Checkpoint::open(&path).expect_err("short").to_string();
        assert!(err.contains("`x`") && err.contains("truncated"), "{err}");
        write(
            r#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#,
            16,
        );
        let err = Checkpoint::open(&path).expect_err("size").to_string();
        assert!(err.contains("needs 16 bytes"), "{err}");
        write(
            r#"{"x":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}}"#,
            16,
        );
        let err = Checkpoint::open(&path).expect_err("overflow").to_string();
        assert!(err.contains("`x`"), "{err}");
        std::fs::write(&path, u64::MAX.to_le_bytes()).expect("write");
        let err = Checkpoint::open(&path).expect_err("huge").to_string();
        assert!(err.contains("header claims"), "{err}");
        // A dtype Parley does not read is not size-checked; its claimed shape must still
        // not overflow anything.
        write(
            r#"{"x":{"dtype":"I8","shape":[4611686018427387904,8],"data_offsets":[0,4]}}"#,
            4,
        );
        assert_eq!(
            Checkpoint::open(&path).expect("opens").param_count(),
            u64::MAX
        );
        write(
            r#"{"x":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}}"#,
            4,
        );
        let mut c = Checkpoint::open(&path).expect("opens");
        let err = c.read("x").expect_err("int8").to_string();
        assert!(err.contains("I8") && err.contains('x'), "{err}");
    }

    /// NaN or infinity anywhere in a weight is an error naming the tensor and where, in
    /// every stored format (f32, f16, bf16; a q8_0 block whose scale overflowed f16).
    #[test]
    fn non_finite_weights_are_named() {
        let n = 5120;
        let mut v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        v[4500] = f32::NAN;
        let nan = Tensor::from_vec(v.clone(), (40, 128), &Device::Cpu).expect("t");
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let path = tmp(&format!("nan-{dtype:?}.safetensors"));
            let t = nan.to_dtype(dtype).expect("dtype");
            candle_core::safetensors::save(&HashMap::from([("w.nan".to_string(), t)]), &path)
                .expect("save");
            let mut c = Checkpoint::open(&path).expect("open");
            let err = c.read("w.nan").expect_err("NaN").to_string();
            assert!(
                err.contains("`w.nan`")
                    && err.contains("element 4500")
                    && err.contains("[40, 128]"),
                "{dtype:?}: {err}"
            );
        }
        v[4500] = f32::INFINITY;
        assert_eq!(
            first_non_finite(bytemuck::cast_slice::<f32, u32>(&v), 0x7f80_0000),
            Some(4500)
        );
        v[4500] = -f32::MAX;
        assert_eq!(
            first_non_finite(bytemuck::cast_slice::<f32, u32>(&v), 0x7f80_0000),
            None
        );

        // q8_0: a block whose largest value is beyond f16's range / 127 gets an infinite scale.
        v[4500] = 1e9;
        let big = Tensor::from_vec(v, (40, 128), &Device::Cpu).expect("t");
        let q = QTensor::quantize(&big, GgmlDType::Q8_0).expect("quantize");
        let path = tmp("inf.gguf");
        let mut f = File::create(&path).expect("create");
        gguf_file::write(&mut f, &[], &[("w.inf", &q)]).expect("gguf");
        drop(f);
        let mut c = Checkpoint::open(&path).expect("open");
        let err = c.read("w.inf").expect_err("inf").to_string();
        assert!(
            err.contains("`w.inf`") && err.contains("element 4480"),
            "{err}"
        );
        let fine = QTensor::quantize(&nan.ones_like().expect("ones"), GgmlDType::Q8_0).expect("q");
        assert_eq!(quantized_non_finite(&fine).expect("check"), None);
    }
}
