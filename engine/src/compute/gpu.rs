//! The wgpu runtime: adapter and device selection with the CPU as the fallback, and the
//! compute kernels of `shaders/` (WGSL, embedded at build time).
//!
//! `--device auto` takes a hardware GPU and otherwise the CPU path; `--device gpu` takes
//! the best adapter there is, a software one (Mesa's lavapipe) included; `--device cpu`
//! never touches wgpu. Either way one log line says what runs. The device is created with
//! the adapter's own limits.

use std::collections::HashMap;
use std::sync::Arc;

use wgpu::util::DeviceExt;

pub use super::gpu_matvec::{MatvecInput, MatvecShape};
use crate::{Error, Result};

/// The WGSL sources, one kernel family per file.
pub const SHADERS: &[(&str, &str)] = &[
    ("matvec.wgsl", include_str!("../../../shaders/matvec.wgsl")),
    ("norm.wgsl", include_str!("../../../shaders/norm.wgsl")),
    (
        "attention.wgsl",
        include_str!("../../../shaders/attention.wgsl"),
    ),
    (
        "elementwise.wgsl",
        include_str!("../../../shaders/elementwise.wgsl"),
    ),
    ("sample.wgsl", include_str!("../../../shaders/sample.wgsl")),
    ("mimi.wgsl", include_str!("../../../shaders/mimi.wgsl")),
    ("matmul.wgsl", include_str!("../../../shaders/matmul.wgsl")),
];

/// Shader templates, expanded at run time (`tests/gpu_kernels.rs` validates every
/// expansion).
pub const TEMPLATES: &[&str] = &["matvec_wide.wgsl"];

/// Every entry point Parley dispatches, with its file: one pipeline each, built when the
/// device opens.
const ENTRY_POINTS: &[(&str, &str)] = &[
    ("matvec.wgsl", "matvec_f32"),
    ("matvec.wgsl", "matvec_f16"),
    ("matvec.wgsl", "matvec_bf16"),
    ("matvec.wgsl", "matvec_q8_0"),
    ("matvec.wgsl", "matvec_q4"),
    ("norm.wgsl", "rms_norm"),
    ("norm.wgsl", "layer_norm"),
    ("attention.wgsl", "rope_store"),
    ("attention.wgsl", "attend_part"),
    ("attention.wgsl", "attend_combine"),
    ("elementwise.wgsl", "gate_silu"),
    ("elementwise.wgsl", "embed_sum"),
    ("elementwise.wgsl", "embed_add"),
    ("elementwise.wgsl", "add_vec"),
    ("attention.wgsl", "cross_attend"),
    ("sample.wgsl", "tts_feed"),
    ("elementwise.wgsl", "softmax_small"),
    ("sample.wgsl", "sample"),
    ("mimi.wgsl", "conv1d"),
    ("mimi.wgsl", "copy_values"),
    ("mimi.wgsl", "elu_copy"),
    ("mimi.wgsl", "activate"),
    ("mimi.wgsl", "replicate_fill"),
    ("mimi.wgsl", "overlap_add"),
    ("mimi.wgsl", "overlap_keep"),
    ("mimi.wgsl", "depthwise_cols"),
    ("mimi.wgsl", "rvq_argmin"),
    ("mimi.wgsl", "rvq_centroid"),
    ("matmul.wgsl", "matmul"),
];

/// Activation rows from which a product runs as a tiled matrix-matrix product
/// (`matmul.wgsl`: each weight read once per 16 rows) instead of a mat-vec per row.
pub const MATMUL_MIN_ROWS: usize = 8;

/// What `--device` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// A hardware GPU if there is one, else the CPU.
    #[default]
    Auto,
    /// The best GPU adapter, software ones included; an error if there is none.
    Gpu,
    Cpu,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "gpu" => Ok(Self::Gpu),
            "cpu" => Ok(Self::Cpu),
            other => Err(format!("unknown device `{other}` (auto, gpu or cpu)")),
        }
    }
}

/// Where the models run.
#[derive(Debug, Clone)]
pub enum Backend {
    Cpu,
    Gpu(Arc<Gpu>),
}

impl Backend {
    /// The GPU, when this is one.
    pub fn gpu(&self) -> Option<&Arc<Gpu>> {
        match self {
            Self::Gpu(g) => Some(g),
            Self::Cpu => None,
        }
    }
}

/// An open GPU device with Parley's pipelines.
#[derive(Debug)]
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pipelines: HashMap<&'static str, wgpu::ComputePipeline>,
    /// Whether the device was opened with subgroup operations (wgpu's SUBGROUP feature).
    pub subgroups: bool,
    /// Whether it was opened with f16 arithmetic in shaders (SHADER_F16).
    pub shader_f16: bool,
    /// The wide matrix-vector pipelines built so far, by format and shape.
    wide: std::sync::Mutex<HashMap<(GpuFormat, MatvecShape), wgpu::ComputePipeline>>,
    /// The shape chosen for each weight format, and how it was chosen.
    shapes: std::sync::Mutex<HashMap<GpuFormat, (MatvecShape, String)>>,
    /// Errors wgpu reported outside any call that returns one (validation, memory):
    /// collected here instead of wgpu's default panic, and turned into an `Error` by
    /// [`Gpu::check`].
    errors: Arc<std::sync::Mutex<Vec<String>>>,
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 4,
        wgpu::DeviceType::IntegratedGpu => 3,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 1,
        wgpu::DeviceType::Cpu => 0,
    }
}

/// The backends searched for a device: Vulkan, Metal and DX12 (wgpu's primary ones), or
/// what `WGPU_BACKEND` names. Not GL: its compute support is partial (no subgroups, smaller
/// storage limits) and the kernels are neither written nor tested for it.
pub fn backends() -> wgpu::Backends {
    wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY)
}

/// Picks and opens the device for `choice` among the backends of [`backends`]. Returns the
/// backend and the line to log.
///
/// One wgpu device per process: while a device opened here is alive (held by a model), a
/// later call that it satisfies shares it instead of opening another, so the models of a
/// session (and of the next) share one device, its memory and its pipelines.
pub fn select_device(choice: DeviceChoice) -> Result<(Backend, String)> {
    static SHARED: std::sync::Mutex<Option<(std::sync::Weak<Gpu>, String)>> =
        std::sync::Mutex::new(None);
    if choice == DeviceChoice::Cpu {
        return select(choice, backends());
    }
    let mut shared = SHARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((gpu, line)) = shared.as_ref().and_then(|(w, l)| Some((w.upgrade()?, l))) {
        // `auto` takes only hardware; `gpu` takes whatever is open.
        if choice == DeviceChoice::Gpu || gpu.info.device_type != wgpu::DeviceType::Cpu {
            return Ok((Backend::Gpu(gpu), line.clone()));
        }
    }
    let (backend, line) = select(choice, backends())?;
    if let Backend::Gpu(g) = &backend {
        *shared = Some((Arc::downgrade(g), line.clone()));
    }
    Ok((backend, line))
}

/// What `--device auto` and `--device gpu` would each run on, one line apiece (for
/// `parley devices` and the window's compute panel).
pub fn describe_choices() -> Vec<String> {
    [DeviceChoice::Auto, DeviceChoice::Gpu]
        .into_iter()
        .map(|c| {
            let name = format!("{c:?}").to_lowercase();
            match select_device(c) {
                Ok((_, line)) => format!("{name}: {line}"),
                Err(e) => format!("{name}: {e}"),
            }
        })
        .collect()
}

/// Picks and opens the device for `choice` among the adapters of `backends`. Returns the
/// backend and the line to log.
pub fn select(choice: DeviceChoice, backends: wgpu::Backends) -> Result<(Backend, String)> {
    if choice == DeviceChoice::Cpu {
        return Ok((Backend::Cpu, "device: CPU (--device cpu)".into()));
    }
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    let instance = wgpu::Instance::new(desc);
    let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
    adapters.sort_by_key(|a| std::cmp::Reverse(rank(a.get_info().device_type)));
    let names: Vec<String> = adapters
        .iter()
        .map(|a| {
            let i = a.get_info();
            format!("{} ({:?}, {:?})", i.name, i.device_type, i.backend)
        })
        .collect();
    let pick = adapters
        .into_iter()
        .find(|a| choice == DeviceChoice::Gpu || a.get_info().device_type != wgpu::DeviceType::Cpu);
    match (pick, choice) {
        (Some(adapter), _) => {
            let gpu = Gpu::open(adapter)?;
            let line = format!(
                "device: GPU {} ({:?}, {:?} backend)",
                gpu.info.name, gpu.info.device_type, gpu.info.backend
            );
            Ok((Backend::Gpu(Arc::new(gpu)), line))
        }
        (None, DeviceChoice::Gpu) => Err(Error::NoGpu(if names.is_empty() {
            "no GPU adapter found (is a Vulkan, Metal or DX12 driver installed?)".into()
        } else {
            format!("no usable GPU adapter among: {}", names.join("; "))
        })),
        (None, _) => Ok((
            Backend::Cpu,
            if names.is_empty() {
                "device: CPU (no GPU adapter found; install a Vulkan, Metal or DX12 driver to use a GPU)".into()
            } else {
                format!(
                    "device: CPU (only software adapters found: {}; --device gpu uses them)",
                    names.join("; ")
                )
            },
        )),
    }
}

impl Gpu {
    fn open(adapter: wgpu::Adapter) -> Result<Self> {
        let info = adapter.get_info();
        let limits = adapter.limits();
        // Subgroup operations where the adapter has them (the wide kernels' reductions),
        // and f16 arithmetic (a candidate shape for f16 weights).
        let features = adapter.features() & (wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("parley"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::NoGpu(format!("opening {}: {e}", info.name)))?;
        let errors: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let modules: HashMap<&str, wgpu::ShaderModule> = SHADERS
            .iter()
            .map(|(name, src)| {
                let m = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(name),
                    source: wgpu::ShaderSource::Wgsl((*src).into()),
                });
                (*name, m)
            })
            .collect();
        let pipelines = ENTRY_POINTS
            .iter()
            .map(|&(file, entry)| {
                let p = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry),
                    layout: None,
                    module: &modules[file],
                    entry_point: Some(entry),
                    compilation_options: Default::default(),
                    cache: None,
                });
                (entry, p)
            })
            .collect();
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::NoGpu(format!(
                "{}: Parley's kernels do not build on this adapter: {e}",
                info.name
            )));
        }
        Ok(Self {
            device,
            queue,
            info,
            limits,
            pipelines,
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            wide: Default::default(),
            shapes: Default::default(),
            errors,
        })
    }

    /// Fails with the errors wgpu reported since the last check, if any.
    pub fn check(&self) -> Result<()> {
        let mut v = self
            .errors
            .lock()
            .map_err(|_| Error::InvalidInput("GPU error log poisoned".into()))?;
        if v.is_empty() {
            return Ok(());
        }
        let msg = v.join("; ");
        v.clear();
        Err(Error::InvalidInput(format!(
            "GPU error on {}: {msg}",
            self.info.name
        )))
    }

    fn pipeline(&self, entry: &str) -> Result<&wgpu::ComputePipeline> {
        self.pipelines
            .get(entry)
            .ok_or_else(|| Error::InvalidInput(format!("no GPU kernel `{entry}`")))
    }

    /// The wide matrix-vector pipeline of `format` in `shape`, built on first use.
    pub fn wide_pipeline(
        &self,
        format: GpuFormat,
        shape: MatvecShape,
    ) -> Result<wgpu::ComputePipeline> {
        if shape.f16 && !self.shader_f16 {
            return Err(Error::InvalidInput(format!(
                "{}: matvec shape {shape} needs f16 arithmetic, which this adapter lacks",
                self.info.name
            )));
        }
        if shape.subgroups && !self.subgroups {
            return Err(Error::InvalidInput(format!(
                "{}: matvec shape {shape} needs subgroup operations, which this adapter lacks",
                self.info.name
            )));
        }
        let mut built = self.wide.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = built.get(&(format, shape)) {
            return Ok(p.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("matvec_wide"),
                source: wgpu::ShaderSource::Wgsl(shape.source().into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(format.entry()),
                layout: None,
                module: &module,
                entry_point: Some(format.entry()),
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::InvalidInput(format!(
                "{}: the {format} matvec kernel in shape {shape} does not build: {e}",
                self.info.name
            )));
        }
        built.insert((format, shape), pipeline.clone());
        Ok(pipeline)
    }

    /// The shape wide products of `format` run in on this adapter, and how it was chosen:
    /// `PARLEY_GPU_MATVEC` if set, else on a hardware adapter the fastest candidate of
    /// [`Gpu::tune_matvec`] (timed once per format and process), else the default.
    pub fn matvec_shape(&self, format: GpuFormat) -> Result<(MatvecShape, String)> {
        if let Some(s) = self
            .shapes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&format)
        {
            return Ok(s.clone());
        }
        let chosen = if let Ok(v) = std::env::var("PARLEY_GPU_MATVEC") {
            let mut shape = MatvecShape::parse(&v, self.subgroups, self.shader_f16)
                .map_err(Error::InvalidInput)?;
            // f16 products are for f16 weights only.
            shape.f16 &= format == GpuFormat::F16;
            (shape, "PARLEY_GPU_MATVEC".to_string())
        } else if self.info.device_type == wgpu::DeviceType::Cpu {
            (
                MatvecShape::default_for(self.subgroups),
                "default (software adapter: not tuned)".to_string(),
            )
        } else {
            let timed = self.tune_matvec(format)?;
            let (best, gbs) = timed
                .iter()
                .copied()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .ok_or_else(|| Error::InvalidInput("no matvec shape to tune".into()))?;
            (best, format!("tuned: {gbs:.0} GB/s"))
        };
        self.shapes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(format, chosen.clone());
        Ok(chosen)
    }

    /// Times every candidate shape for `format` on synthetic weights larger than any GPU
    /// cache (four matrices of up to 48 MB, 4096 columns, read four times each per run;
    /// the best of three runs) and returns each shape with its weight GB/s.
    pub fn tune_matvec(&self, format: GpuFormat) -> Result<Vec<(MatvecShape, f64)>> {
        let cols = 4096;
        let row_bytes = format.row_bytes(cols) as u64;
        let bytes = (48u64 << 20).min(self.max_binding_bytes() - 4);
        let rows = ((bytes / row_bytes) as usize / 4 * 4).max(4);
        let mut seed = 0x2545_f491u32;
        let weights: Vec<GpuWeight> = (0..4)
            .map(|_| {
                let words: Vec<u32> = (0..(rows * format.row_words(cols) + rows * cols / 64 + 1)
                    .next_multiple_of(4))
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 17;
                        seed ^= seed << 5;
                        // Finite halves and floats whatever the format: exponents kept small.
                        seed & 0x3bff_3bff
                    })
                    .collect();
                GpuWeight::from_words(self, format, rows, cols, &words)
            })
            .collect();
        let x = self.upload_f32("tune x", &vec![0.01; cols]);
        let out = self.activations("tune out", rows);
        let mut timed = vec![];
        for shape in MatvecShape::candidates_for(format, self.subgroups, self.shader_f16) {
            let mut plan = Plan::new(self, 0);
            for _ in 0..4 {
                for w in &weights {
                    plan.matvec_shaped(self, w, &x, &out, 1, &Epilogue::default(), Some(shape))?;
                }
            }
            // A candidate this driver cannot build is left out (a subgroup kernel, say),
            // not the end of the model's load.
            let program = match plan.build(self) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("matvec shape {shape} left out on {}: {e}", self.info.name);
                    continue;
                }
            };
            let mut best = f64::INFINITY;
            for run in 0..4 {
                let t = std::time::Instant::now();
                let mut enc = self
                    .device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("tune"),
                    });
                program.record(&mut enc);
                self.queue.submit([enc.finish()]);
                self.device
                    .poll(wgpu::PollType::wait_indefinitely())
                    .map_err(|e| Error::InvalidInput(format!("GPU poll failed: {e}")))?;
                // The first run builds and warms; it is not counted.
                if run > 0 {
                    best = best.min(t.elapsed().as_secs_f64());
                }
            }
            self.check()?;
            let read = 16.0 * weights[0].size_in_bytes() as f64;
            timed.push((shape, read / best / 1e9));
        }
        Ok(timed)
    }

    /// The largest storage binding this device allows (and so the largest chunk a
    /// tensor is split into).
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// A buffer of `bytes` (at least 4) zeroed by wgpu.
    pub fn buffer(&self, label: &str, bytes: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4).next_multiple_of(4),
            usage,
            mapped_at_creation: false,
        })
    }

    /// A storage buffer of `n` f32 activations.
    pub fn activations(&self, label: &str, n: usize) -> wgpu::Buffer {
        self.buffer(
            label,
            (n * 4) as u64,
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        )
    }

    /// A read-only storage buffer holding `words`.
    pub fn upload_words(&self, label: &str, words: &[u32]) -> wgpu::Buffer {
        let zero = [0u32];
        let contents: &[u32] = if words.is_empty() { &zero } else { words };
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::cast_slice(contents),
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            })
    }

    /// A read-only storage buffer of f32 values.
    pub fn upload_f32(&self, label: &str, v: &[f32]) -> wgpu::Buffer {
        self.upload_words(label, bytemuck::cast_slice(v))
    }

    /// Submits `enc` with copies of `(buffer, offset, bytes)` regions appended into one
    /// readback buffer, waits, and returns the regions' bytes in order.
    pub fn submit_and_read(
        &self,
        mut enc: wgpu::CommandEncoder,
        regions: &[(&wgpu::Buffer, u64, u64)],
        read: &wgpu::Buffer,
    ) -> Result<Vec<Vec<u8>>> {
        let mut at = 0u64;
        let mut spans = Vec::with_capacity(regions.len());
        for &(buf, off, bytes) in regions {
            enc.copy_buffer_to_buffer(buf, off, read, at, bytes);
            spans.push((at, bytes));
            at += bytes.next_multiple_of(8);
        }
        if at > read.size() {
            return Err(Error::InvalidInput(format!(
                "GPU readback of {at} bytes into a buffer of {}",
                read.size()
            )));
        }
        self.queue.submit([enc.finish()]);
        let slice = read.slice(..at.max(8));
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::InvalidInput(format!("GPU poll failed: {e}")))?;
        rx.recv()
            .map_err(|_| Error::InvalidInput("GPU readback was dropped".into()))?
            .map_err(|e| Error::InvalidInput(format!("GPU readback failed: {e}")))?;
        let out = {
            let data = slice
                .get_mapped_range()
                .map_err(|e| Error::InvalidInput(format!("GPU readback failed: {e}")))?;
            spans
                .iter()
                .map(|&(a, n)| data[a as usize..(a + n) as usize].to_vec())
                .collect()
        };
        read.unmap();
        self.check()?;
        Ok(out)
    }

    /// Times copies of a `bytes` buffer on the device and returns (read + write) GB/s: the
    /// probe printed beside the LM benchmark's figures (wgpu cannot ask a GPU for its
    /// memory bandwidth).
    pub fn measure_copy_bandwidth_gbs(&self, bytes: u64) -> Result<f64> {
        let bytes = bytes.min(self.limits.max_buffer_size) / 4 * 4;
        let usage = wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let a = self.buffer("probe a", bytes, usage);
        let b = self.buffer("probe b", bytes, usage);
        let run = |n: usize| -> Result<f64> {
            let t = std::time::Instant::now();
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("probe"),
                });
            for _ in 0..n {
                enc.copy_buffer_to_buffer(&a, 0, &b, 0, bytes);
            }
            self.queue.submit([enc.finish()]);
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| Error::InvalidInput(format!("GPU poll failed: {e}")))?;
            Ok(t.elapsed().as_secs_f64())
        };
        run(1)?;
        let secs = run(8)?;
        self.check()?;
        Ok(8.0 * 2.0 * bytes as f64 / secs / 1e9)
    }

    /// A buffer the CPU maps to read results (`bytes` at most per submit).
    pub fn readback_buffer(&self, bytes: u64) -> wgpu::Buffer {
        self.buffer(
            "readback",
            bytes.next_multiple_of(8),
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )
    }
}

/// How a weight matrix is held on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GpuFormat {
    /// Exact: the parity reference.
    #[default]
    F32,
    F16,
    /// Published checkpoints are bf16: this holds them without rounding.
    Bf16,
    /// Blocks of 32 int8 sharing one f16 scale (GGML's q8_0 arithmetic, 8.5 bits a weight).
    Q8_0,
    /// Blocks of 32 4-bit values sharing one f16 scale, `w = (q - 8) * scale` (GGML's
    /// q4_0 arithmetic, 4.5 bits a weight).
    Q4,
}

impl std::str::FromStr for GpuFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "q4" | "q4_0" => Ok(Self::Q4),
            other => Err(format!(
                "unknown GPU weight format `{other}` (f32, f16, bf16, q8_0 or q4)"
            )),
        }
    }
}

impl std::fmt::Display for GpuFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4 => "q4",
        })
    }
}

const QBLOCK: usize = 32;

impl GpuFormat {
    /// The format a `[rows, cols]` matrix actually gets: quantized ones need whole blocks
    /// of 32 per row (else f16), half-precision ones an even row (else f32).
    pub fn for_cols(self, cols: usize) -> GpuFormat {
        match self {
            Self::Q8_0 | Self::Q4 if !cols.is_multiple_of(QBLOCK) => Self::F16.for_cols(cols),
            Self::F16 | Self::Bf16 if !cols.is_multiple_of(2) => Self::F32,
            f => f,
        }
    }

    fn entry(self) -> &'static str {
        match self {
            Self::F32 => "matvec_f32",
            Self::F16 => "matvec_f16",
            Self::Bf16 => "matvec_bf16",
            Self::Q8_0 => "matvec_q8_0",
            Self::Q4 => "matvec_q4",
        }
    }

    /// 32-bit words holding one row of `cols` values (scales of quantized rows aside).
    fn row_words(self, cols: usize) -> usize {
        match self {
            Self::F32 => cols,
            Self::F16 | Self::Bf16 => cols / 2,
            Self::Q8_0 => cols / 4,
            Self::Q4 => cols / 8,
        }
    }

    /// Bytes per row, scales included.
    fn row_bytes(self, cols: usize) -> usize {
        let scales = match self {
            Self::Q8_0 | Self::Q4 => cols / QBLOCK * 2,
            _ => 0,
        };
        self.row_words(cols) * 4 + scales
    }

    /// Packs row-major `rows x cols` f32 weights (format already fitted with
    /// [`Self::for_cols`]) into the words the kernels read: the rows, then (quantized)
    /// the block scales. Returns the words and the index of the first scale word.
    pub fn pack(self, w: &[f32], cols: usize) -> (Vec<u32>, usize) {
        let rows = w.len() / cols.max(1);
        let body = rows * self.row_words(cols);
        match self {
            Self::F32 => (w.iter().map(|v| v.to_bits()).collect(), body),
            Self::F16 => (
                w.chunks_exact(2)
                    .map(|p| {
                        u32::from(half::f16::from_f32(p[0]).to_bits())
                            | (u32::from(half::f16::from_f32(p[1]).to_bits()) << 16)
                    })
                    .collect(),
                body,
            ),
            Self::Bf16 => (
                w.chunks_exact(2)
                    .map(|p| {
                        u32::from(half::bf16::from_f32(p[0]).to_bits())
                            | (u32::from(half::bf16::from_f32(p[1]).to_bits()) << 16)
                    })
                    .collect(),
                body,
            ),
            Self::Q8_0 | Self::Q4 => {
                let mut words = Vec::with_capacity(body + rows * cols / QBLOCK / 2 + 1);
                let mut scales = Vec::with_capacity(rows * cols / QBLOCK);
                for block in w.chunks_exact(QBLOCK) {
                    let (scale, q) = quantize_block(self, block);
                    scales.push(scale);
                    if self == Self::Q8_0 {
                        words.extend(q.chunks_exact(4).map(|b| {
                            b.iter()
                                .enumerate()
                                .fold(0u32, |acc, (i, &v)| acc | (u32::from(v as u8) << (8 * i)))
                        }));
                    } else {
                        words.extend(q.chunks_exact(8).map(|b| {
                            b.iter()
                                .enumerate()
                                .fold(0u32, |acc, (i, &v)| acc | (((v + 8) as u32) << (4 * i)))
                        }));
                    }
                }
                words.extend(scales.chunks(2).map(|p| {
                    u32::from(p[0].to_bits())
                        | (u32::from(p.get(1).copied().unwrap_or(half::f16::ZERO).to_bits()) << 16)
                }));
                (words, body)
            }
        }
    }

    /// The values the GPU computes with for `w` in this format: what a kernel's output is
    /// checked against.
    pub fn round_trip(self, w: &[f32]) -> Vec<f32> {
        match self {
            Self::F32 => w.to_vec(),
            Self::F16 => w.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
            Self::Bf16 => w
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect(),
            Self::Q8_0 | Self::Q4 => w
                .chunks_exact(QBLOCK)
                .flat_map(|block| {
                    let (scale, q) = quantize_block(self, block);
                    let s = scale.to_f32();
                    q.into_iter().map(move |v| f32::from(v) * s)
                })
                .collect(),
        }
    }
}

/// One block's f16 scale and its values as signed integers (q8_0: -127..=127; q4: -8..=7).
fn quantize_block(format: GpuFormat, block: &[f32]) -> (half::f16, Vec<i8>) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let levels = if format == GpuFormat::Q8_0 {
        127.0
    } else {
        8.0
    };
    // q4 as GGML's q4_0: the largest magnitude maps to -8, keeping its sign.
    let signed_max = block
        .iter()
        .copied()
        .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    let d = if format == GpuFormat::Q8_0 {
        amax / levels
    } else {
        signed_max / -levels
    };
    let scale = half::f16::from_f32(d);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = block
        .iter()
        .map(|&v| {
            if format == GpuFormat::Q8_0 {
                (v * id).round().clamp(-127.0, 127.0) as i8
            } else {
                ((v * id + 8.5).floor().clamp(0.0, 15.0) as i32 - 8) as i8
            }
        })
        .collect();
    (scale, q)
}

/// A weight matrix resident on the GPU: chunks of whole rows, each within one binding.
#[derive(Debug, Clone)]
pub struct GpuWeight {
    pub format: GpuFormat,
    pub rows: usize,
    pub cols: usize,
    chunks: Vec<WeightChunk>,
}

#[derive(Debug, Clone)]
struct WeightChunk {
    buffer: wgpu::Buffer,
    row0: usize,
    rows: usize,
    scale_word0: usize,
}

impl GpuWeight {
    /// Uploads row-major `[rows, cols]` weights in `format` (fitted to the row length),
    /// split into chunks of at most `max_chunk_bytes`.
    pub fn upload(
        gpu: &Gpu,
        label: &str,
        w: &[f32],
        rows: usize,
        cols: usize,
        format: GpuFormat,
        max_chunk_bytes: u64,
    ) -> Result<Self> {
        if w.len() != rows * cols || rows == 0 || cols == 0 {
            return Err(Error::InvalidInput(format!(
                "{label}: {} weights for a {rows}x{cols} matrix",
                w.len()
            )));
        }
        let format = format.for_cols(cols);
        let row_bytes = format.row_bytes(cols) as u64;
        if row_bytes + 16 > max_chunk_bytes {
            return Err(Error::InvalidInput(format!(
                "{label}: one row of {cols} {format} weights ({row_bytes} bytes) exceeds this GPU's largest binding ({max_chunk_bytes} bytes)"
            )));
        }
        // Room for the padding of the scales to a whole 128-bit word (the wide kernels
        // read them as vec4s).
        let per_chunk = ((max_chunk_bytes - 16) / row_bytes).max(1) as usize;
        let chunks = (0..rows)
            .step_by(per_chunk)
            .map(|row0| {
                let n = per_chunk.min(rows - row0);
                let (mut words, scale_word0) =
                    format.pack(&w[row0 * cols..(row0 + n) * cols], cols);
                words.resize(words.len().next_multiple_of(4), 0);
                WeightChunk {
                    buffer: gpu.upload_words(label, &words),
                    row0,
                    rows: n,
                    scale_word0,
                }
            })
            .collect();
        Ok(Self {
            format,
            rows,
            cols,
            chunks,
        })
    }

    /// A single-chunk weight from words already in the kernels' layout (rows, then the
    /// scales of a quantized format): synthetic weights for tuning.
    fn from_words(gpu: &Gpu, format: GpuFormat, rows: usize, cols: usize, words: &[u32]) -> Self {
        Self {
            format,
            rows,
            cols,
            chunks: vec![WeightChunk {
                buffer: gpu.upload_words("synthetic", words),
                row0: 0,
                rows,
                scale_word0: rows * format.row_words(cols),
            }],
        }
    }

    /// Whether the wide kernels read this matrix (and so can fuse a norm or a gate into
    /// its input): see [`super::gpu_matvec::is_wide`].
    pub fn is_wide(&self) -> bool {
        super::gpu_matvec::is_wide(self.format, self.cols)
    }

    /// Bytes the kernels read for one product.
    pub fn size_in_bytes(&self) -> usize {
        self.rows * self.format.row_bytes(self.cols)
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The chunks: buffer, first row, rows.
    pub fn chunks(&self) -> impl Iterator<Item = (&wgpu::Buffer, usize, usize)> {
        self.chunks.iter().map(|c| (&c.buffer, c.row0, c.rows))
    }
}

/// A shader resource of a planned dispatch.
#[derive(Debug, Clone)]
pub enum Res {
    Buffer(wgpu::Buffer),
    /// A window of the parameter arena: offset and size in bytes.
    Arena(u64, u64),
}

/// The pipeline a planned dispatch runs.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    /// An entry point of `SHADERS`, built when the device opens.
    Named(&'static str),
    /// A wide matrix-vector kernel, built on first use.
    Wide(GpuFormat, MatvecShape),
}

#[derive(Debug)]
struct PlannedDispatch {
    entry: Kernel,
    resources: Vec<(u32, Res)>,
    groups: [u32; 3],
}

/// What a matrix product adds after the dot products (see `shaders/matvec.wgsl`).
#[derive(Debug, Clone, Default)]
pub struct Epilogue {
    /// Adds the product to what `out` holds (a residual connection).
    pub accumulate: bool,
    pub bias: Option<Vec<f32>>,
    /// Multiplies by this vector first (a layer scale).
    pub scale: Option<Vec<f32>>,
    /// What the product reads: fused inputs need a wide weight ([`GpuWeight::is_wide`]).
    pub input: MatvecInput,
    /// Values between activation rows in `x` (0: the row length; a streaming
    /// convolution's windows overlap). Not for the scalar kernels ([`Plan::reads_strided`]).
    pub x_stride: usize,
    /// Where the output starts in `out` (a region of a buffer shared with other data).
    pub out_base: usize,
}

/// Builds a model's program: every dispatch of a step with its parameters, laid out in
/// one uniform arena. Block 0 of the arena is the per-step block (written before each
/// submit); the others are written once. Bind groups are made once in [`Plan::build`];
/// since each dispatch has its own bind group, parameter offsets are fixed there rather
/// than passed as dynamic offsets at dispatch time.
#[derive(Debug)]
pub struct Plan {
    arena: Vec<u8>,
    align: usize,
    dispatches: Vec<PlannedDispatch>,
    dummy: Option<wgpu::Buffer>,
}

impl Plan {
    /// `step_block_bytes`: the size of block 0.
    pub fn new(gpu: &Gpu, step_block_bytes: usize) -> Self {
        let align = (gpu.limits.min_uniform_buffer_offset_alignment as usize).max(16);
        Self {
            arena: vec![0; step_block_bytes.next_multiple_of(align)],
            align,
            dispatches: vec![],
            dummy: None,
        }
    }

    /// The per-step block.
    pub fn step_block(&self, bytes: usize) -> Res {
        Res::Arena(0, bytes.next_multiple_of(16) as u64)
    }

    /// Appends a parameter block; returns its window.
    pub fn params(&mut self, words: &[u32]) -> Res {
        let off = self.arena.len();
        let bytes: &[u8] = bytemuck::cast_slice(words);
        let size = bytes.len().next_multiple_of(16);
        self.arena.extend_from_slice(bytes);
        self.arena.resize(off + size, 0);
        self.arena
            .resize(self.arena.len().next_multiple_of(self.align), 0);
        Res::Arena(off as u64, size as u64)
    }

    pub fn dispatch(&mut self, entry: &'static str, resources: Vec<(u32, Res)>, groups: [u32; 3]) {
        self.dispatches.push(PlannedDispatch {
            entry: Kernel::Named(entry),
            resources,
            groups,
        });
    }

    /// Plans a dispatch of `n` invocations in workgroups of 64 (the kernels of
    /// `mimi.wgsl`, which index by `x + y * num_workgroups.x * 64`).
    pub fn dispatch_n(&mut self, entry: &'static str, resources: Vec<(u32, Res)>, n: usize) {
        let groups = n.div_ceil(64).max(1);
        let x = groups.min(65_535);
        self.dispatch(entry, resources, [x as u32, groups.div_ceil(x) as u32, 1]);
    }

    /// Whether a product of `w` over `m` rows may read activation rows at any stride and
    /// write at an offset ([`Epilogue::x_stride`], [`Epilogue::out_base`]): the wide
    /// kernels (whose rows start on whole vec4s: a stride that is a multiple of 4) and
    /// the tiled one.
    pub fn reads_strided(w: &GpuWeight, m: usize) -> bool {
        m >= MATMUL_MIN_ROWS || w.is_wide()
    }

    /// A window of the arena for a second (third...) per-step block, written each step
    /// with the first: `index` blocks of `bytes` after the start, each aligned.
    pub fn step_block_at(&self, index: usize, bytes: usize) -> Res {
        let stride = bytes.next_multiple_of(self.align);
        Res::Arena((index * stride) as u64, bytes.next_multiple_of(16) as u64)
    }

    /// Plans `out (+)= epilogue(x @ w^T)` for `m` activation rows: one dispatch per chunk,
    /// in the wide kernels' shape for this adapter where the matrix allows, or from
    /// [`MATMUL_MIN_ROWS`] rows (a plain input) the tiled matrix-matrix kernel.
    pub fn matvec(
        &mut self,
        gpu: &Gpu,
        w: &GpuWeight,
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
        m: usize,
        epi: &Epilogue,
    ) -> Result<()> {
        self.matvec_shaped(gpu, w, x, out, m, epi, None)
    }

    /// [`Plan::matvec`] in a given wide shape (`None`: the adapter's own), for tests and
    /// tuning.
    #[allow(clippy::too_many_arguments)]
    pub fn matvec_shaped(
        &mut self,
        gpu: &Gpu,
        w: &GpuWeight,
        x: &wgpu::Buffer,
        out: &wgpu::Buffer,
        m: usize,
        epi: &Epilogue,
        shape: Option<MatvecShape>,
    ) -> Result<()> {
        for v in [&epi.bias, &epi.scale].into_iter().flatten() {
            if v.len() != w.rows {
                return Err(Error::InvalidInput(format!(
                    "an epilogue vector of {} values for {} output rows",
                    v.len(),
                    w.rows
                )));
            }
        }
        let strided = epi.x_stride != 0 || epi.out_base != 0;
        if strided && !Plan::reads_strided(w, m) {
            return Err(Error::InvalidInput(format!(
                "a strided input or offset output for a {}x{} {} matrix at {m} rows, which only the wide and tiled kernels take",
                w.rows, w.cols, w.format
            )));
        }
        if epi.input != MatvecInput::Plain && !w.is_wide() {
            return Err(Error::InvalidInput(format!(
                "a fused input for a {}x{} {} matrix, which the wide kernels do not read",
                w.rows, w.cols, w.format
            )));
        }
        if let MatvecInput::RmsNormed { alpha, .. } = &epi.input {
            if alpha.len() != w.cols {
                return Err(Error::InvalidInput(format!(
                    "a norm weight of {} values for {} input columns",
                    alpha.len(),
                    w.cols
                )));
            }
        }
        let tiled = m >= MATMUL_MIN_ROWS && epi.input == MatvecInput::Plain;
        let shape = match (w.is_wide() && !tiled, shape) {
            (false, _) => None,
            (true, Some(s)) => Some(s),
            (true, None) => Some(gpu.matvec_shape(w.format)?.0),
        };
        let mut aux_words = vec![];
        let mut flags = u32::from(epi.accumulate);
        let mut aux_bias = 0;
        let mut aux_scale = 0;
        if let Some(b) = &epi.bias {
            flags |= 2;
            aux_bias = aux_words.len();
            aux_words.extend_from_slice(b);
        }
        if let Some(s) = &epi.scale {
            flags |= 4;
            aux_scale = aux_words.len();
            aux_words.extend_from_slice(s);
        }
        let mut aux_norm = 0;
        let mut eps = 0f32;
        if let MatvecInput::RmsNormed { alpha, eps: e } = &epi.input {
            aux_norm = aux_words.len();
            aux_words.extend_from_slice(alpha);
            eps = *e;
        }
        flags |= epi.input.flag();
        let aux = if aux_words.is_empty() {
            self.dummy
                .get_or_insert_with(|| gpu.upload_f32("no-aux", &[0.0; 4]))
                .clone()
        } else {
            gpu.upload_f32("epilogue", &aux_words)
        };
        let max_x = gpu.limits.max_compute_workgroups_per_dimension as usize;
        if tiled {
            let format = match w.format {
                GpuFormat::F32 => 0,
                GpuFormat::F16 => 1,
                GpuFormat::Bf16 => 2,
                GpuFormat::Q8_0 => 3,
                GpuFormat::Q4 => 4,
            };
            for c in &w.chunks {
                let groups = [c.rows.div_ceil(16), m.div_ceil(16)];
                if groups.iter().any(|&g| g > max_x) {
                    return Err(Error::InvalidInput(format!(
                        "a product of {m} rows by a {}x{} matrix exceeds this GPU's dispatch size",
                        c.rows, w.cols
                    )));
                }
                let params = self.params(&[
                    c.rows as u32,
                    w.cols as u32,
                    m as u32,
                    c.row0 as u32,
                    w.rows as u32,
                    w.format.row_words(w.cols) as u32,
                    c.scale_word0 as u32,
                    flags,
                    aux_bias as u32,
                    aux_scale as u32,
                    format,
                    if epi.x_stride != 0 {
                        epi.x_stride
                    } else {
                        w.cols
                    } as u32,
                    epi.out_base as u32,
                    0,
                    0,
                    0,
                ]);
                self.dispatch(
                    "matmul",
                    vec![
                        (0, Res::Buffer(c.buffer.clone())),
                        (1, Res::Buffer(x.clone())),
                        (2, Res::Buffer(out.clone())),
                        (3, params),
                        (4, Res::Buffer(aux.clone())),
                    ],
                    [groups[0] as u32, groups[1] as u32, 1],
                );
            }
            return Ok(());
        }
        if let Some(shape) = shape {
            let x_stride = match (epi.x_stride, &epi.input) {
                (0, MatvecInput::Gated) => 2 * w.cols,
                (0, _) => w.cols,
                (s, _) => s,
            };
            if x_stride % 4 != 0 {
                return Err(Error::InvalidInput(format!(
                    "the wide kernels read whole vec4s: an activation stride of {x_stride}"
                )));
            }
            for c in &w.chunks {
                let groups = c.rows.div_ceil(shape.rows as usize);
                let per_y = groups.min(max_x);
                let params = self.params(&[
                    c.rows as u32,
                    w.cols as u32,
                    m as u32,
                    per_y as u32,
                    c.row0 as u32,
                    w.rows as u32,
                    w.format.row_words(w.cols) as u32,
                    c.scale_word0 as u32,
                    flags,
                    aux_bias as u32,
                    aux_scale as u32,
                    x_stride as u32,
                    aux_norm as u32,
                    eps.to_bits(),
                    epi.out_base as u32,
                    0,
                ]);
                self.dispatches.push(PlannedDispatch {
                    entry: Kernel::Wide(w.format, shape),
                    resources: vec![
                        (0, Res::Buffer(c.buffer.clone())),
                        (1, Res::Buffer(x.clone())),
                        (2, Res::Buffer(out.clone())),
                        (3, params),
                        (4, Res::Buffer(aux.clone())),
                    ],
                    groups: [per_y as u32, groups.div_ceil(per_y) as u32, m as u32],
                });
            }
            return Ok(());
        }
        for c in &w.chunks {
            let rows_per_y = c.rows.min(max_x);
            let params = self.params(&[
                c.rows as u32,
                w.cols as u32,
                m as u32,
                rows_per_y as u32,
                c.row0 as u32,
                w.rows as u32,
                w.format.row_words(w.cols) as u32,
                c.scale_word0 as u32,
                flags,
                aux_bias as u32,
                aux_scale as u32,
                0,
            ]);
            self.dispatch(
                w.format.entry(),
                vec![
                    (0, Res::Buffer(c.buffer.clone())),
                    (1, Res::Buffer(x.clone())),
                    (2, Res::Buffer(out.clone())),
                    (3, params),
                    (4, Res::Buffer(aux.clone())),
                ],
                [
                    rows_per_y as u32,
                    c.rows.div_ceil(rows_per_y) as u32,
                    m as u32,
                ],
            );
        }
        Ok(())
    }

    /// Makes the arena and every bind group.
    pub fn build(self, gpu: &Gpu) -> Result<Program> {
        let arena = gpu
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("parameter arena"),
                contents: &self.arena,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            });
        let dispatches = self
            .dispatches
            .iter()
            .map(|d| {
                let (pipeline, label) = match d.entry {
                    Kernel::Named(e) => (gpu.pipeline(e)?.clone(), e),
                    Kernel::Wide(f, shape) => (gpu.wide_pipeline(f, shape)?, f.entry()),
                };
                let entries: Vec<wgpu::BindGroupEntry> = d
                    .resources
                    .iter()
                    .map(|(binding, r)| wgpu::BindGroupEntry {
                        binding: *binding,
                        resource: match r {
                            Res::Buffer(b) => b.as_entire_binding(),
                            Res::Arena(off, size) => {
                                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                    buffer: &arena,
                                    offset: *off,
                                    size: std::num::NonZeroU64::new(*size),
                                })
                            }
                        },
                    })
                    .collect();
                let bind = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(label),
                    layout: &pipeline.get_bind_group_layout(0),
                    entries: &entries,
                });
                Ok((pipeline, bind, d.groups))
            })
            .collect::<Result<_>>()?;
        gpu.check()?;
        Ok(Program { arena, dispatches })
    }
}

/// A model step's dispatches, ready to record: one compute pass.
#[derive(Debug)]
pub struct Program {
    arena: wgpu::Buffer,
    dispatches: Vec<(wgpu::ComputePipeline, wgpu::BindGroup, [u32; 3])>,
}

impl Program {
    /// Queues the per-step block (it reaches the GPU with the next submit).
    pub fn write_step_block(&self, gpu: &Gpu, words: &[u32]) {
        gpu.queue
            .write_buffer(&self.arena, 0, bytemuck::cast_slice(words));
    }

    /// Records every dispatch, in order, in one compute pass.
    pub fn record(&self, enc: &mut wgpu::CommandEncoder) {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("step"),
            timestamp_writes: None,
        });
        for (pipeline, bind, g) in &self.dispatches {
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, bind, &[]);
            pass.dispatch_workgroups(g[0], g[1], g[2]);
        }
    }

    pub fn dispatch_count(&self) -> usize {
        self.dispatches.len()
    }
}

/// A weight matrix on the GPU with its own activation buffers: products one submit and
/// one readback each, for tests and tools (model steps keep activations on the GPU and
/// read back only sampled tokens).
#[derive(Debug)]
pub struct GpuMatrix {
    gpu: Arc<Gpu>,
    weight: GpuWeight,
    x: wgpu::Buffer,
    out: wgpu::Buffer,
    read: wgpu::Buffer,
    /// One program per batch size used so far.
    programs: HashMap<usize, Program>,
}

impl GpuMatrix {
    /// Activation rows one call takes at most (a streaming step's batch).
    pub const MAX_ROWS: usize = 16;

    /// Uploads row-major `[rows, cols]` f32 weights once.
    pub fn upload(gpu: &Arc<Gpu>, w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        Self::upload_as(gpu, w, rows, cols, GpuFormat::F32, gpu.max_binding_bytes())
    }

    /// Uploads in `format`, split into chunks of at most `max_chunk_bytes`.
    pub fn upload_as(
        gpu: &Arc<Gpu>,
        w: &[f32],
        rows: usize,
        cols: usize,
        format: GpuFormat,
        max_chunk_bytes: u64,
    ) -> Result<Self> {
        let weight = GpuWeight::upload(gpu, "matrix", w, rows, cols, format, max_chunk_bytes)?;
        Ok(Self {
            x: gpu.activations("x", Self::MAX_ROWS * cols),
            out: gpu.activations("out", Self::MAX_ROWS * rows),
            read: gpu.readback_buffer((Self::MAX_ROWS * rows * 4) as u64),
            gpu: gpu.clone(),
            weight,
            programs: HashMap::new(),
        })
    }

    pub fn weight(&self) -> &GpuWeight {
        &self.weight
    }

    /// `x @ self^T` for `m` rows of `cols` (1 to [`Self::MAX_ROWS`]), read back.
    pub fn matmul_t(&mut self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (rows, cols) = (self.weight.rows, self.weight.cols);
        if x.len() != m * cols || m == 0 || m > Self::MAX_ROWS {
            return Err(Error::InvalidInput(format!(
                "matmul: {} values for {m} rows of {cols} (1 to {} rows)",
                x.len(),
                Self::MAX_ROWS
            )));
        }
        let gpu = self.gpu.clone();
        if !self.programs.contains_key(&m) {
            let mut plan = Plan::new(&gpu, 0);
            plan.matvec(
                &gpu,
                &self.weight,
                &self.x,
                &self.out,
                m,
                &Epilogue::default(),
            )?;
            self.programs.insert(m, plan.build(&gpu)?);
        }
        let program = &self.programs[&m];
        gpu.queue.write_buffer(&self.x, 0, bytemuck::cast_slice(x));
        let mut enc = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("matvec"),
            });
        program.record(&mut enc);
        let bytes =
            gpu.submit_and_read(enc, &[(&self.out, 0, (m * rows * 4) as u64)], &self.read)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes[0]))
    }
}

/// Runs one product of `w` and reads it back: `out` starts as `init` (`out_base` values,
/// then `m` rows of `w.rows`, what an accumulating epilogue adds to), `x` holds `m` input
/// rows (each twice as long for a gated input), `x_stride` apart if the epilogue says. `shape`: a wide shape to force, else the adapter's. For
/// tests and tools.
pub fn run_matvec(
    gpu: &Gpu,
    w: &GpuWeight,
    x: &[f32],
    m: usize,
    init: &[f32],
    epi: &Epilogue,
    shape: Option<MatvecShape>,
) -> Result<Vec<f32>> {
    let width = if epi.input == MatvecInput::Gated {
        2 * w.cols
    } else {
        w.cols
    };
    let x_len = match epi.x_stride {
        0 => m * width,
        s => (m.max(1) - 1) * s + width,
    };
    if m == 0 || x.len() != x_len || init.len() != epi.out_base + m * w.rows {
        return Err(Error::InvalidInput(format!(
            "matvec: {} inputs and {} outputs for {m} rows of a {}x{} matrix",
            x.len(),
            init.len(),
            w.rows,
            w.cols
        )));
    }
    let xb = gpu.upload_f32("x", x);
    let out = gpu.upload_f32("out", init);
    let mut plan = Plan::new(gpu, 0);
    plan.matvec_shaped(gpu, w, &xb, &out, m, epi, shape)?;
    let program = plan.build(gpu)?;
    let mut enc = gpu
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("matvec"),
        });
    program.record(&mut enc);
    let bytes = (init.len() * 4) as u64;
    let read = gpu.readback_buffer(bytes);
    let got = gpu.submit_and_read(enc, &[(&out, 0, bytes)], &read)?;
    Ok(bytemuck::pod_collect_to_vec(&got[0]))
}

/// Draws one token from `logits` on the GPU as a model step does (`temp <= 0`: greedy;
/// `top_k` 0: all), with the uniform `draw` in [0, 1). For tests and tools.
pub fn sample_once(gpu: &Gpu, logits: &[f32], temp: f32, top_k: usize, draw: f32) -> Result<u32> {
    let buf = gpu.upload_f32("logits", logits);
    let tokens = gpu.activations("tokens", 4);
    let mut plan = Plan::new(gpu, STEP_BLOCK_BYTES);
    let params = plan.params(&[logits.len() as u32, 0, 0, 0]);
    let step = plan.step_block(STEP_BLOCK_BYTES);
    plan.dispatch(
        "sample",
        vec![
            (0, Res::Buffer(buf)),
            (1, Res::Buffer(tokens.clone())),
            (2, params),
            (3, step),
        ],
        [1, 1, 1],
    );
    let program = plan.build(gpu)?;
    let mut block = StepBlock {
        text_top_k: top_k as u32,
        text_temp: temp,
        ..Default::default()
    };
    block.draws[0] = draw;
    program.write_step_block(gpu, &block.words());
    let mut enc = gpu
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("sample"),
        });
    program.record(&mut enc);
    let read = gpu.readback_buffer(8);
    let bytes = gpu.submit_and_read(enc, &[(&tokens, 0, 4)], &read)?;
    Ok(bytemuck::pod_read_unaligned(&bytes[0]))
}

/// Size of the per-step block (`struct Step` in the shaders).
pub const STEP_BLOCK_BYTES: usize = 32 + 64 * 16 + MAX_DRAWS * 4;

/// Uniform draws one step carries: the text stream and up to 63 codebooks.
pub const MAX_DRAWS: usize = 64;

/// Most (cos, sin) pairs of a rotary table: head sizes up to 256.
pub const MAX_ROPE_PAIRS: usize = 128;

/// The per-step block: the stream position with its rotary table, the sampling settings
/// and the uniform draws of this step (`struct Step` in the shaders).
#[derive(Debug, Clone)]
pub struct StepBlock {
    pub pos: u32,
    pub text_top_k: u32,
    pub audio_top_k: u32,
    pub text_temp: f32,
    pub audio_temp: f32,
    /// Positions back this step attends to (0: the whole ring; see `slot_valid`).
    pub window: u32,
    /// (cos, sin) per rotary frequency.
    pub rope: Vec<(f32, f32)>,
    pub draws: [f32; MAX_DRAWS],
}

impl Default for StepBlock {
    fn default() -> Self {
        Self {
            pos: 0,
            text_top_k: 0,
            audio_top_k: 0,
            text_temp: 0.0,
            audio_temp: 0.0,
            window: 0,
            rope: vec![],
            draws: [0.0; MAX_DRAWS],
        }
    }
}

impl StepBlock {
    pub fn words(&self) -> Vec<u32> {
        let mut w = vec![0u32; STEP_BLOCK_BYTES / 4];
        w[0] = self.pos;
        w[1] = self.text_top_k;
        w[2] = self.audio_top_k;
        w[3] = self.text_temp.to_bits();
        w[4] = self.audio_temp.to_bits();
        w[5] = self.window;
        for (i, &(c, s)) in self.rope.iter().take(MAX_ROPE_PAIRS).enumerate() {
            w[8 + 2 * i] = c.to_bits();
            w[8 + 2 * i + 1] = s.to_bits();
        }
        for (i, d) in self.draws.iter().enumerate() {
            w[8 + 256 + i] = d.to_bits();
        }
        w
    }
}
