//! Mimi on the GPU: the streaming encoder and decoder of a loaded [`Mimi`] as two programs
//! (one submit per 80 ms frame each), so that a GPU session's frame leaves the GPU only as
//! audio in and out, and codes (a few bytes) between the codec and the LM.
//!
//! The state lives in GPU buffers: each convolution's history rows sit in front of its
//! input in one buffer (`full`), moved there through a scratch buffer at the start of a
//! frame, so a layer writes its output straight into the next convolution's input; ELUs
//! and residual blocks run in place there. Transposed convolutions (kernel twice the
//! stride, as in every Mimi) keep their overlap-add tail. The transformers are the LM's
//! layers (`lm::gpu::Builder::layers`: LayerNorm, RoPE, the split attention over a ring,
//! GELU MLP, layer scales), one row at a time: a CPU call of two rows lets its first row
//! see one position less of a full ring, which the step block's `window` reproduces. The
//! quantizer's search is a matrix-vector product against each codebook, then the first
//! nearest centroid; the centroid is taken from the residual on the GPU.
//!
//! f32 throughout: it is the CPU path's reference arithmetic (codes identical to the CPU's
//! on the test recordings; decoded audio within 1e-4). The CPU Mimi stays the fallback.

use std::sync::Arc;

use super::conv::{PadMode, StreamingConv1d};
use super::seanet::LayerRef;
use super::Mimi;
use crate::compute::cpu::Matrix;
use crate::compute::gpu::{
    Epilogue, Gpu, GpuFormat, GpuWeight, Plan, Program, Res, StepBlock, MATMUL_MIN_ROWS,
    STEP_BLOCK_BYTES,
};
use crate::models::lm::gpu::{check_transformer, Builder, Rings, Scratch};
use crate::models::transformer::{rope_table, StreamingTransformer};
use crate::{Error, Result};

/// A place in a buffer: `off` in f32 values.
#[derive(Debug, Clone)]
struct Region {
    buf: wgpu::Buffer,
    off: usize,
}

/// A convolution's buffers: `full` holds `hist` history rows then `t_in` input rows.
struct ConvState {
    full: wgpu::Buffer,
    hist: usize,
    cin: usize,
    t_in: usize,
}

impl ConvState {
    fn input(&self) -> Region {
        Region {
            buf: self.full.clone(),
            off: self.hist * self.cin,
        }
    }
}

/// What a SEANet layer holds on the GPU.
enum LayerState {
    Conv(ConvState),
    /// The block's first convolution (with history) and the second's input.
    Res(ConvState, wgpu::Buffer),
    /// Input rows, columns, the overlap-add tail.
    ConvTr(wgpu::Buffer, wgpu::Buffer, wgpu::Buffer),
    Act,
}

/// One transformer's GPU state and its row buffer.
struct Tr<'m> {
    t: &'m StreamingTransformer,
    rings: Rings,
    scratch: Scratch,
    x: wgpu::Buffer,
}

/// Positions, rotary tables and windows of one frame's transformer rows.
#[derive(Debug, Clone, Copy)]
struct RowClock {
    head_dim: usize,
    max_period: f32,
    rope: bool,
    cap: usize,
    rows: usize,
}

impl RowClock {
    fn of(t: &StreamingTransformer, rows: usize) -> Self {
        let (dims, _, _) = t.parts();
        Self {
            head_dim: dims.head_dim,
            max_period: dims.max_period,
            rope: dims.rope,
            cap: dims.context.unwrap_or(1).max(1),
            rows,
        }
    }

    /// The step blocks of a frame whose first row is at `offset`, each `stride` bytes.
    fn words(&self, offset: usize, stride: usize) -> Vec<u32> {
        let mut words = vec![0u32; stride / 4 * self.rows];
        for r in 0..self.rows {
            let pos = offset + r;
            let block = StepBlock {
                pos: pos as u32,
                // Row r of a call sees as far back as the ring holds after the call's
                // last row (the CPU writes every row of a call before attending).
                window: if r + 1 < self.rows {
                    self.cap.saturating_sub(self.rows - 1 - r) as u32
                } else {
                    0
                },
                rope: if self.rope {
                    rope_table(pos, self.head_dim, self.max_period)
                } else {
                    vec![]
                },
                ..Default::default()
            };
            let w = block.words();
            words[r * stride / 4..r * stride / 4 + w.len()].copy_from_slice(&w);
        }
        words
    }
}

struct Planner<'a> {
    b: Builder<'a>,
    gpu: &'a Gpu,
    /// Buffers holding streaming state, cleared by a reset.
    state: Vec<wgpu::Buffer>,
    /// The scratch the histories move through.
    hist_tmp: wgpu::Buffer,
    dummy: wgpu::Buffer,
}

/// Frame rows of a transformer call (Mimi's 25 Hz rows per 12.5 Hz frame).
const ROWS: usize = 2;

impl<'a> Planner<'a> {
    fn buffer(&mut self, label: &str, n: usize, state: bool) -> wgpu::Buffer {
        let b = self.gpu.activations(label, n.max(1));
        if state {
            self.state.push(b.clone());
        }
        b
    }

    /// An f32 weight in one buffer (the codec's kernels index it whole).
    fn weight(&mut self, label: &str, m: &Matrix) -> Result<wgpu::Buffer> {
        let w = self.b.upload_as(label, m, GpuFormat::F32)?;
        let (buf, _, _) = w
            .chunks()
            .next()
            .filter(|_| w.chunk_count() == 1)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{label}: {} bytes exceed this GPU's largest binding",
                    w.size_in_bytes()
                ))
            })?;
        Ok(buf.clone())
    }

    fn params(&mut self, words: [u32; 12]) -> Res {
        self.b.plan.params(&words)
    }

    fn copy(&mut self, src: &Region, dst: &Region, n: usize) {
        let p = self.params([
            n as u32,
            src.off as u32,
            dst.off as u32,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ]);
        self.b.plan.dispatch_n(
            "copy_values",
            vec![
                (0, Res::Buffer(src.buf.clone())),
                (1, Res::Buffer(dst.buf.clone())),
                (2, p),
            ],
            n,
        );
    }

    /// ELU (`gelu` false) or GELU in place over `n` values.
    fn activate(&mut self, at: &Region, n: usize, alpha: f32, gelu: bool) {
        let p = self.params([
            n as u32,
            0,
            at.off as u32,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            u32::from(gelu),
            alpha.to_bits(),
        ]);
        self.b.plan.dispatch_n(
            "activate",
            vec![(1, Res::Buffer(at.buf.clone())), (2, p)],
            n,
        );
    }

    fn conv_state(&mut self, label: &str, c: &StreamingConv1d, t_in: usize) -> Result<ConvState> {
        let spec = c.spec();
        if spec.pad_mode != PadMode::Constant && c.history_len() > 0 && label != "downsample" {
            return Err(Error::InvalidInput(format!(
                "{label}: replicate padding is on the GPU for the downsampler only"
            )));
        }
        let hist = c.history_len();
        Ok(ConvState {
            full: self.buffer(label, (hist + t_in) * spec.in_channels, hist > 0),
            hist,
            cin: spec.in_channels,
            t_in,
        })
    }

    /// Moves the last `hist` rows of the previous call to the front (through the
    /// scratch: the ranges overlap when a call is shorter than the history).
    fn shift(&mut self, s: &ConvState) -> Result<()> {
        if s.hist == 0 {
            return Ok(());
        }
        let n = s.hist * s.cin;
        if (n * 4) as u64 > self.hist_tmp.size() {
            return Err(Error::InvalidInput(format!(
                "a convolution history of {n} values exceeds the GPU codec's scratch"
            )));
        }
        let tmp = Region {
            buf: self.hist_tmp.clone(),
            off: 0,
        };
        let full = Region {
            buf: s.full.clone(),
            off: s.t_in * s.cin,
        };
        self.copy(&full, &tmp, n);
        self.copy(
            &tmp,
            &Region {
                buf: s.full.clone(),
                off: 0,
            },
            n,
        );
        Ok(())
    }

    /// `dst (+)= conv(s.full)` for the call's `t_in` rows.
    fn conv(
        &mut self,
        label: &str,
        c: &StreamingConv1d,
        s: &ConvState,
        dst: &Region,
        accumulate: bool,
    ) -> Result<()> {
        let spec = *c.spec();
        let t_out = s.t_in / spec.stride;
        // Windows of `k` rows, `stride` rows apart, are the rows of a matrix product
        // reading overlapping activation rows: the mat-vec or tiled kernels where they
        // take that layout (coalesced weight reads), else one invocation per output.
        let x_stride = spec.stride * spec.in_channels;
        let gw = self.b.upload_as(label, c.weight(), GpuFormat::F32)?;
        if spec.dilation == 1
            && (t_out >= MATMUL_MIN_ROWS || (gw.is_wide() && x_stride.is_multiple_of(4)))
        {
            return self.b.plan.matvec(
                self.gpu,
                &gw,
                &s.full,
                &dst.buf,
                t_out,
                &Epilogue {
                    accumulate,
                    bias: c.bias().map(<[f32]>::to_vec),
                    x_stride,
                    out_base: dst.off,
                    ..Default::default()
                },
            );
        }
        let w = self.weight(label, c.weight())?;
        let bias = match c.bias() {
            Some(b) => self.gpu.upload_f32("bias", b),
            None => self.dummy.clone(),
        };
        let flags = u32::from(accumulate) | if c.bias().is_some() { 2 } else { 0 };
        let n = t_out * spec.out_channels;
        let p = self.params([
            n as u32,
            0,
            dst.off as u32,
            spec.in_channels as u32,
            spec.out_channels as u32,
            spec.kernel_size as u32,
            spec.stride as u32,
            spec.dilation as u32,
            0,
            0,
            flags,
            0,
        ]);
        self.b.plan.dispatch_n(
            "conv1d",
            vec![
                (0, Res::Buffer(s.full.clone())),
                (1, Res::Buffer(dst.buf.clone())),
                (2, p),
                (3, Res::Buffer(w)),
                (4, Res::Buffer(bias)),
            ],
            n,
        );
        Ok(())
    }

    /// Allocates a SEANet stack's state for an input of `t` rows of `c` (and plans the
    /// histories' shifts, which go first in the program).
    fn stack_state(
        &mut self,
        label: &str,
        layers: &[LayerRef],
        t: usize,
    ) -> Result<Vec<LayerState>> {
        let mut t = t;
        let mut states = Vec::with_capacity(layers.len());
        for (i, l) in layers.iter().enumerate() {
            let name = format!("{label}.{i}");
            states.push(match l {
                LayerRef::Conv(c) => {
                    let s = self.conv_state(&name, c, t)?;
                    self.shift(&s)?;
                    t /= c.spec().stride;
                    LayerState::Conv(s)
                }
                LayerRef::Res(convs, shortcut, _) => {
                    let [a, b] = convs else {
                        return Err(Error::InvalidInput(format!(
                            "{name}: residual blocks of {} convolutions are not on the GPU",
                            convs.len()
                        )));
                    };
                    if *shortcut || b.history_len() > 0 || a.spec().stride != 1 {
                        return Err(Error::InvalidInput(format!(
                            "{name}: only identity-shortcut blocks of a convolution and a pointwise one are on the GPU"
                        )));
                    }
                    let s = self.conv_state(&name, a, t)?;
                    self.shift(&s)?;
                    let tmp = self.buffer(&name, t * a.spec().out_channels, false);
                    LayerState::Res(s, tmp)
                }
                LayerRef::ConvTr(c) => {
                    let spec = c.spec();
                    if spec.kernel_size != 2 * spec.stride {
                        return Err(Error::InvalidInput(format!(
                            "{name}: transposed convolutions on the GPU need a kernel of twice the stride ({})",
                            spec.describe()
                        )));
                    }
                    let cout = spec.out_channels;
                    let input = self.buffer(&name, t * spec.in_channels, false);
                    let cols = self.buffer(&name, t * spec.kernel_size * cout, false);
                    let tail = self.buffer(&name, spec.stride * cout, true);
                    t *= spec.stride;
                    LayerState::ConvTr(input, cols, tail)
                }
                LayerRef::Act(_) => LayerState::Act,
            });
        }
        Ok(states)
    }

    /// Where each layer's input lives: a convolution's own buffer, a transposed
    /// convolution's input buffer, or (in place) where the next layer's input lives.
    fn homes(states: &[LayerState], out: &Region) -> Vec<Region> {
        let mut homes = vec![out.clone(); states.len() + 1];
        for i in (0..states.len()).rev() {
            homes[i] = match &states[i] {
                LayerState::Conv(s) => s.input(),
                LayerState::ConvTr(input, _, _) => Region {
                    buf: input.clone(),
                    off: 0,
                },
                LayerState::Res(..) | LayerState::Act => homes[i + 1].clone(),
            };
        }
        homes
    }

    /// Plans the stack's layers from `homes[0]` (already written) into `out`.
    fn stack(
        &mut self,
        label: &str,
        layers: &[LayerRef],
        states: &[LayerState],
        homes: &[Region],
        t: usize,
    ) -> Result<()> {
        let mut t = t;
        for (i, (l, s)) in layers.iter().zip(states).enumerate() {
            let name = format!("{label}.{i}");
            let dst = &homes[i + 1];
            match (l, s) {
                (LayerRef::Conv(c), LayerState::Conv(st)) => {
                    self.conv(&name, c, st, dst, false)?;
                    t /= c.spec().stride;
                }
                (LayerRef::Act(alpha), LayerState::Act) => {
                    let c = channels(layers, i);
                    self.activate(dst, t * c, *alpha, false);
                }
                (LayerRef::Res(convs, _, alpha), LayerState::Res(st, tmp)) => {
                    // In place on `dst`: dst += b(elu(a(elu(dst)))).
                    let (a, b) = (&convs[0], &convs[1]);
                    let dim = a.spec().in_channels;
                    let p = self.params([
                        (t * dim) as u32,
                        dst.off as u32,
                        st.input().off as u32,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        alpha.to_bits(),
                    ]);
                    self.b.plan.dispatch_n(
                        "elu_copy",
                        vec![
                            (0, Res::Buffer(dst.buf.clone())),
                            (1, Res::Buffer(st.full.clone())),
                            (2, p),
                        ],
                        t * dim,
                    );
                    let mid = Region {
                        buf: tmp.clone(),
                        off: 0,
                    };
                    self.conv(&format!("{name}.a"), a, st, &mid, false)?;
                    self.activate(&mid, t * a.spec().out_channels, *alpha, false);
                    let bs = ConvState {
                        full: tmp.clone(),
                        hist: 0,
                        cin: b.spec().in_channels,
                        t_in: t,
                    };
                    self.conv(&format!("{name}.b"), b, &bs, dst, true)?;
                }
                (LayerRef::ConvTr(c), LayerState::ConvTr(input, cols, tail)) => {
                    let spec = *c.spec();
                    let (cout, s) = (spec.out_channels, spec.stride);
                    match c.kernel() {
                        (Some(m), _) => {
                            // Each input row's contribution to `k` output rows: a product.
                            let w = self.b.upload_as(&name, m, GpuFormat::F32)?;
                            self.b.plan.matvec(
                                self.gpu,
                                &w,
                                input,
                                cols,
                                t,
                                &Epilogue::default(),
                            )?;
                        }
                        (None, Some(k)) => {
                            let w = self.gpu.upload_f32(&name, k);
                            self.depthwise(input, 0, cols, &w, spec.kernel_size, cout, t);
                        }
                        _ => unreachable!("a transposed convolution has one kernel"),
                    }
                    self.overlap(cols, tail, dst, t, s, cout, c.bias())?;
                    t *= s;
                }
                _ => unreachable!("states are built from these layers"),
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn depthwise(
        &mut self,
        src: &wgpu::Buffer,
        src_off: usize,
        cols: &wgpu::Buffer,
        w: &wgpu::Buffer,
        k: usize,
        c: usize,
        t: usize,
    ) {
        let n = t * k * c;
        let p = self.params([
            n as u32,
            src_off as u32,
            0,
            k as u32,
            c as u32,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ]);
        self.b.plan.dispatch_n(
            "depthwise_cols",
            vec![
                (0, Res::Buffer(src.clone())),
                (1, Res::Buffer(cols.clone())),
                (2, p),
                (3, Res::Buffer(w.clone())),
            ],
            n,
        );
    }

    /// The transposed convolution's rows from its columns and tail, then the new tail.
    #[allow(clippy::too_many_arguments)]
    fn overlap(
        &mut self,
        cols: &wgpu::Buffer,
        tail: &wgpu::Buffer,
        dst: &Region,
        t: usize,
        s: usize,
        cout: usize,
        bias: Option<&[f32]>,
    ) -> Result<()> {
        let n = t * s * cout;
        let aux = match bias {
            Some(b) => self.gpu.upload_f32("bias", b),
            None => self.dummy.clone(),
        };
        let flags = if bias.is_some() { 2 } else { 0 };
        let p = self.params([
            n as u32,
            0,
            dst.off as u32,
            t as u32,
            s as u32,
            cout as u32,
            0,
            0,
            0,
            0,
            flags,
            0,
        ]);
        self.b.plan.dispatch_n(
            "overlap_add",
            vec![
                (0, Res::Buffer(cols.clone())),
                (1, Res::Buffer(dst.buf.clone())),
                (2, p),
                (3, Res::Buffer(tail.clone())),
                (4, Res::Buffer(aux)),
            ],
            n,
        );
        let p = self.params([
            (s * cout) as u32,
            0,
            0,
            t as u32,
            s as u32,
            cout as u32,
            0,
            0,
            0,
            0,
            0,
            0,
        ]);
        self.b.plan.dispatch_n(
            "overlap_keep",
            vec![
                (0, Res::Buffer(cols.clone())),
                (1, Res::Buffer(tail.clone())),
                (2, p),
            ],
            s * cout,
        );
        Ok(())
    }

    fn transformer<'m>(
        &mut self,
        label: &str,
        t: Option<&'m StreamingTransformer>,
    ) -> Result<Tr<'m>> {
        let t = t.ok_or_else(|| {
            Error::InvalidInput(format!(
                "{label}: transformers with input or output projections are not on the GPU"
            ))
        })?;
        // No sinusoidal embeddings (the layers add none), and a context of at least a
        // call's rows (the window of its first row).
        check_transformer(label, t, true)?;
        let (dims, _, _) = t.parts();
        if dims.context.is_none_or(|c| c < ROWS) {
            return Err(Error::InvalidInput(format!(
                "{label}: the GPU codec needs an attention context of at least {ROWS} steps"
            )));
        }
        let rings = self.b.rings(label, t, 0)?;
        let scratch = self.b.scratch(label, t, 0)?;
        let x = self.gpu.activations(label, t.d_model());
        Ok(Tr {
            t,
            rings,
            scratch,
            x,
        })
    }

    /// The transformer over `ROWS` rows from `src` into `dst`, one row at a time.
    fn transformer_rows(
        &mut self,
        label: &str,
        tr: &Tr,
        src: &Region,
        dst: &Region,
        pos: &[Res; ROWS],
    ) -> Result<()> {
        let d = tr.t.d_model();
        let x = Region {
            buf: tr.x.clone(),
            off: 0,
        };
        for (r, pos) in pos.iter().enumerate() {
            let row = Region {
                buf: src.buf.clone(),
                off: src.off + r * d,
            };
            self.copy(&row, &x, d);
            self.b
                .layers(label, tr.t, &tr.rings, &tr.scratch, &tr.x, 0, pos)?;
            let out = Region {
                buf: dst.buf.clone(),
                off: dst.off + r * d,
            };
            self.copy(&x, &out, d);
        }
        Ok(())
    }
}

/// Channels of the activations at layer `i` of a stack (what the last convolution before
/// it produced).
fn channels(layers: &[LayerRef], i: usize) -> usize {
    layers[..i]
        .iter()
        .rev()
        .find_map(|l| match l {
            LayerRef::Conv(c) => Some(c.spec().out_channels),
            LayerRef::ConvTr(c) => Some(c.spec().out_channels),
            LayerRef::Res(convs, _, _) => convs.last().map(|c| c.spec().out_channels),
            LayerRef::Act(_) => None,
        })
        .unwrap_or(1)
}

/// One direction of the codec on the GPU: its program, buffers and clock.
#[derive(Debug)]
struct Half {
    program: Program,
    input: wgpu::Buffer,
    output: wgpu::Buffer,
    read: wgpu::Buffer,
    out_bytes: u64,
    /// Buffers holding streaming state, cleared by a reset.
    state: Vec<wgpu::Buffer>,
    clock: RowClock,
    /// Position of the next frame's first transformer row.
    offset: usize,
}

impl Half {
    fn reset(&mut self, gpu: &Gpu) {
        let mut enc = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("mimi reset"),
            });
        for b in &self.state {
            enc.clear_buffer(b, 0, None);
        }
        gpu.queue.submit([enc.finish()]);
        self.offset = 0;
    }

    /// One frame: `input` in, the output's bytes back.
    fn run(&mut self, gpu: &Gpu, input: &[u8], block_stride: usize) -> Result<Vec<u8>> {
        gpu.queue.write_buffer(&self.input, 0, input);
        self.program
            .write_step_block(gpu, &self.clock.words(self.offset, block_stride));
        let mut enc = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("mimi"),
            });
        self.program.record(&mut enc);
        let mut got = gpu.submit_and_read(enc, &[(&self.output, 0, self.out_bytes)], &self.read)?;
        self.offset += ROWS;
        Ok(got.remove(0))
    }
}

/// A [`Mimi`] on the GPU: [`GpuMimi::encode_step`] and [`GpuMimi::decode_step`] as the
/// CPU's streaming steps; [`GpuMimi::halves`] splits it as [`Mimi::halves`] does.
#[derive(Debug)]
pub struct GpuMimi {
    gpu: Arc<Gpu>,
    enc: Half,
    dec: Half,
    block_stride: usize,
    frame_size: usize,
    num_codebooks: usize,
    bins: usize,
}

/// The GPU codec's streaming encoder ([`GpuMimi::halves`]).
pub struct GpuMimiEncoder<'a> {
    gpu: &'a Gpu,
    half: &'a mut Half,
    block_stride: usize,
    frame_size: usize,
}

impl GpuMimiEncoder<'_> {
    pub fn reset(&mut self) {
        self.half.reset(self.gpu);
    }

    /// One frame of `frame_size` samples to one code per active codebook.
    pub fn step(&mut self, frame: &[f32]) -> Result<Vec<u32>> {
        super::check_frame(frame, self.frame_size)?;
        let got = self
            .half
            .run(self.gpu, bytemuck::cast_slice(frame), self.block_stride)?;
        Ok(bytemuck::pod_collect_to_vec(&got))
    }
}

/// The GPU codec's streaming decoder ([`GpuMimi::halves`]).
pub struct GpuMimiDecoder<'a> {
    gpu: &'a Gpu,
    half: &'a mut Half,
    block_stride: usize,
    num_codebooks: usize,
    bins: usize,
}

impl GpuMimiDecoder<'_> {
    pub fn reset(&mut self) {
        self.half.reset(self.gpu);
    }

    /// One code per active codebook to one frame of audio.
    pub fn step(&mut self, codes: &[u32]) -> Result<Vec<f32>> {
        if codes.len() != self.num_codebooks {
            return Err(Error::InvalidInput(format!(
                "decode_step takes {} codes, got {}",
                self.num_codebooks,
                codes.len()
            )));
        }
        if let Some(bad) = codes.iter().find(|&&c| c as usize >= self.bins) {
            return Err(Error::InvalidInput(format!(
                "code {bad} is out of range: codebooks have {} entries",
                self.bins
            )));
        }
        let got = self
            .half
            .run(self.gpu, bytemuck::cast_slice(codes), self.block_stride)?;
        Ok(bytemuck::pod_collect_to_vec(&got))
    }
}

impl GpuMimi {
    /// Uploads `mimi` (its active codebooks) and plans both programs.
    pub fn new(gpu: &Arc<Gpu>, mimi: &Mimi) -> Result<Self> {
        let frame = mimi.frame_size();
        let n = mimi.num_codebooks;
        let (Some(down), Some(up)) = (&mimi.downsample, &mimi.upsample) else {
            return Err(Error::InvalidInput(
                "a Mimi without down- and upsampling is not on the GPU".into(),
            ));
        };
        let dim = mimi.cfg.seanet.dimension;
        let hop = mimi.cfg.hop_length();
        if frame != ROWS * hop {
            return Err(Error::InvalidInput(format!(
                "the GPU codec runs frames of {ROWS} encoder rows; this Mimi's frame is {frame} samples at a hop of {hop}"
            )));
        }
        let align = (gpu.limits.min_uniform_buffer_offset_alignment as usize).max(16);
        let block_stride = STEP_BLOCK_BYTES.next_multiple_of(align);
        // Histories move through this scratch: the largest is a few thousand values.
        let max_hist = 1 << 16;
        let mut p = Planner {
            b: Builder::new(gpu, Plan::new(gpu, ROWS * block_stride), GpuFormat::F32),
            gpu,
            state: vec![],
            hist_tmp: gpu.activations("history", max_hist),
            dummy: gpu.upload_f32("none", &[0.0; 4]),
        };
        let pos: [Res; ROWS] = std::array::from_fn(|r| p.b.plan.step_block_at(r, STEP_BLOCK_BYTES));

        // The encoder: audio, SEANet, transformer, downsampler, quantizer.
        let enc_layers = mimi.encoder.layer_refs();
        let enc_states = p.stack_state("encoder", &enc_layers, frame)?;
        let down_state = p.conv_state("downsample", down, ROWS)?;
        p.shift(&down_state)?;
        let tr_in = p.gpu.activations("encoder rows", ROWS * dim);
        let tr_in = Region { buf: tr_in, off: 0 };
        let homes = Planner::homes(&enc_states, &tr_in);
        let pcm_in = gpu.activations("pcm in", frame);
        p.copy(
            &Region {
                buf: pcm_in.clone(),
                off: 0,
            },
            &homes[0],
            frame,
        );
        p.stack("encoder", &enc_layers, &enc_states, &homes, frame)?;
        let enc_tr = p.transformer(
            "encoder_transformer",
            mimi.encoder_transformer.unprojected(),
        )?;
        p.transformer_rows(
            "encoder_transformer",
            &enc_tr,
            &tr_in,
            &down_state.input(),
            &pos,
        )?;
        if down.spec().pad_mode == PadMode::Replicate && down_state.hist > 0 {
            let n = down_state.hist * dim;
            let params = p.params([
                n as u32,
                0,
                0,
                down_state.hist as u32,
                dim as u32,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ]);
            p.b.plan.dispatch_n(
                "replicate_fill",
                vec![
                    (1, Res::Buffer(down_state.full.clone())),
                    (2, params),
                    (5, pos[0].clone()),
                ],
                n,
            );
        }
        let latent = p.gpu.activations("latent", dim);
        p.conv(
            "downsample",
            down,
            &down_state,
            &Region {
                buf: latent.clone(),
                off: 0,
            },
            false,
        )?;
        let tokens = gpu.activations("codes", n.max(1));
        let (first, rest) = mimi.quantizer.parts();
        let n_sem = first.codebooks.len();
        let bins = mimi.quantizer.bins();
        let scores = p.gpu.activations("scores", bins);
        let mut tables = vec![];
        for (k, (rvq, slot0, count)) in [
            (&first, 0, n.min(n_sem)),
            (&rest, n_sem, n.saturating_sub(n_sem)),
        ]
        .into_iter()
        .enumerate()
        {
            let mut books = vec![];
            for (q, (rows, norms)) in rvq.codebooks.iter().take(count).enumerate() {
                let g = GpuWeight::upload(
                    gpu,
                    "codebook",
                    rows,
                    bins,
                    rvq.dim,
                    GpuFormat::F32,
                    gpu.max_binding_bytes(),
                )?;
                let norms = gpu.upload_f32("norms", norms);
                books.push((g, norms, slot0 + q));
            }
            if count > 0 {
                let w_in =
                    p.b.upload_as(&format!("rvq{k}.in"), rvq.input_proj, GpuFormat::F32)?;
                let residual = p.gpu.activations("residual", rvq.dim);
                p.b.plan
                    .matvec(gpu, &w_in, &latent, &residual, 1, &Epilogue::default())?;
                for (q, (g, norms, slot)) in books.iter().take(count).enumerate() {
                    p.b.plan
                        .matvec(gpu, g, &residual, &scores, 1, &Epilogue::default())?;
                    let params =
                        p.params([bins as u32, 0, 0, *slot as u32, 0, 0, 0, 0, 0, 0, 0, 0]);
                    p.b.plan.dispatch(
                        "rvq_argmin",
                        vec![
                            (0, Res::Buffer(scores.clone())),
                            (2, params),
                            (4, Res::Buffer(norms.clone())),
                            (6, Res::Buffer(tokens.clone())),
                        ],
                        [1, 1, 1],
                    );
                    if q + 1 < count {
                        centroid(&mut p, g, &residual, rvq.dim, *slot, 0, &tokens)?;
                    }
                }
            }
            tables.push(books);
        }
        let enc_state = std::mem::take(&mut p.state);
        let encoder =
            std::mem::replace(&mut p.b.plan, Plan::new(gpu, ROWS * block_stride)).build(gpu)?;

        // The decoder: the quantizer's sums, upsampler, transformer, SEANet.
        let codes_in = gpu.activations("codes in", n.max(1));
        let dec_layers = mimi.decoder.layer_refs();
        let dec_states = p.stack_state("decoder", &dec_layers, ROWS)?;
        let pcm_out = gpu.activations("pcm out", frame);
        let homes = Planner::homes(
            &dec_states,
            &Region {
                buf: pcm_out.clone(),
                off: 0,
            },
        );
        let y = p.gpu.activations("latent out", dim);
        let mut wrote_y = false;
        for (k, (rvq, books)) in [&first, &rest].into_iter().zip(&tables).enumerate() {
            let used: Vec<_> = books.iter().collect();
            if used.is_empty() {
                continue;
            }
            let sum = p.gpu.activations("sum", rvq.dim);
            for (i, (g, _, slot)) in used.iter().enumerate() {
                let flags = if i == 0 { 2 } else { 1 };
                centroid(&mut p, g, &sum, rvq.dim, *slot, flags, &codes_in)?;
            }
            let w_out =
                p.b.upload_as(&format!("rvq{k}.out"), rvq.output_proj, GpuFormat::F32)?;
            p.b.plan.matvec(
                gpu,
                &w_out,
                &sum,
                &y,
                1,
                &Epilogue {
                    accumulate: wrote_y,
                    ..Default::default()
                },
            )?;
            wrote_y = true;
        }
        let up_spec = *up.spec();
        let (None, Some(up_kernel)) = up.kernel() else {
            return Err(Error::InvalidInput(
                "Mimi's upsampler on the GPU is depthwise".into(),
            ));
        };
        let up_w = gpu.upload_f32("upsample", up_kernel);
        let up_cols = p
            .gpu
            .activations("upsample cols", up_spec.kernel_size * dim);
        let up_tail = p.buffer("upsample tail", up_spec.stride * dim, true);
        p.depthwise(&y, 0, &up_cols, &up_w, up_spec.kernel_size, dim, 1);
        let dec_rows = Region {
            buf: p.gpu.activations("decoder rows", ROWS * dim),
            off: 0,
        };
        p.overlap(
            &up_cols,
            &up_tail,
            &dec_rows,
            1,
            up_spec.stride,
            dim,
            up.bias(),
        )?;
        let dec_tr = p.transformer(
            "decoder_transformer",
            mimi.decoder_transformer.unprojected(),
        )?;
        p.transformer_rows("decoder_transformer", &dec_tr, &dec_rows, &homes[0], &pos)?;
        p.stack("decoder", &dec_layers, &dec_states, &homes, ROWS)?;
        let dec_state = std::mem::take(&mut p.state);
        let decoder = p.b.plan.build(gpu)?;
        let read = |bytes: usize| gpu.readback_buffer(bytes as u64);
        Ok(Self {
            gpu: gpu.clone(),
            enc: Half {
                program: encoder,
                input: pcm_in,
                output: tokens,
                read: read(n * 4),
                out_bytes: (n * 4) as u64,
                state: enc_state,
                clock: RowClock::of(enc_tr.t, ROWS),
                offset: 0,
            },
            dec: Half {
                program: decoder,
                input: codes_in,
                output: pcm_out,
                read: read(frame * 4),
                out_bytes: (frame * 4) as u64,
                state: dec_state,
                clock: RowClock::of(dec_tr.t, ROWS),
                offset: 0,
            },
            block_stride,
            frame_size: frame,
            num_codebooks: n,
            bins,
        })
    }

    /// `mimi` on `gpu` where a model runs on one, else (or where the upload fails) None;
    /// with the words a device line gives it ("Mimi on the GPU", or on the CPU and why).
    /// `PARLEY_MIMI=cpu` keeps the codec on the CPU (any other value is said and
    /// ignored).
    pub fn beside(gpu: Option<&Arc<Gpu>>, mimi: &Mimi) -> (Option<Self>, String) {
        let (gpu, note) = match std::env::var("PARLEY_MIMI").as_deref() {
            Ok("cpu") => (
                None,
                if gpu.is_some() {
                    " (PARLEY_MIMI=cpu)"
                } else {
                    ""
                }
                .to_string(),
            ),
            Ok("gpu") | Err(_) => (gpu, String::new()),
            Ok(other) => (gpu, format!(" (PARLEY_MIMI=`{other}` ignored: cpu or gpu)")),
        };
        let (m, line) = match gpu {
            Some(g) => match Self::new(g, mimi) {
                Ok(m) => (Some(m), "Mimi on the GPU".to_string()),
                Err(e) => (None, format!("Mimi on the CPU ({e})")),
            },
            None => (None, "Mimi on the CPU".to_string()),
        };
        (m, format!("{line}{note}"))
    }

    /// Kernel dispatches of one encoder and one decoder frame.
    pub fn dispatches(&self) -> (usize, usize) {
        (
            self.enc.program.dispatch_count(),
            self.dec.program.dispatch_count(),
        )
    }

    /// The encoder and the decoder, each with its own state, for stages of their own.
    pub fn halves(&mut self) -> (GpuMimiEncoder<'_>, GpuMimiDecoder<'_>) {
        (
            GpuMimiEncoder {
                gpu: &self.gpu,
                half: &mut self.enc,
                block_stride: self.block_stride,
                frame_size: self.frame_size,
            },
            GpuMimiDecoder {
                gpu: &self.gpu,
                half: &mut self.dec,
                block_stride: self.block_stride,
                num_codebooks: self.num_codebooks,
                bins: self.bins,
            },
        )
    }

    pub fn reset(&mut self) {
        let (mut e, mut d) = self.halves();
        e.reset();
        d.reset();
    }

    /// One frame of `frame_size` samples to one code per active codebook.
    pub fn encode_step(&mut self, frame: &[f32]) -> Result<Vec<u32>> {
        self.halves().0.step(frame)
    }

    /// One code per active codebook to one frame of audio.
    pub fn decode_step(&mut self, codes: &[u32]) -> Result<Vec<f32>> {
        self.halves().1.step(codes)
    }
}

/// A codebook's centroid for the code in `tokens[slot]`, taken from `dst` (flags 0),
/// added to it (1) or written to it (2).
#[allow(clippy::too_many_arguments)]
fn centroid(
    p: &mut Planner,
    g: &GpuWeight,
    dst: &wgpu::Buffer,
    dim: usize,
    slot: usize,
    flags: u32,
    tokens: &wgpu::Buffer,
) -> Result<()> {
    let (buf, _, _) = g
        .chunks()
        .next()
        .ok_or_else(|| Error::InvalidInput("an empty codebook".into()))?;
    let params = p.params([dim as u32, 0, 0, slot as u32, 0, 0, 0, 0, 0, 0, flags, 0]);
    p.b.plan.dispatch_n(
        "rvq_centroid",
        vec![
            (1, Res::Buffer(dst.clone())),
            (2, params),
            (3, Res::Buffer(buf.clone())),
            (6, Res::Buffer(tokens.clone())),
        ],
        dim,
    );
    Ok(())
}
