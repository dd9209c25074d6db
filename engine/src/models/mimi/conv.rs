//! Causal streaming convolutions: the reference's `StreamingConv1d` and
//! `StreamingConvTranspose1d`.
//!
//! Both keep their state between calls, so feeding a signal in pieces gives exactly what
//! feeding it whole gives. The offline path of the reference is the streaming path from
//! a fresh state (for the transposed convolution, minus the tail still waiting for the
//! next frame), so one implementation serves both here too.

use candle_core::{Module, Tensor, D};

use crate::models::weights::Weights;
use crate::Result;

/// How the first `kernel - stride` samples of history are filled on the first call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadMode {
    /// Zeros (`pad_mode="constant"`).
    Constant,
    /// Copies of the first input sample (`pad_mode="replicate"`, Mimi's downsampler).
    Replicate,
}

#[derive(Debug, Clone)]
pub struct StreamingConv1d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    dilation: usize,
    groups: usize,
    pad_mode: PadMode,
    /// The last `effective_kernel - stride` input samples, `[1, C_in, ·]`; None when fresh.
    previous: Option<Tensor>,
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

impl StreamingConv1d {
    /// Loads `{prefix}.weight` and `{prefix}.bias` (the reference's `conv.conv` module).
    pub fn load(w: &Weights, spec: ConvSpec) -> Result<Self> {
        let weight = w.get(
            "weight",
            &[
                spec.out_channels,
                spec.in_channels / spec.groups,
                spec.kernel_size,
            ],
        )?;
        let bias = if spec.bias {
            Some(
                w.get("bias", &[spec.out_channels])?
                    .reshape((1, spec.out_channels, 1))?,
            )
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride: spec.stride,
            dilation: spec.dilation,
            groups: spec.groups,
            pad_mode: spec.pad_mode,
            previous: None,
        })
    }

    fn history_len(&self) -> usize {
        let k = self.weight.dim(2).unwrap_or(1);
        (k - 1) * self.dilation + 1 - self.stride
    }

    /// `x`: `[1, C_in, T]` with `T` a positive multiple of the stride.
    /// Returns `[1, C_out, T / stride]`.
    pub fn step(&mut self, x: &Tensor) -> Result<Tensor> {
        let t = x.dim(D::Minus1)?;
        if t == 0 || t % self.stride != 0 {
            return Err(crate::Error::InvalidInput(format!(
                "convolution input of {t} steps is not a positive multiple of its stride {}",
                self.stride
            )));
        }
        let hist = self.history_len();
        let x = if hist == 0 {
            x.clone()
        } else {
            let previous = match (&self.previous, self.pad_mode) {
                (Some(p), _) => p.clone(),
                (None, PadMode::Constant) => x
                    .narrow(D::Minus1, 0, 1)?
                    .zeros_like()?
                    .repeat((1, 1, hist))?,
                (None, PadMode::Replicate) => x.narrow(D::Minus1, 0, 1)?.repeat((1, 1, hist))?,
            };
            Tensor::cat(&[&previous, x], D::Minus1)?
        };
        let mut y = x.conv1d(&self.weight, 0, self.stride, self.dilation, self.groups)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if hist > 0 {
            let len = x.dim(D::Minus1)?;
            self.previous = Some(x.narrow(D::Minus1, len - hist, hist)?.contiguous()?);
        }
        Ok(y)
    }

    pub fn reset(&mut self) {
        self.previous = None;
    }

    /// Bytes of streaming state held (constant once the first step has run).
    pub fn state_bytes(&self) -> usize {
        self.previous.as_ref().map_or(0, |t| t.elem_count() * 4)
    }
}

#[derive(Debug, Clone)]
pub struct StreamingConvTr1d {
    weight: Tensor,
    bias: Option<Tensor>,
    kernel_size: usize,
    stride: usize,
    groups: usize,
    /// Overlap-add tail for the next call (bias excluded), `[1, C_out, K - S]`.
    partial: Option<Tensor>,
}

impl StreamingConvTr1d {
    /// Loads `{prefix}.weight` (`[C_in, C_out / groups, K]`) and `{prefix}.bias`.
    pub fn load(w: &Weights, spec: ConvSpec) -> Result<Self> {
        let weight = w.get(
            "weight",
            &[
                spec.in_channels,
                spec.out_channels / spec.groups,
                spec.kernel_size,
            ],
        )?;
        let bias = if spec.bias {
            Some(
                w.get("bias", &[spec.out_channels])?
                    .reshape((1, spec.out_channels, 1))?,
            )
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            kernel_size: spec.kernel_size,
            stride: spec.stride,
            groups: spec.groups,
            partial: None,
        })
    }

    /// `x`: `[1, C_in, T]`; returns `[1, C_out, T * stride]`.
    pub fn step(&mut self, x: &Tensor) -> Result<Tensor> {
        let mut y = if self.groups == 1 {
            x.conv_transpose1d(&self.weight, 0, 0, self.stride, 1, 1)?
        } else {
            depthwise_conv_transpose1d(x, &self.weight, self.stride, self.groups)?
        };
        let pt = self.kernel_size - self.stride;
        if pt > 0 {
            let len = y.dim(D::Minus1)?;
            if let Some(partial) = &self.partial {
                let head = (y.narrow(D::Minus1, 0, pt)? + partial)?;
                y = Tensor::cat(&[&head, &y.narrow(D::Minus1, pt, len - pt)?], D::Minus1)?;
            }
            self.partial = Some(y.narrow(D::Minus1, len - pt, pt)?.contiguous()?);
            y = y.narrow(D::Minus1, 0, len - pt)?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }

    pub fn reset(&mut self) {
        self.partial = None;
    }

    pub fn state_bytes(&self) -> usize {
        self.partial.as_ref().map_or(0, |t| t.elem_count() * 4)
    }
}

/// Transposed convolution where every group has one input channel (Mimi's upsampler,
/// `groups == channels`). candle splits grouped transposed convolutions into one call per
/// group, which costs far more than the arithmetic here, so this loop does it directly.
fn depthwise_conv_transpose1d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    groups: usize,
) -> Result<Tensor> {
    let (b, c_in, t) = x.dims3()?;
    let (wc_in, c_out_g, k) = w.dims3()?;
    if b != 1 || c_in != groups || wc_in != c_in {
        return Err(crate::Error::InvalidInput(format!(
            "grouped transposed convolution supports one input channel per group (got {c_in} channels, {groups} groups)"
        )));
    }
    let c_out = c_out_g * groups;
    let out_len = (t - 1) * stride + k;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let ws = w.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; c_out * out_len];
    for c in 0..c_in {
        let xrow = &xs[c * t..(c + 1) * t];
        for o in 0..c_out_g {
            let oc = c * c_out_g + o;
            let wrow = &ws[(c * c_out_g + o) * k..(c * c_out_g + o + 1) * k];
            let orow = &mut out[oc * out_len..(oc + 1) * out_len];
            for (ti, &xv) in xrow.iter().enumerate() {
                for (ki, &wv) in wrow.iter().enumerate() {
                    orow[ti * stride + ki] += xv * wv;
                }
            }
        }
    }
    Ok(Tensor::from_vec(out, (1, c_out, out_len), x.device())?)
}

/// ELU with alpha, as `torch.nn.ELU`.
#[derive(Debug, Clone, Copy)]
pub struct Elu(pub f64);

impl Module for Elu {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.elu(self.0)
    }
}
