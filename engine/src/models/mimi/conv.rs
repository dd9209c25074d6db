//! Causal streaming convolutions: the reference's `StreamingConv1d` and
//! `StreamingConvTranspose1d`, over time-major activations ([`Seq`]: `t` rows of `c`
//! channels).
//!
//! Both keep their state between calls, so feeding a signal in pieces gives exactly what
//! feeding it whole gives. The reference's offline path is its streaming path from a fresh
//! state (for the transposed convolution, minus the tail still waiting for the next
//! frame), so one implementation serves both here too.
//!
//! A convolution is an im2col followed by [`Matrix::matmul_t`] against the kernel
//! permuted at load time to `[c_out, k * c_in]`; a transposed convolution is a product
//! with the kernel permuted to `[k * c_out, c_in]` followed by an overlap-add. Activations
//! stay time-major from the microphone to the speaker, so no layer transposes anything.

use crate::compute::cpu::{Matrix, WeightPrecision};
use crate::compute::team;
use crate::models::weights::Weights;
use crate::{Error, Result};

/// Time-major activations: `t` rows of `c` channels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seq {
    pub c: usize,
    pub data: Vec<f32>,
}

impl Seq {
    pub fn new(c: usize, data: Vec<f32>) -> Self {
        debug_assert!(c > 0 && data.len().is_multiple_of(c));
        Self { c, data }
    }

    pub fn t(&self) -> usize {
        self.data.len() / self.c
    }

    pub fn row(&self, t: usize) -> &[f32] {
        &self.data[t * self.c..(t + 1) * self.c]
    }
}

/// How the first `kernel - stride` samples of history are filled on the first call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadMode {
    /// Zeros (`pad_mode="constant"`).
    Constant,
    /// Copies of the first input sample (`pad_mode="replicate"`, Mimi's downsampler).
    Replicate,
}

#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel_size: usize,
    pub stride: usize,
    pub dilation: usize,
    pub groups: usize,
    pub bias: bool,
    pub pad_mode: PadMode,
}

impl ConvSpec {
    /// "64->128 k8 s4" (the dilation when not 1): names a layer in profiles.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{}->{} k{}",
            self.in_channels, self.out_channels, self.kernel_size
        );
        if self.stride != 1 {
            s += &format!(" s{}", self.stride);
        }
        if self.dilation != 1 {
            s += &format!(" d{}", self.dilation);
        }
        s
    }

    pub fn new(in_channels: usize, out_channels: usize, kernel_size: usize) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel_size,
            stride: 1,
            dilation: 1,
            groups: 1,
            bias: true,
            pad_mode: PadMode::Constant,
        }
    }
}

fn load_bias(w: &Weights, spec: &ConvSpec) -> Result<Option<Vec<f32>>> {
    Ok(if spec.bias {
        Some(w.get("bias", &[spec.out_channels])?.to_vec1()?)
    } else {
        None
    })
}

fn add_bias(data: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in data.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }
}

#[derive(Debug, Clone)]
pub struct StreamingConv1d {
    /// `[c_out, k * c_in]`, column `k * c_in + ci` holding the reference's `[co, ci, k]`.
    weight: Matrix,
    bias: Option<Vec<f32>>,
    spec: ConvSpec,
    /// The last `effective_kernel - stride` input rows; None when fresh.
    previous: Option<Vec<f32>>,
}

impl StreamingConv1d {
    pub fn spec(&self) -> &ConvSpec {
        &self.spec
    }

    /// Loads `{prefix}.weight` (`[c_out, c_in, k]`) and `{prefix}.bias`.
    pub fn load(w: &Weights, spec: ConvSpec) -> Result<Self> {
        if spec.groups != 1 {
            return Err(Error::InvalidInput(format!(
                "grouped convolutions (groups = {}) are not supported",
                spec.groups
            )));
        }
        let weight = w.get(
            "weight",
            &[spec.out_channels, spec.in_channels, spec.kernel_size],
        )?;
        let weight = Matrix::new(&weight.permute((0, 2, 1))?)?;
        Ok(Self {
            weight,
            bias: load_bias(w, &spec)?,
            spec,
            previous: None,
        })
    }

    /// `[c_out, k * c_in]` (see the field).
    pub(super) fn weight(&self) -> &Matrix {
        &self.weight
    }

    pub(super) fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    pub(super) fn history_len(&self) -> usize {
        (self.spec.kernel_size - 1) * self.spec.dilation + 1 - self.spec.stride
    }

    /// `x`: `t` rows of `c_in`, `t` a positive multiple of the stride. Returns `t / stride`
    /// rows of `c_out`.
    pub fn step(&mut self, x: &Seq) -> Result<Seq> {
        let ConvSpec {
            in_channels: cin,
            kernel_size: k,
            stride,
            dilation,
            ..
        } = self.spec;
        let t = x.t();
        if x.c != cin || t == 0 || !t.is_multiple_of(stride) {
            return Err(Error::InvalidInput(format!(
                "convolution input of {t} steps x {} channels; expected {cin} channels and a positive multiple of {stride} steps",
                x.c
            )));
        }
        let hist = self.history_len();
        if hist == 0 && k == 1 {
            // A pointwise convolution: the input rows are already the im2col matrix.
            let mut out = self.weight.matmul_t(&x.data, t / stride)?;
            add_bias(&mut out, self.bias.as_deref());
            return Ok(Seq::new(self.spec.out_channels, out));
        }
        let full: Vec<f32> = if hist == 0 {
            x.data.clone()
        } else {
            let mut full = match self.previous.take() {
                Some(p) => p,
                None => match self.spec.pad_mode {
                    PadMode::Constant => vec![0.0; hist * cin],
                    PadMode::Replicate => x.row(0).repeat(hist),
                },
            };
            full.extend_from_slice(&x.data);
            full
        };
        let t_out = t / stride;
        let width = k * cin;
        let mut cols = vec![0f32; t_out * width];
        // Copied on the step's threads, a block of output rows each.
        let rows_per = (PARALLEL_MIN_VALUES / width).max(1);
        team::chunks_mut(&mut cols, rows_per * width, |c, block| {
            for (i, col) in block.chunks_exact_mut(width).enumerate() {
                let to = c * rows_per + i;
                for (kk, dst) in col.chunks_exact_mut(cin).enumerate() {
                    let src = (to * stride + kk * dilation) * cin;
                    dst.copy_from_slice(&full[src..src + cin]);
                }
            }
        });
        let mut out = self.weight.matmul_t_owned(cols, t_out)?;
        add_bias(&mut out, self.bias.as_deref());
        if hist > 0 {
            let keep = full.len() - hist * cin;
            self.previous = Some(full[keep..].to_vec());
        }
        Ok(Seq::new(self.spec.out_channels, out))
    }

    pub fn reset(&mut self) {
        self.previous = None;
    }

    pub fn set_precision(&mut self, precision: WeightPrecision) -> Result<()> {
        self.weight.set_precision(precision)
    }

    /// Bytes of streaming state held (constant once the first step has run).
    pub fn state_bytes(&self) -> usize {
        self.previous.as_ref().map_or(0, |p| p.len() * 4)
    }
}

#[derive(Debug, Clone)]
enum TrKernel {
    /// `[k * c_out, c_in]`, row `kk * c_out + co` holding the reference's `[ci, co, kk]`.
    Full(Matrix),
    /// One input channel per group (Mimi's upsampler): `[k][c]`.
    Depthwise(Vec<f32>),
}

#[derive(Debug, Clone)]
pub struct StreamingConvTr1d {
    kernel: TrKernel,
    bias: Option<Vec<f32>>,
    spec: ConvSpec,
    /// Overlap-add tail for the next call (bias excluded): `k - stride` rows of `c_out`.
    partial: Option<Vec<f32>>,
}

impl StreamingConvTr1d {
    pub fn spec(&self) -> &ConvSpec {
        &self.spec
    }

    /// Loads `{prefix}.weight` (`[c_in, c_out / groups, k]`) and `{prefix}.bias`.
    pub fn load(w: &Weights, spec: ConvSpec) -> Result<Self> {
        let (cin, cout, k) = (spec.in_channels, spec.out_channels, spec.kernel_size);
        let weight = w.get("weight", &[cin, cout / spec.groups, k])?;
        let kernel = if spec.groups == 1 {
            TrKernel::Full(Matrix::new(
                &weight
                    .permute((2, 1, 0))?
                    .contiguous()?
                    .reshape((k * cout, cin))?,
            )?)
        } else if spec.groups == cin && cin == cout {
            TrKernel::Depthwise(
                weight
                    .squeeze(1)?
                    .t()?
                    .contiguous()?
                    .flatten_all()?
                    .to_vec1()?,
            )
        } else {
            return Err(Error::InvalidInput(format!(
                "transposed convolutions with {} groups over {cin} channels are not supported",
                spec.groups
            )));
        };
        Ok(Self {
            kernel,
            bias: load_bias(w, &spec)?,
            spec,
            partial: None,
        })
    }

    /// The kernel: `[k * c_out, c_in]` (full), or `[k][c]` (depthwise).
    pub(super) fn kernel(&self) -> (Option<&Matrix>, Option<&[f32]>) {
        match &self.kernel {
            TrKernel::Full(m) => (Some(m), None),
            TrKernel::Depthwise(v) => (None, Some(v)),
        }
    }

    pub(super) fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// `x`: `t` rows of `c_in`. Returns `t * stride` rows of `c_out`.
    pub fn step(&mut self, x: &Seq) -> Result<Seq> {
        let (cout, k, stride) = (
            self.spec.out_channels,
            self.spec.kernel_size,
            self.spec.stride,
        );
        let t = x.t();
        if x.c != self.spec.in_channels {
            return Err(Error::InvalidInput(format!(
                "transposed convolution input has {} channels, expected {}",
                x.c, self.spec.in_channels
            )));
        }
        let len = (t.max(1) - 1) * stride + k;
        let mut y = vec![0f32; len * cout];
        match &self.kernel {
            TrKernel::Full(w) => {
                let cols = w.matmul_t(&x.data, t)?;
                for (ti, row) in cols.chunks_exact(k * cout).enumerate() {
                    for (kk, src) in row.chunks_exact(cout).enumerate() {
                        let dst = &mut y[(ti * stride + kk) * cout..][..cout];
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                    }
                }
            }
            TrKernel::Depthwise(wk) => {
                for ti in 0..t {
                    let xr = x.row(ti);
                    for (kk, wrow) in wk.chunks_exact(cout).enumerate() {
                        let dst = &mut y[(ti * stride + kk) * cout..][..cout];
                        for ((d, &xv), &wv) in dst.iter_mut().zip(xr).zip(wrow) {
                            *d += xv * wv;
                        }
                    }
                }
            }
        }
        if t == 0 {
            return Ok(Seq::new(cout, vec![]));
        }
        let pt = (k - stride) * cout;
        if pt > 0 {
            if let Some(partial) = &self.partial {
                y[..pt].iter_mut().zip(partial).for_each(|(d, p)| *d += p);
            }
            self.partial = Some(y[y.len() - pt..].to_vec());
            y.truncate(y.len() - pt);
        }
        add_bias(&mut y, self.bias.as_deref());
        Ok(Seq::new(cout, y))
    }

    pub fn reset(&mut self) {
        self.partial = None;
    }

    pub fn set_precision(&mut self, precision: WeightPrecision) -> Result<()> {
        match &mut self.kernel {
            TrKernel::Full(m) => m.set_precision(precision),
            TrKernel::Depthwise(_) => Ok(()),
        }
    }

    pub fn state_bytes(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.len() * 4)
    }
}

/// Values per piece of work shared among the step's threads (ELU, im2col): tens of
/// microseconds each.
const PARALLEL_MIN_VALUES: usize = 1 << 14;

/// ELU with parameter alpha, as `torch.nn.ELU`, in place, on the step's threads.
pub fn elu(x: &mut [f32], alpha: f32) {
    team::chunks_mut(x, PARALLEL_MIN_VALUES, |_, part| {
        for v in part.iter_mut() {
            if *v < 0.0 {
                *v = alpha * v.exp_m1();
            }
        }
    });
}
