//! The wgpu backend: every WGSL file validates with naga; the CPU fallback is taken, with a
//! clear message, when no adapter exists; kernels agree with the CPU path. Kernel tests run
//! on any adapter (Mesa's lavapipe in CI) and skip, saying why, where there is none.

#[path = "common/gpu.rs"]
mod common_gpu;
use common_gpu::any_gpu;

use candle_core::{Device, Tensor};
use parley_engine::compute::cpu::Matrix;
use parley_engine::compute::gpu::{
    run_matvec, sample_once, select, Backend, DeviceChoice, Epilogue, GpuFormat, GpuMatrix,
    GpuWeight, MatvecInput, MatvecShape, SHADERS, TEMPLATES,
};
use parley_engine::compute::gpu_matvec::check_shapes;

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
            SHADERS.iter().any(|(n, _)| n == name) || TEMPLATES.contains(&name.as_str()),
            "{name} is not embedded in SHADERS or TEMPLATES"
        );
    }
    // The templates in every shape they expand to.
    let expanded: Vec<(String, String)> = [false, true]
        .into_iter()
        .flat_map(|sg| MatvecShape::candidates_for(GpuFormat::F16, sg, true))
        .map(|shape| (format!("{} {shape}", TEMPLATES[0]), shape.source()))
        .collect();
    let all = SHADERS
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .chain(expanded);
    for (name, src) in all {
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
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
    let (backend, line) = select(DeviceChoice::Cpu, wgpu::Backends::PRIMARY).expect("cpu");
    assert!(
        matches!(backend, Backend::Cpu) && line.contains("CPU"),
        "{line}"
    );
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

fn rng(seed: u32) -> impl FnMut() -> f32 {
    let mut s = seed;
    move || {
        s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    }
}

/// Every weight format, split into chunks of a few rows, against the CPU's product over
/// the very values the format holds (so any error is the kernel's, not the format's).
#[test]
fn matvec_formats_and_split_matrices_match_the_cpu_path() {
    let Some(gpu) = any_gpu() else { return };
    let mut rnd = rng(11);
    for format in [
        GpuFormat::F32,
        GpuFormat::F16,
        GpuFormat::Bf16,
        GpuFormat::Q8_0,
        GpuFormat::Q4,
    ] {
        // Odd rows, rows over a workgroup, columns not a multiple of 32 (quantized
        // formats fall back), odd columns (half formats fall back).
        for &(rows, cols, chunk) in &[
            (5, 64, 1 << 20),
            (67, 96, 1000),
            (300, 50, 777),
            (9, 33, 300),
            (1030, 256, 20_000),
        ] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
            let mut g = GpuMatrix::upload_as(&gpu, &w, rows, cols, format, chunk).expect("upload");
            let held = g.weight().format;
            assert_eq!(held, format.for_cols(cols));
            if (chunk as usize) < g.weight().size_in_bytes() {
                assert!(
                    g.weight().chunk_count() > 1,
                    "{format} {rows}x{cols}: not split"
                );
            }
            let exact = held.round_trip(&w);
            let cpu = Matrix::new(&Tensor::from_vec(exact, (rows, cols), &Device::Cpu).expect("t"))
                .expect("m");
            // From 8 rows the tiled matrix-matrix kernel.
            for m in [1, 3, 8, 16] {
                let x: Vec<f32> = (0..m * cols).map(|_| rnd()).collect();
                let want = cpu.matmul_t(&x, m).expect("cpu");
                let got = g.matmul_t(&x, m).expect("gpu");
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    err < 1e-4,
                    "{format} as {held}, {rows}x{cols}, m {m}: max abs error {err}"
                );
            }
        }
    }
}

/// The wide kernels in every shape this adapter can run against their f64 definition
/// (`gpu_matvec::check_shapes`, which `parley bench gpu --check` runs on real GPUs too).
#[test]
fn wide_matvec_shapes_match_their_definition() {
    let Some(gpu) = any_gpu() else { return };
    eprintln!("subgroups: {}", gpu.subgroups);
    let checks = check_shapes(&gpu).expect("checks");
    // Every shape met (both reductions where the adapter has subgroups, f16 products
    // where it has SHADER_F16), and the tiled kernel.
    eprintln!("shader f16: {}", gpu.shader_f16);
    let shapes =
        MatvecShape::candidates_for(GpuFormat::F16, gpu.subgroups, gpu.shader_f16).len() + 1;
    let seen: std::collections::HashSet<&str> = checks
        .iter()
        .filter_map(|c| c.case.split(" m ").nth(1))
        .map(|c| c.split_once(' ').map_or(c, |(_, rest)| rest))
        .map(|c| c.split_once(' ').map_or(c, |(_, shape)| shape))
        .collect();
    assert_eq!(seen.len(), shapes, "{seen:?}");
    for c in &checks {
        assert!(c.passed(), "{}: error {} over {}", c.case, c.error, c.bound);
    }
    // A fused input is refused where the wide kernels do not read the matrix.
    let narrow =
        GpuWeight::upload(&gpu, "w", &[0.5; 5 * 6], 5, 6, GpuFormat::F32, 1 << 20).expect("upload");
    assert!(!narrow.is_wide());
    let e = run_matvec(
        &gpu,
        &narrow,
        &[0.0; 12],
        1,
        &[0.0; 5],
        &Epilogue {
            input: MatvecInput::Gated,
            ..Default::default()
        },
        None,
    )
    .expect_err("narrow gated");
    assert!(e.to_string().contains("wide kernels"), "{e}");
}

#[test]
fn quantized_formats_round_trip_within_their_step() {
    let mut rnd = rng(3);
    let w: Vec<f32> = (0..32 * 64).map(|_| rnd()).collect();
    // q8_0 rounds to the nearest of 255 symmetric levels: half a step. q4 (GGML's q4_0)
    // maps the largest magnitude to -8 steps, so the other side ends at 7 steps and may
    // clip by up to one step.
    for (format, levels, steps) in [(GpuFormat::Q8_0, 127.0, 0.5), (GpuFormat::Q4, 8.0, 1.0)] {
        let back = format.round_trip(&w);
        for (block, got) in w.chunks(32).zip(back.chunks(32)) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = block
                .iter()
                .zip(got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Plus the f16 rounding of the scale (2^-11 relative) on the largest level.
            let step = amax / levels;
            let bound = step * steps + levels * step / 2048.0 + 1e-6;
            assert!(
                err <= bound,
                "{format}: error {err} over {bound}, amax {amax}"
            );
        }
    }
}

/// Greedy is the first maximum; with a temperature, the token is the one the inverse CDF
/// over the top k (in index order) gives for the draw.
#[test]
fn sampling_kernel_matches_its_definition() {
    let Some(gpu) = any_gpu() else { return };
    let mut rnd = rng(21);
    for n in [1usize, 7, 300, 2049] {
        let mut logits: Vec<f32> = (0..n).map(|_| rnd() * 8.0).collect();
        if n > 2 {
            // A tie for the maximum: the first one wins.
            let max = logits.iter().copied().fold(f32::MIN, f32::max) + 1.0;
            logits[n / 2] = max;
            logits[n - 1] = max;
        }
        let argmax = logits
            .iter()
            .enumerate()
            .fold(0, |b, (i, &v)| if v > logits[b] { i } else { b });
        assert_eq!(
            sample_once(&gpu, &logits, 0.0, 0, 0.5).expect("greedy") as usize,
            argmax
        );
        for (temp, top_k) in [(1.0f32, 0usize), (0.7, 5), (1.5, 1), (1.0, n + 3)] {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            let keep: Vec<bool> = if top_k == 0 || top_k >= n {
                vec![true; n]
            } else {
                let thr = logits[order[top_k - 1]];
                logits.iter().map(|&v| v >= thr).collect()
            };
            let max = logits[argmax];
            let weights: Vec<f64> = (0..n)
                .map(|i| {
                    if keep[i] {
                        (((logits[i] - max) / temp) as f64).exp()
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = weights.iter().sum();
            for draw in [0.01f32, 0.3, 0.55, 0.97] {
                // The expected token, unless the draw falls within rounding of a boundary.
                let mut r = draw as f64 * total;
                let mut want = None;
                let mut near_edge = false;
                for (i, &wi) in weights.iter().enumerate() {
                    if wi == 0.0 {
                        continue;
                    }
                    if (r - wi).abs() < 1e-4 * total {
                        near_edge = true;
                    }
                    if r < wi {
                        want = Some(i);
                        break;
                    }
                    r -= wi;
                }
                let got = sample_once(&gpu, &logits, temp, top_k, draw).expect("sample") as usize;
                assert!(
                    keep[got],
                    "n {n}, top_k {top_k}: token {got} is outside the top k"
                );
                if !near_edge {
                    assert_eq!(
                        Some(got),
                        want,
                        "n {n}, temp {temp}, top_k {top_k}, draw {draw}"
                    );
                }
            }
        }
    }
}

/// WGSL has no includes: the per-step block is declared in every file that reads it, and
/// those declarations must be the same (and match `StepBlock::words`).
#[test]
fn every_copy_of_the_step_block_is_the_same() {
    let decl = |src: &str| -> Option<String> {
        let a = src.find("struct Step {")?;
        let b = a + src[a..].find('}')?;
        Some(src[a..=b].split_whitespace().collect::<Vec<_>>().join(" "))
    };
    let copies: Vec<(&str, String)> = SHADERS
        .iter()
        .filter_map(|(n, s)| decl(s).map(|d| (*n, d)))
        .collect();
    assert!(copies.len() >= 2, "{copies:?}");
    for (n, d) in &copies {
        assert_eq!(
            d, &copies[0].1,
            "{n} declares another Step than {}",
            copies[0].0
        );
    }
    use parley_engine::compute::gpu::{MAX_DRAWS, MAX_ROPE_PAIRS, STEP_BLOCK_BYTES};
    let fields = format!(
        "cs: array<vec4<f32>, {}>, draws: array<vec4<f32>, {}>,",
        MAX_ROPE_PAIRS / 2,
        MAX_DRAWS / 4
    );
    assert!(
        copies[0].1.contains(&fields),
        "{} lacks {fields}",
        copies[0].1
    );
    assert_eq!(STEP_BLOCK_BYTES, 32 + MAX_ROPE_PAIRS * 8 + MAX_DRAWS * 4);
}

/// Models opened one after another share one wgpu device while it is alive, and a new one
/// is opened once it has gone.
#[test]
fn select_device_shares_one_device_per_process() {
    use parley_engine::compute::gpu::select_device;
    let first = match select_device(DeviceChoice::Gpu) {
        Ok((Backend::Gpu(g), _)) => g,
        other => {
            eprintln!("skipping: no GPU adapter ({other:?})");
            return;
        }
    };
    let Ok((Backend::Gpu(second), _)) = select_device(DeviceChoice::Gpu) else {
        panic!("the second call found no GPU")
    };
    assert!(std::sync::Arc::ptr_eq(&first, &second), "one device");
    let weak = std::sync::Arc::downgrade(&first);
    drop((first, second));
    assert!(
        weak.upgrade().is_none(),
        "the device closes with its last user"
    );
    let Ok((Backend::Gpu(_third), _)) = select_device(DeviceChoice::Gpu) else {
        panic!("a fresh device could not be opened")
    };
}
