//! Strict loading of safetensors checkpoints as published (f32, f16 or bf16 on disk).
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

use crate::compute::cpu::{Matrix, WeightPrecision};

use crate::{Error, Result};

struct Inner {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
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
    /// Reads a whole safetensors file. A truncated or corrupt file is an error naming it.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
            Error::Safetensors {
                path: path.to_path_buf(),
                reason: describe_safetensors_error(&e),
            }
        })?;
        Ok(Self::from_tensors(path, tensors))
    }

    /// Wraps tensors already in memory (`path` is only used in messages).
    pub fn from_tensors(path: &Path, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            inner: Rc::new(RefCell::new(Inner {
                path: path.to_path_buf(),
                tensors,
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

    /// The tensor `name` of `shape` as a weight matrix in this checkpoint's precision.
    pub fn matrix(&self, name: &str, shape: &[usize]) -> Result<Matrix> {
        Matrix::with_precision(&self.get(name, shape)?, self.precision())
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
        self.inner.borrow().tensors.contains_key(&self.full(name))
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
        let mut inner = self.inner.borrow_mut();
        if let Some(rng) = inner.random.as_mut() {
            let full = self.full(names[0]);
            let mut t = random_tensor(rng, shape)?;
            if inner.random_bf16 {
                t = t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            }
            inner.used.insert(full.clone());
            if inner.random_keep {
                inner.tensors.insert(full, t.clone());
            }
            return Ok(t.to_dtype(dtype)?);
        }
        let Some(full) = names
            .iter()
            .map(|n| self.full(n))
            .find(|n| inner.tensors.contains_key(n))
        else {
            return Err(Error::MissingTensor {
                path: inner.path.clone(),
                name: self.full(names[0]),
            });
        };
        let t = &inner.tensors[&full];
        if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::BadDType {
                path: inner.path.clone(),
                name: full,
                found: format!("{:?}", t.dtype()),
            });
        }
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                path: inner.path.clone(),
                name: full,
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        let t = t.to_dtype(dtype)?;
        inner.used.insert(full);
        Ok(t)
    }

    /// Marks `name` as known but unneeded at inference (training-only buffers).
    pub fn skip(&self, name: &str) {
        let full = self.full(name);
        let mut inner = self.inner.borrow_mut();
        if inner.tensors.contains_key(&full) {
            inner.used.insert(full);
        }
    }

    /// Writes every tensor (for [`Self::random`]: every one made so far) as safetensors.
    pub fn save(&self, path: &Path, dtype: DType) -> Result<()> {
        let inner = self.inner.borrow();
        let tensors = inner
            .tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        candle_core::safetensors::save(&tensors, path).map_err(|e| Error::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Fails if any tensor of the file was not used by the model built from the config.
    pub fn finish(&self) -> Result<()> {
        let inner = self.inner.borrow();
        let mut unused: Vec<&String> = inner
            .tensors
            .keys()
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

fn describe_safetensors_error(e: &candle_core::Error) -> String {
    let msg = e.to_string();
    if msg.contains("MetadataIncompleteBuffer") || msg.contains("incomplete") {
        format!("the file is truncated or its header is inconsistent ({msg})")
    } else {
        msg
    }
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
