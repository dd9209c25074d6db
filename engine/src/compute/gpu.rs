//! The wgpu runtime: adapter and device selection with the CPU as the fallback, and the
//! compute kernels of `shaders/` (WGSL, embedded at build time).
//!
//! `--device auto` takes a hardware GPU and otherwise the CPU path; `--device gpu` takes
//! the best adapter there is, a software one (Mesa's lavapipe) included; `--device cpu`
//! never touches wgpu. Either way one log line says what runs. The device is created with
//! the adapter's own limits.

use std::sync::Arc;

use wgpu::util::DeviceExt;

use crate::{Error, Result};

/// The WGSL sources, one kernel family per file.
pub const SHADERS: &[(&str, &str)] =
    &[("matvec.wgsl", include_str!("../../../shaders/matvec.wgsl"))];

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

/// An open GPU device with Parley's pipelines.
#[derive(Debug)]
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    matvec: wgpu::ComputePipeline,
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
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("parley"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::NoGpu(format!("opening {}: {e}", info.name)))?;
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("matvec.wgsl"),
            source: wgpu::ShaderSource::Wgsl(SHADERS[0].1.into()),
        });
        let matvec = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("matvec_f32"),
            layout: None,
            module: &module,
            entry_point: Some("matvec_f32"),
            compilation_options: Default::default(),
            cache: None,
        });
        Ok(Self {
            device,
            queue,
            info,
            limits,
            matvec,
        })
    }
}

/// An f32 weight matrix resident on the GPU, with its activation, output, readback and
/// parameter buffers and its bind group made once at upload (for up to
/// [`GpuMatrix::MAX_ROWS`] activation rows a call).
#[derive(Debug)]
pub struct GpuMatrix {
    gpu: Arc<Gpu>,
    x: wgpu::Buffer,
    out: wgpu::Buffer,
    read: wgpu::Buffer,
    params: wgpu::Buffer,
    bind: wgpu::BindGroup,
    rows: usize,
    cols: usize,
}

impl GpuMatrix {
    /// Activation rows one call takes at most (a streaming step's batch).
    pub const MAX_ROWS: usize = 16;

    /// Uploads row-major `[rows, cols]` weights once.
    pub fn upload(gpu: &Arc<Gpu>, w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        let bytes = (w.len() * 4) as u64;
        if w.len() != rows * cols {
            return Err(Error::InvalidInput(format!(
                "{} weights for a {rows}x{cols} matrix",
                w.len()
            )));
        }
        if bytes > gpu.limits.max_storage_buffer_binding_size {
            return Err(Error::InvalidInput(format!(
                "a {rows}x{cols} f32 matrix ({bytes} bytes) exceeds this GPU's largest binding ({} bytes)",
                gpu.limits.max_storage_buffer_binding_size
            )));
        }
        let dev = &gpu.device;
        let weights = dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("weights"),
            contents: bytemuck::cast_slice(w),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let buffer = |label: &str, size: usize, usage: wgpu::BufferUsages| {
            dev.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: size as u64,
                usage,
                mapped_at_creation: false,
            })
        };
        let x = buffer(
            "x",
            Self::MAX_ROWS * cols * 4,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        );
        let out = buffer(
            "out",
            Self::MAX_ROWS * rows * 4,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        );
        let read = buffer(
            "readback",
            Self::MAX_ROWS * rows * 4,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let params = buffer(
            "params",
            16,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        let bind = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("matvec"),
            layout: &gpu.matvec.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: weights.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: x.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: out.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 3,
                    resource: params.as_entire_binding(),
                },
            ],
        });
        Ok(Self {
            gpu: gpu.clone(),
            x,
            out,
            read,
            params,
            bind,
            rows,
            cols,
        })
    }

    /// `x @ self^T` for `m` rows of `cols` (at most [`Self::MAX_ROWS`]), read back: one
    /// submit and one readback, for tests and tools (model steps keep activations on the
    /// GPU and read back only sampled tokens).
    pub fn matmul_t(&mut self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        if x.len() != m * self.cols || m == 0 || m > Self::MAX_ROWS {
            return Err(Error::InvalidInput(format!(
                "matmul: {} values for {m} rows of {} (1 to {} rows)",
                x.len(),
                self.cols,
                Self::MAX_ROWS
            )));
        }
        let gpu = &self.gpu;
        let rows_per_y = self
            .rows
            .min(gpu.limits.max_compute_workgroups_per_dimension as usize);
        let params: [u32; 4] = [
            self.rows as u32,
            self.cols as u32,
            m as u32,
            rows_per_y as u32,
        ];
        gpu.queue.write_buffer(&self.x, 0, bytemuck::cast_slice(x));
        gpu.queue
            .write_buffer(&self.params, 0, bytemuck::cast_slice(&params));
        let out_bytes = (m * self.rows * 4) as u64;
        let mut enc = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("matvec"),
            });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("matvec"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&gpu.matvec);
            pass.set_bind_group(0, &self.bind, &[]);
            pass.dispatch_workgroups(
                rows_per_y as u32,
                self.rows.div_ceil(rows_per_y) as u32,
                m as u32,
            );
        }
        enc.copy_buffer_to_buffer(&self.out, 0, &self.read, 0, out_bytes);
        gpu.queue.submit([enc.finish()]);
        let slice = self.read.slice(..out_bytes);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        gpu.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::InvalidInput(format!("GPU poll failed: {e}")))?;
        rx.recv()
            .map_err(|_| Error::InvalidInput("GPU readback was dropped".into()))?
            .map_err(|e| Error::InvalidInput(format!("GPU readback failed: {e}")))?;
        let v: Vec<f32> = {
            let data = slice
                .get_mapped_range()
                .map_err(|e| Error::InvalidInput(format!("GPU readback failed: {e}")))?;
            bytemuck::cast_slice(&data).to_vec()
        };
        self.read.unmap();
        Ok(v)
    }
}
