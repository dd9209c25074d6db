//! The wgpu backend: every WGSL file validates with naga; the CPU fallback is taken, with a
//! clear message, when no adapter exists; kernels agree with the CPU path. Kernel tests run
//! on any adapter (Mesa's lavapipe in CI) and skip, saying why, where there is none.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use parley_engine::compute::cpu::Matrix;
use parley_engine::compute::gpu::{select, Backend, DeviceChoice, Gpu, GpuMatrix, SHADERS};

#[test]
fn every_shader_validates_with_naga() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shaders");
    let on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("shaders/")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".wgsl"))
        .collect();
    assert!(!on_disk.is_empty());
    for name in &on_disk {
        assert!(
            SHADERS.iter().any(|(n, _)| n == name),
            "{name} is not embedded in SHADERS"
        );
    }
    for (name, src) in SHADERS {
        let module = naga::front::wgsl::parse_str(src)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
}

#[test]
fn without_adapters_auto_falls_back_to_the_cpu_and_gpu_says_why() {
    let (backend, line) = select(DeviceChoice::Auto, wgpu::Backends::empty()).expect("auto");
    assert!(matches!(backend, Backend::Cpu));
    assert!(
        line.contains("CPU") && line.contains("no GPU adapter"),
        "{line}"
    );
    let err = select(DeviceChoice::Gpu, wgpu::Backends::empty())
        .expect_err("gpu")
        .to_string();
    assert!(err.contains("no GPU adapter"), "{err}");
    let (backend, line) = select(DeviceChoice::Cpu, wgpu::Backends::all()).expect("cpu");
    assert!(
        matches!(backend, Backend::Cpu) && line.contains("CPU"),
        "{line}"
    );
}

fn any_gpu() -> Option<Arc<Gpu>> {
    match select(DeviceChoice::Gpu, wgpu::Backends::all()) {
        Ok((Backend::Gpu(g), line)) => {
            eprintln!("{line}");
            Some(g)
        }
        Ok((Backend::Cpu, _)) => None,
        Err(e) => {
            eprintln!("skipping GPU kernel test: {e}");
            None
        }
    }
}

#[test]
fn matvec_matches_the_cpu_path_on_awkward_sizes() {
    let Some(gpu) = any_gpu() else { return };
    let mut seed = 5u32;
    let mut rnd = move || {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    };
    for &(rows, cols) in &[(1, 1), (3, 7), (33, 300), (257, 1030), (2048, 512)] {
        let w: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
        let cpu = Matrix::new(&Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).expect("t"))
            .expect("m");
        let mut g = GpuMatrix::upload(&gpu, &w, rows, cols).expect("upload");
        // Repeated calls reuse the same buffers; sizes vary within a matrix.
        for m in [1, 2, 5, 16, 3] {
            let x: Vec<f32> = (0..m * cols).map(|_| rnd()).collect();
            let want = cpu.matmul_t(&x, m).expect("cpu");
            let got = g.matmul_t(&x, m).expect("gpu");
            assert_eq!(got.len(), want.len());
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-4, "{rows}x{cols}, m {m}: max abs error {err}");
        }
    }
}
