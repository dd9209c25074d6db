//! The causal SEANet encoder and decoder (the reference's `SEANetEncoder`,
//! `SEANetDecoder` and `SEANetResnetBlock`), with parameter names `model.{i}.…` as in
//! its `nn.Sequential`.

use super::config::SeanetConfig;
use super::conv::{elu, ConvSpec, Seq, StreamingConv1d, StreamingConvTr1d};
use crate::compute::cpu::WeightPrecision;
use crate::models::weights::Weights;
use crate::Result;

#[derive(Debug, Clone)]
struct ResnetBlock {
    alpha: f32,
    convs: Vec<StreamingConv1d>,
    shortcut: Option<StreamingConv1d>,
}

impl ResnetBlock {
    fn load(w: &Weights, cfg: &SeanetConfig, dim: usize, dilation: usize) -> Result<Self> {
        let hidden = dim / cfg.compress;
        let kernels = [cfg.residual_kernel_size, 1];
        let dilations = [dilation, 1];
        let mut convs = Vec::with_capacity(2);
        for (i, (&k, &d)) in kernels.iter().zip(&dilations).enumerate() {
            let in_ch = if i == 0 { dim } else { hidden };
            let out_ch = if i == kernels.len() - 1 { dim } else { hidden };
            let spec = ConvSpec {
                dilation: d,
                ..ConvSpec::new(in_ch, out_ch, k)
            };
            // `block` alternates activation (even index) and convolution (odd index).
            convs.push(StreamingConv1d::load(
                &w.pp(format!("block.{}.conv.conv", 2 * i + 1)),
                spec,
            )?);
        }
        let shortcut = if cfg.true_skip {
            None
        } else {
            Some(StreamingConv1d::load(
                &w.pp("shortcut.conv.conv"),
                ConvSpec::new(dim, dim, 1),
            )?)
        };
        Ok(Self {
            alpha: cfg.activation_params.alpha as f32,
            convs,
            shortcut,
        })
    }

    fn step(&mut self, x: &Seq) -> Result<Seq> {
        let mut v = x.clone();
        for conv in &mut self.convs {
            elu(&mut v.data, self.alpha);
            v = conv.step(&v)?;
        }
        match &mut self.shortcut {
            Some(s) => {
                let u = s.step(x)?;
                v.data.iter_mut().zip(&u.data).for_each(|(a, b)| *a += b);
            }
            None => v.data.iter_mut().zip(&x.data).for_each(|(a, b)| *a += b),
        }
        Ok(v)
    }

    fn state_bytes(&self) -> usize {
        self.convs
            .iter()
            .map(StreamingConv1d::state_bytes)
            .sum::<usize>()
            + self
                .shortcut
                .as_ref()
                .map_or(0, StreamingConv1d::state_bytes)
    }

    fn reset(&mut self) {
        self.convs.iter_mut().for_each(StreamingConv1d::reset);
        if let Some(s) = &mut self.shortcut {
            s.reset();
        }
    }
}

#[derive(Debug, Clone)]
enum Layer {
    Conv(StreamingConv1d),
    ConvTr(StreamingConvTr1d),
    Res(ResnetBlock),
    /// ELU with this alpha.
    Act(f32),
}

/// A layer as the GPU codec plans it.
pub(super) enum LayerRef<'a> {
    Conv(&'a StreamingConv1d),
    ConvTr(&'a StreamingConvTr1d),
    /// The block's convolutions (each after an ELU of `alpha`), and whether it has a
    /// shortcut convolution (else the identity).
    Res(&'a [StreamingConv1d], bool, f32),
    Act(f32),
}

fn layer_refs(layers: &[Layer]) -> Vec<LayerRef<'_>> {
    layers
        .iter()
        .map(|l| match l {
            Layer::Conv(c) => LayerRef::Conv(c),
            Layer::ConvTr(c) => LayerRef::ConvTr(c),
            Layer::Res(r) => LayerRef::Res(&r.convs, r.shortcut.is_some(), r.alpha),
            Layer::Act(a) => LayerRef::Act(*a),
        })
        .collect()
}

/// Runs `layers` in order, each timed as `{part}.{index} {what}` when profiling.
fn run_layers(layers: &mut [Layer], part: &str, x: Seq) -> Result<Seq> {
    layers.iter_mut().enumerate().try_fold(x, |x, (i, l)| {
        let name = if crate::profile::enabled() {
            format!("{part}.{i:02} {}", l.describe())
        } else {
            String::new()
        };
        crate::profile::span(move || name, || l.step(x))
    })
}

impl Layer {
    fn describe(&self) -> String {
        match self {
            Layer::Conv(c) => format!("conv {}", c.spec().describe()),
            Layer::ConvTr(c) => format!("convtr {}", c.spec().describe()),
            Layer::Res(r) => format!(
                "res {}",
                r.convs
                    .first()
                    .map_or(String::new(), |c| c.spec().describe())
            ),
            Layer::Act(_) => "elu".into(),
        }
    }

    fn step(&mut self, x: Seq) -> Result<Seq> {
        match self {
            Layer::Conv(c) => c.step(&x),
            Layer::ConvTr(c) => c.step(&x),
            Layer::Res(r) => r.step(&x),
            Layer::Act(alpha) => {
                let mut x = x;
                elu(&mut x.data, *alpha);
                Ok(x)
            }
        }
    }

    fn set_precision(&mut self, p: WeightPrecision) -> Result<()> {
        match self {
            Layer::Conv(c) => c.set_precision(p),
            Layer::ConvTr(c) => c.set_precision(p),
            Layer::Res(r) => {
                r.convs.iter_mut().try_for_each(|c| c.set_precision(p))?;
                r.shortcut.as_mut().map_or(Ok(()), |s| s.set_precision(p))
            }
            Layer::Act(_) => Ok(()),
        }
    }

    fn state_bytes(&self) -> usize {
        match self {
            Layer::Conv(c) => c.state_bytes(),
            Layer::ConvTr(c) => c.state_bytes(),
            Layer::Res(r) => r.state_bytes(),
            Layer::Act(_) => 0,
        }
    }

    fn reset(&mut self) {
        match self {
            Layer::Conv(c) => c.reset(),
            Layer::ConvTr(c) => c.reset(),
            Layer::Res(r) => r.reset(),
            Layer::Act(_) => {}
        }
    }
}

/// Builds the `nn.Sequential` index by index, so parameter names follow the reference.
struct Builder<'a> {
    w: &'a Weights,
    layers: Vec<Layer>,
    alpha: f32,
}

impl Builder<'_> {
    fn prefix(&self) -> Weights {
        self.w.pp(format!("model.{}", self.layers.len()))
    }
    fn conv(&mut self, spec: ConvSpec) -> Result<()> {
        let c = StreamingConv1d::load(&self.prefix().pp("conv.conv"), spec)?;
        self.layers.push(Layer::Conv(c));
        Ok(())
    }
    fn convtr(&mut self, spec: ConvSpec) -> Result<()> {
        let c = StreamingConvTr1d::load(&self.prefix().pp("convtr.convtr"), spec)?;
        self.layers.push(Layer::ConvTr(c));
        Ok(())
    }
    fn res(&mut self, cfg: &SeanetConfig, dim: usize, dilation: usize) -> Result<()> {
        let r = ResnetBlock::load(&self.prefix(), cfg, dim, dilation)?;
        self.layers.push(Layer::Res(r));
        Ok(())
    }
    fn act(&mut self) {
        self.layers.push(Layer::Act(self.alpha));
    }
}

/// Audio (`T` rows of 1 channel) to latents (`T / hop` rows of `dimension`).
#[derive(Debug, Clone)]
pub struct SeanetEncoder {
    layers: Vec<Layer>,
}

impl SeanetEncoder {
    pub(super) fn layer_refs(&self) -> Vec<LayerRef<'_>> {
        layer_refs(&self.layers)
    }

    pub fn load(w: &Weights, cfg: &SeanetConfig) -> Result<Self> {
        let mut b = Builder {
            w,
            layers: vec![],
            alpha: cfg.activation_params.alpha as f32,
        };
        let nf = cfg.n_filters;
        b.conv(ConvSpec::new(cfg.channels, nf, cfg.kernel_size))?;
        let mut mult = 1;
        for &ratio in cfg.ratios.iter().rev() {
            for j in 0..cfg.n_residual_layers {
                b.res(cfg, mult * nf, cfg.dilation_base.pow(j as u32))?;
            }
            b.act();
            b.conv(ConvSpec {
                stride: ratio,
                ..ConvSpec::new(mult * nf, mult * nf * 2, ratio * 2)
            })?;
            mult *= 2;
        }
        b.act();
        b.conv(ConvSpec::new(
            mult * nf,
            cfg.dimension,
            cfg.last_kernel_size,
        ))?;
        Ok(Self { layers: b.layers })
    }

    pub fn step(&mut self, x: Seq) -> Result<Seq> {
        run_layers(&mut self.layers, "seanet-encoder", x)
    }

    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(Layer::reset);
    }

    pub fn state_bytes(&self) -> usize {
        self.layers.iter().map(Layer::state_bytes).sum()
    }

    pub fn set_precision(&mut self, p: WeightPrecision) -> Result<()> {
        self.layers.iter_mut().try_for_each(|l| l.set_precision(p))
    }
}

/// Latents (`T` rows of `dimension`) to audio (`T * hop` rows of 1 channel).
#[derive(Debug, Clone)]
pub struct SeanetDecoder {
    layers: Vec<Layer>,
}

impl SeanetDecoder {
    pub(super) fn layer_refs(&self) -> Vec<LayerRef<'_>> {
        layer_refs(&self.layers)
    }

    pub fn load(w: &Weights, cfg: &SeanetConfig) -> Result<Self> {
        let mut b = Builder {
            w,
            layers: vec![],
            alpha: cfg.activation_params.alpha as f32,
        };
        let nf = cfg.n_filters;
        let mut mult = 1 << cfg.ratios.len();
        b.conv(ConvSpec::new(cfg.dimension, mult * nf, cfg.kernel_size))?;
        for &ratio in &cfg.ratios {
            b.act();
            b.convtr(ConvSpec {
                stride: ratio,
                ..ConvSpec::new(mult * nf, mult * nf / 2, ratio * 2)
            })?;
            for j in 0..cfg.n_residual_layers {
                b.res(cfg, mult * nf / 2, cfg.dilation_base.pow(j as u32))?;
            }
            mult /= 2;
        }
        b.act();
        b.conv(ConvSpec::new(nf, cfg.channels, cfg.last_kernel_size))?;
        Ok(Self { layers: b.layers })
    }

    pub fn step(&mut self, x: Seq) -> Result<Seq> {
        run_layers(&mut self.layers, "seanet-decoder", x)
    }

    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(Layer::reset);
    }

    pub fn state_bytes(&self) -> usize {
        self.layers.iter().map(Layer::state_bytes).sum()
    }

    pub fn set_precision(&mut self, p: WeightPrecision) -> Result<()> {
        self.layers.iter_mut().try_for_each(|l| l.set_precision(p))
    }
}
