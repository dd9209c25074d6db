//! Strict loading of checkpoints as published: safetensors (f32, f16 or bf16 on disk) and
//! GGUF (Kyutai's `-candle-q8` files), read one tensor at a time
//! ([`super::checkpoint::Checkpoint`]) and converted to the run-time format as read.
//!
//! Every tensor is looked up by the reference implementation's parameter name, checked
//! against the shape the config implies, and marked as used; [`Weights::finish`] then
//! fails on anything left over, as PyTorch's `load_state_dict(strict=True)` does. A
//! config that does not match its checkpoint is therefore always a named error.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};

use super::checkpoint::{Checkpoint, Raw, StoredDType};
use crate::compute::cpu::{Matrix, WeightPrecision};

use crate::{Error, Result};

/// Where the tensors come from.
enum Store {
    /// Tensors in memory (tests, random weights kept for saving).
    Memory(HashMap<String, Tensor>),
    /// A checkpoint file, read tensor by tensor.
    File(Checkpoint),
}

impl Store {
    fn contains(&self, name: &str) -> bool {
        match self {
            Store::Memory(m) => m.contains_key(name),
            Store::File(c) => c.entry(name).is_some(),
        }
    }

    fn names(&self) -> Vec<&String> {
        match self {
            Store::Memory(m) => m.keys().collect(),
            Store::File(c) => c.entries().keys().collect(),
        }
    }

    /// The stored dtype and shape of `name`, without reading it.
    fn describe(&self, name: &str) -> Option<(StoredDType, Vec<usize>)> {
        match self {
            Store::Memory(m) => m
                .get(name)
                .map(|t| (StoredDType::Dense(t.dtype()), t.dims().to_vec())),
            Store::File(c) => c.entry(name).map(|e| (e.dtype.clone(), e.shape.clone())),
        }
    }

    fn read(&mut self, name: &str) -> Result<Raw> {
        match self {
            Store::Memory(m) => m
                .get(name)
                .cloned()
                .map(Raw::Dense)
                .ok_or_else(|| Error::InvalidInput(format!("tensor `{name}` is not in memory"))),
            Store::File(c) => c.read(name),
        }
    }
}

struct Inner {
    path: PathBuf,
    store: Store,
    used: HashSet<String>,
    /// Set for [`Weights::random`]: missing tensors are drawn instead of failing.
    random: Option<rand::rngs::StdRng>,
    /// Round drawn tensors to bf16 (as the published bf16 checkpoints are).
    random_bf16: bool,
    /// Keep drawn tensors (so that [`Weights::save`] can write them).
    random_keep: bool,
    /// How [`Weights::matrix`] holds large matrices.
    precision: WeightPrecision,
}

/// A loaded checkpoint, with a name prefix (cheap to clone, like candle-nn's VarBuilder).
#[derive(Clone)]
pub struct Weights {
    inner: Rc<RefCell<Inner>>,
    prefix: String,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Weights({}, prefix {:?})",
            self.path().display(),
            self.prefix
        )
    }
}

impl Weights {
    /// Opens a safetensors or GGUF checkpoint and reads its header; tensors are read when
    /// asked for. A truncated or corrupt file is an error naming it.
    pub fn load(path: &Path) -> Result<Self> {
        Ok(Self::with_store(path, Store::File(Checkpoint::open(path)?)))
    }

    /// Wraps tensors already in memory (`path` is only used in messages).
    pub fn from_tensors(path: &Path, tensors: HashMap<String, Tensor>) -> Self {
        Self::with_store(path, Store::Memory(tensors))
    }

    fn with_store(path: &Path, store: Store) -> Self {
        Self {
            inner: Rc::new(RefCell::new(Inner {
                path: path.to_path_buf(),
                store,
                used: HashSet::new(),
                random: None,
                random_bf16: false,
                random_keep: true,
                precision: WeightPrecision::F32,
            })),
            prefix: String::new(),
        }
    }

    /// A checkpoint that makes up every tensor asked for, uniform in ±1/sqrt(fan_in)
    /// (1-D tensors: in [0.5, 1.5], so norms and codebook usages stay sane). For benchmarks
    /// of full-size architectures: speed does not depend on the values, but it does on
    /// them being real numbers rather than untouched zero pages.
    pub fn random(seed: u64) -> Self {
        use rand::SeedableRng;
        let w = Self::from_tensors(Path::new("<random weights>"), HashMap::new());
        w.inner.borrow_mut().random = Some(rand::rngs::StdRng::seed_from_u64(seed));
        w
    }

    /// Like [`Self::random`], with every value representable in bf16.
    pub fn random_bf16(seed: u64) -> Self {
        let w = Self::random(seed);
        w.inner.borrow_mut().random_bf16 = true;
        w
    }

    /// Sets how [`Self::matrix`] holds large matrices, so that a model is converted
    /// tensor by tensor as it loads (a 7B model would not fit in memory as f32 first).
    /// Random weights are then not kept for [`Self::save`].
    pub fn with_precision(self, precision: WeightPrecision) -> Self {
        {
            let mut inner = self.inner.borrow_mut();
            inner.precision = precision;
            if precision != WeightPrecision::F32 {
                inner.random_keep = false;
            }
        }
        self
    }

    pub fn precision(&self) -> WeightPrecision {
        self.inner.borrow().precision
    }

    /// The tensor `name` of `shape` as a weight matrix in this checkpoint's precision,
    /// converted straight from its stored format (a bf16 matrix kept in bf16 is never
    /// widened; a q8_0 one kept in q8_0 is never dequantized).
    pub fn matrix(&self, name: &str, shape: &[usize]) -> Result<Matrix> {
        self.matrix_any(&[name], shape)
    }

    /// Like [`Self::matrix`], for the first of `names` present.
    pub fn matrix_any(&self, names: &[&str], shape: &[usize]) -> Result<Matrix> {
        let precision = self.precision();
        match self.read_checked(names, shape)? {
            Raw::Quantized(q) => Matrix::from_quantized(q, precision),
            Raw::Dense(t) if t.dtype() == DType::F16 => {
                Matrix::with_precision(&t.to_dtype(DType::F32)?, precision)
            }
            Raw::Dense(t) => Matrix::with_precision(&t, precision),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.inner.borrow().path.clone()
    }

    /// The same checkpoint, with `name` appended to the prefix.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            inner: self.inner.clone(),
            prefix,
        }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.inner.borrow().store.contains(&self.full(name))
    }

    /// The tensor `name` as f32, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_any(&[name], shape)
    }

    /// The first of `names` present (aliases used by different releases), as f32.
    pub fn get_any(&self, names: &[&str], shape: &[usize]) -> Result<Tensor> {
        self.get_any_dtype(names, shape, DType::F32)
    }

    /// Like [`Self::get_any`], converted to `dtype`.
    pub fn get_any_dtype(&self, names: &[&str], shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.read_checked(names, shape)?.into_dense(dtype)
    }

    /// The first of `names` present, checked against `shape` before its bytes are read,
    /// and marked as used; random weights are drawn instead.
    fn read_checked(&self, names: &[&str], shape: &[usize]) -> Result<Raw> {
        let mut inner = self.inner.borrow_mut();
        if let Some(rng) = inner.random.as_mut() {
            let full = self.full(names[0]);
            let mut t = random_tensor(rng, shape)?;
            if inner.random_bf16 {
                t = t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            }
            inner.used.insert(full.clone());
            if inner.random_keep {
                if let Store::Memory(m) = &mut inner.store {
                    m.insert(full, t.clone());
                }
            }
            return Ok(Raw::Dense(t));
        }
        let Some(full) = names
            .iter()
            .map(|n| self.full(n))
            .find(|n| inner.store.contains(n))
        else {
            return Err(Error::MissingTensor {
                path: inner.path.clone(),
                name: self.full(names[0]),
            });
        };
        let (stored, dims) = inner
            .store
            .describe(&full)
            .ok_or_else(|| Error::MissingTensor {
                path: inner.path.clone(),
                name: full.clone(),
            })?;
        if let StoredDType::Other(found) = stored {
            return Err(Error::BadDType {
                path: inner.path.clone(),
                name: full,
                found,
            });
        }
        if dims != shape {
            return Err(Error::ShapeMismatch {
                path: inner.path.clone(),
                name: full,
                expected: shape.to_vec(),
                found: dims,
            });
        }
        let raw = inner.store.read(&full)?;
        inner.used.insert(full);
        Ok(raw)
    }

    /// Marks `name` as known but unneeded at inference (training-only buffers).
    pub fn skip(&self, name: &str) {
        let full = self.full(name);
        let mut inner = self.inner.borrow_mut();
        if inner.store.contains(&full) {
            inner.used.insert(full);
        }
    }

    /// Writes every tensor (for [`Self::random`]: every one made so far) as safetensors.
    pub fn save(&self, path: &Path, dtype: DType) -> Result<()> {
        let inner = self.inner.borrow();
        let Store::Memory(tensors) = &inner.store else {
            return Err(Error::InvalidInput(
                "only weights made in memory can be saved".into(),
            ));
        };
        let tensors = tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        crate::outfile::write_atomically(path, |tmp| {
            candle_core::safetensors::save(&tensors, tmp).map_err(|e| Error::Safetensors {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        })
    }

    /// Fails if any tensor of the file was not used by the model built from the config.
    pub fn finish(&self) -> Result<()> {
        let inner = self.inner.borrow();
        let mut unused: Vec<&String> = inner
            .store
            .names()
            .into_iter()
            .filter(|k| !inner.used.contains(*k))
            .collect();
        unused.sort();
        match unused.first() {
            None => Ok(()),
            Some(first) => Err(Error::UnusedTensors {
                path: inner.path.clone(),
                count: unused.len(),
                example: first.to_string(),
            }),
        }
    }
}

fn random_tensor(rng: &mut rand::rngs::StdRng, shape: &[usize]) -> Result<Tensor> {
    use rand::Rng;
    let n: usize = shape.iter().product();
    let (lo, hi) = if shape.len() <= 1 {
        (0.5f32, 1.5f32)
    } else {
        let fan_in: usize = shape[1..].iter().product();
        let b = 1.0 / (fan_in.max(1) as f32).sqrt();
        (-b, b)
    };
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(tensors: &[(&str, Tensor)]) -> Weights {
        let map = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        Weights::from_tensors(Path::new("test.safetensors"), map)
    }

    #[test]
    fn shape_mismatch_and_missing_names_are_reported() {
        let t = Tensor::zeros((2, 3), DType::BF16, &Device::Cpu).expect("zeros");
        let w = file_with(&[("a.weight", t)]);
        let err = w
            .pp("a")
            .get("weight", &[3, 2])
            .expect_err("shape")
            .to_string();
        assert!(
            err.contains("a.weight") && err.contains("[3, 2]") && err.contains("[2, 3]"),
            "{err}"
        );
        let err = w.get("b.weight", &[1]).expect_err("missing").to_string();
        assert!(err.contains("b.weight"), "{err}");
        let err = w.finish().expect_err("unused").to_string();
        assert!(err.contains("a.weight"), "{err}");
        let got = w.pp("a").get("weight", &[2, 3]).expect("get");
        assert_eq!(got.dtype(), DType::F32);
        let half = Tensor::new(&[1.5f32, -2.25], &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F16))
            .expect("f16");
        let w16 = file_with(&[("h", half)]);
        let v: Vec<f32> = w16.get("h", &[2]).expect("f16 get").to_vec1().expect("vec");
        assert_eq!(v, [1.5, -2.25]);
        w.finish().expect("all used");
    }

    #[test]
    fn truncated_file_is_a_named_error() {
        let dir = std::env::temp_dir().join(format!("parley-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("w.safetensors");
        let t = Tensor::ones((64, 64), DType::F32, &Device::Cpu).expect("ones");
        candle_core::safetensors::save(&HashMap::from([("x".to_string(), t)]), &path)
            .expect("save");
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() - 100]).expect("truncate");
        let err = Weights::load(&path).expect_err("truncated").to_string();
        assert!(err.contains("w.safetensors"), "{err}");
        std::fs::write(&path, b"garbage").expect("write");
        assert!(Weights::load(&path).is_err());
    }
}
