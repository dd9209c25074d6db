//! The wide matrix-vector kernels (`shaders/matvec_wide.wgsl`): several rows per
//! workgroup, 128-bit weight loads, subgroup reductions where the adapter has them (a
//! workgroup-memory tree otherwise), dequantization in registers, and the feed-forward's
//! gate or the norm before a product fused into the product's input.
//!
//! The workgroup shape is not fixed: [`MatvecShape`] is chosen per adapter and weight
//! format when a model first asks for it ([`super::gpu::Gpu::matvec_shape`]): on a
//! hardware adapter by timing every candidate on matrices of that format (four of 48 MB:
//! their upload and the pipelines' builds take a fraction of a second at load), on a
//! software one (lavapipe, whose speed means nothing) by a default; `PARLEY_GPU_MATVEC`
//! (`WGxROWS`, e.g. `128x2`, optionally `,workgroup` to refuse subgroups and `,f16` for f16
//! products of f16 weights) overrides both.
//! Each shape is its own pipeline, built from the template on first use.

use super::gpu::GpuFormat;

/// How a wide matrix product is laid out on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MatvecShape {
    /// Invocations per workgroup.
    pub wg: u32,
    /// Output rows per workgroup (each invocation holds a partial sum of each).
    pub rows: u32,
    /// Reduce with subgroup operations (needs wgpu's SUBGROUP feature).
    pub subgroups: bool,
    /// f16 weights multiplied in f16 (needs SHADER_F16; other formats ignore it).
    pub f16: bool,
}

impl std::fmt::Display for MatvecShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}x{} {}{}",
            self.wg,
            self.rows,
            if self.subgroups {
                "subgroup"
            } else {
                "workgroup"
            },
            if self.f16 { " f16" } else { "" }
        )
    }
}

/// Workgroup sizes and rows per workgroup tried when tuning.
pub const WORKGROUP_SIZES: [u32; 3] = [64, 128, 256];
pub const ROWS_PER_WORKGROUP: [u32; 3] = [1, 2, 4];

impl MatvecShape {
    /// Every candidate on an adapter with (or without) subgroups, f32 products.
    pub fn candidates(subgroups: bool) -> Vec<MatvecShape> {
        WORKGROUP_SIZES
            .iter()
            .flat_map(|&wg| {
                ROWS_PER_WORKGROUP.iter().map(move |&rows| MatvecShape {
                    wg,
                    rows,
                    subgroups,
                    f16: false,
                })
            })
            .collect()
    }

    /// Every candidate for `format` on an adapter: both reductions where it has
    /// subgroups, and for f16 weights where it has SHADER_F16, f16 products too.
    pub fn candidates_for(
        format: GpuFormat,
        subgroups: bool,
        shader_f16: bool,
    ) -> Vec<MatvecShape> {
        let mut all = Self::candidates(false);
        if subgroups {
            all.extend(Self::candidates(true));
        }
        if format == GpuFormat::F16 && shader_f16 {
            let half: Vec<MatvecShape> = all
                .iter()
                .map(|s| MatvecShape { f16: true, ..*s })
                .collect();
            all.extend(half);
        }
        all
    }

    /// The shape used without tuning: 64 invocations (two NVIDIA warps, one AMD wave64,
    /// a common Apple and Intel choice) over two rows.
    pub fn default_for(subgroups: bool) -> MatvecShape {
        MatvecShape {
            wg: 64,
            rows: 2,
            subgroups,
            f16: false,
        }
    }

    /// Parses `PARLEY_GPU_MATVEC`'s `WGxROWS[,workgroup][,f16]`; subgroups and f16
    /// products stay on only where the adapter has them.
    pub fn parse(s: &str, subgroups: bool, shader_f16: bool) -> Result<MatvecShape, String> {
        let mut parts = s.split(',');
        let dims = parts.next().unwrap_or_default();
        let bad = || {
            format!(
                "PARLEY_GPU_MATVEC `{s}`: expected WGxROWS with WG one of {WORKGROUP_SIZES:?} and ROWS one of {ROWS_PER_WORKGROUP:?}, optionally followed by `,workgroup` and `,f16`"
            )
        };
        let (wg, rows) = dims.split_once('x').ok_or_else(bad)?;
        let wg: u32 = wg.trim().parse().map_err(|_| bad())?;
        let rows: u32 = rows.trim().parse().map_err(|_| bad())?;
        if !WORKGROUP_SIZES.contains(&wg) || !ROWS_PER_WORKGROUP.contains(&rows) {
            return Err(bad());
        }
        let mut shape = MatvecShape {
            wg,
            rows,
            subgroups,
            f16: false,
        };
        for opt in parts {
            match opt.trim() {
                "subgroup" => {}
                "workgroup" => shape.subgroups = false,
                "f16" => shape.f16 = shader_f16,
                _ => return Err(bad()),
            }
        }
        Ok(shape)
    }

    /// The kernel source for this shape.
    pub fn source(&self) -> String {
        let template = include_str!("../../../shaders/matvec_wide.wgsl");
        let keep = [
            if self.subgroups {
                "subgroup"
            } else {
                "workgroup"
            },
            if self.f16 { "f16math" } else { "f32math" },
        ];
        let mut body = String::with_capacity(template.len() + 256);
        if self.f16 {
            body.push_str("enable f16;\n");
        }
        // No `enable subgroups;`: naga (wgpu 30) takes the built-ins under wgpu's SUBGROUP
        // feature and refuses the directive as not yet implemented.
        body.push_str(&format!(
            "const WG: u32 = {}u;\nconst ROWS: u32 = {}u;\n",
            self.wg, self.rows
        ));
        let mut section: Option<&str> = None;
        for line in template.lines() {
            if let Some(name) = line.strip_prefix("//! ") {
                section = (name.trim() != "end").then_some(name.trim());
                continue;
            }
            if section.is_none_or(|s| keep.contains(&s)) {
                body.push_str(line);
                body.push('\n');
            }
        }
        let (entry, params, args) = if self.subgroups {
            (
                ", @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_id) sg: u32, @builtin(num_subgroups) n_sg: u32",
                ", lane: u32, sg: u32, n_sg: u32",
                ", lane, sg, n_sg",
            )
        } else {
            ("", "", "")
        };
        body.replace(" ENTRY_PARAMS", entry)
            .replace(" REDUCE_PARAMS", params)
            .replace(" REDUCE_ARGS", args)
    }
}

/// What a wide product reads as its input.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum MatvecInput {
    /// The activations as they are.
    #[default]
    Plain,
    /// `[a | b]` (each `cols` long): the product of `silu(a) * b`.
    Gated,
    /// The activations RMS-normalized with this weight and epsilon.
    RmsNormed { alpha: Vec<f32>, eps: f32 },
}

impl MatvecInput {
    pub(crate) fn flag(&self) -> u32 {
        match self {
            Self::Plain => 0,
            Self::Gated => 8,
            Self::RmsNormed { .. } => 16,
        }
    }
}

/// Whether a `[rows, cols]` matrix held in `format` is read by the wide kernels: rows of
/// whole 128-bit words, activations of whole vec4s.
pub fn is_wide(format: GpuFormat, cols: usize) -> bool {
    let row_words = match format {
        GpuFormat::F32 => cols,
        GpuFormat::F16 | GpuFormat::Bf16 => cols / 2,
        GpuFormat::Q8_0 => cols / 4,
        GpuFormat::Q4 => cols / 8,
    };
    cols.is_multiple_of(4) && row_words.is_multiple_of(4) && row_words > 0
}

/// One case of [`check_shapes`]: the largest error against the f64 definition and the
/// bound it must stay under.
#[derive(Debug, Clone)]
pub struct ShapeCheck {
    pub case: String,
    pub error: f64,
    pub bound: f64,
}

impl ShapeCheck {
    pub fn passed(&self) -> bool {
        self.error < self.bound
    }
}

/// The wide kernels in every shape `gpu` can run (subgroup reductions where it has them,
/// the workgroup-memory tree always), every format, the fused inputs (gate, RMS norm) and
/// the whole epilogue (bias, scale, residual), against an f64 definition over the very
/// values each format holds: rows that leave a partial workgroup, a matrix split into
/// chunks, 1 and 3 activation rows. Shapes are spread over the cases so every shape meets
/// every format. The GPU tests and `parley bench gpu --check` run it.
pub fn check_shapes(gpu: &super::gpu::Gpu) -> crate::Result<Vec<ShapeCheck>> {
    use super::gpu::{run_matvec, Epilogue, GpuWeight};
    let mut seed = 21u32;
    let mut rnd = move || {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    };
    let mut checks = vec![];
    let sizes = [
        (7usize, 64usize, 1u64 << 20),
        (13, 544, 3000),
        (130, 1056, 1 << 20),
    ];
    for (n, &(rows, cols, chunk)) in sizes.iter().enumerate() {
        for format in [
            GpuFormat::F32,
            GpuFormat::F16,
            GpuFormat::Bf16,
            GpuFormat::Q8_0,
            GpuFormat::Q4,
        ] {
            let shapes = MatvecShape::candidates_for(format, gpu.subgroups, gpu.shader_f16);
            let w: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
            let g = GpuWeight::upload(gpu, "check", &w, rows, cols, format, chunk)?;
            let held = format.round_trip(&w);
            let bias: Vec<f32> = (0..rows).map(|_| rnd()).collect();
            let scale: Vec<f32> = (0..rows).map(|_| 1.0 + rnd()).collect();
            let alpha: Vec<f32> = (0..cols).map(|_| 1.0 + rnd()).collect();
            // 9 rows: the tiled matrix-matrix kernel (plain input; fused inputs stay on
            // the mat-vec kernels, one row at a time).
            for m in [1usize, 3, 9] {
                for input in [
                    MatvecInput::Plain,
                    MatvecInput::Gated,
                    MatvecInput::RmsNormed {
                        alpha: alpha.clone(),
                        eps: 1e-5,
                    },
                ] {
                    let width = if input == MatvecInput::Gated {
                        2 * cols
                    } else {
                        cols
                    };
                    let x: Vec<f32> = (0..m * width).map(|_| 4.0 * rnd()).collect();
                    let init: Vec<f32> = (0..m * rows).map(|_| rnd()).collect();
                    let want = definition(&held, rows, cols, &x, m, &input, &bias, &scale, &init);
                    let size = want.iter().fold(1f64, |a, b| a.max(b.abs()));
                    let epi = Epilogue {
                        accumulate: true,
                        bias: Some(bias.clone()),
                        scale: Some(scale.clone()),
                        input: input.clone(),
                        ..Default::default()
                    };
                    let name = match input {
                        MatvecInput::Plain => "plain",
                        MatvecInput::Gated => "gated",
                        MatvecInput::RmsNormed { .. } => "rms-normed",
                    };
                    let tiled = m >= super::gpu::MATMUL_MIN_ROWS && input == MatvecInput::Plain;
                    let picks: Vec<Option<MatvecShape>> = if tiled {
                        vec![None]
                    } else {
                        shapes
                            .iter()
                            .skip(n % 2)
                            .step_by(2)
                            .chain(shapes.first())
                            .map(|s| Some(*s))
                            .collect()
                    };
                    for shape in picks {
                        let got = run_matvec(gpu, &g, &x, m, &init, &epi, shape)?;
                        let error = got
                            .iter()
                            .zip(&want)
                            .map(|(a, b)| (f64::from(*a) - b).abs())
                            .fold(0f64, f64::max);
                        let how = shape.map_or("tiled".to_string(), |s| s.to_string());
                        // f16 products round the activations to 11 bits.
                        let rel = if shape.is_some_and(|s| s.f16) {
                            4e-3
                        } else {
                            2e-5
                        };
                        checks.push(ShapeCheck {
                            case: format!("{format} {rows}x{cols} m {m} {name} {how}"),
                            error,
                            bound: rel * size * (cols as f64).sqrt(),
                        });
                    }
                    // The same rows read 8 values apart (overlapping windows when that is
                    // less than a row, as a convolution's are) into an offset output.
                    if input == MatvecInput::Plain {
                        let stride = cols + 8;
                        let mut xs = vec![0f32; (m - 1) * stride + cols];
                        for i in 0..m {
                            xs[i * stride..i * stride + cols]
                                .copy_from_slice(&x[i * cols..(i + 1) * cols]);
                        }
                        let base = 5;
                        let mut init2 = vec![7f32; base];
                        init2.extend_from_slice(&init);
                        let epi = Epilogue {
                            x_stride: stride,
                            out_base: base,
                            ..epi.clone()
                        };
                        let got = run_matvec(gpu, &g, &xs, m, &init2, &epi, None)?;
                        let kept = got[..base].iter().all(|&v| v == 7.0);
                        let error = got[base..]
                            .iter()
                            .zip(&want)
                            .map(|(a, b)| (f64::from(*a) - b).abs())
                            .fold(if kept { 0f64 } else { f64::INFINITY }, f64::max);
                        let how = if m >= super::gpu::MATMUL_MIN_ROWS {
                            "tiled".to_string()
                        } else {
                            gpu.matvec_shape(format)?.0.to_string()
                        };
                        checks.push(ShapeCheck {
                            case: format!("{format} {rows}x{cols} m {m} strided {how}"),
                            error,
                            bound: 2e-5 * size * (cols as f64).sqrt(),
                        });
                    }
                }
            }
        }
    }
    Ok(checks)
}

/// `(w @ input(x)^T) + bias) * scale + init` in f64.
#[allow(clippy::too_many_arguments)]
fn definition(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    input: &MatvecInput,
    bias: &[f32],
    scale: &[f32],
    init: &[f32],
) -> Vec<f64> {
    let width = x.len() / m;
    let xin: Vec<f64> = (0..m)
        .flat_map(|i| {
            let r = &x[i * width..(i + 1) * width];
            let ms = r.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / cols as f64;
            (0..cols).map(move |k| match input {
                MatvecInput::Plain => f64::from(r[k]),
                MatvecInput::Gated => {
                    let a = f64::from(r[k]);
                    a / (1.0 + (-a).exp()) * f64::from(r[cols + k])
                }
                MatvecInput::RmsNormed { alpha, eps } => {
                    f64::from(r[k]) * f64::from(alpha[k]) / (ms + f64::from(*eps)).sqrt()
                }
            })
        })
        .collect();
    (0..m * rows)
        .map(|o| {
            let (i, j) = (o / rows, o % rows);
            let dot: f64 = (0..cols)
                .map(|k| f64::from(w[j * cols + k]) * xin[i * cols + k])
                .sum();
            (dot + f64::from(bias[j])) * f64::from(scale[j]) + f64::from(init[o])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_keeps_its_own_reduction_and_products() {
        for subgroups in [false, true] {
            for shape in MatvecShape::candidates_for(GpuFormat::F16, subgroups, true) {
                let src = shape.source();
                assert!(!src.contains("ENTRY_PARAMS") && !src.contains("REDUCE_"));
                assert_eq!(src.contains("subgroupAdd"), shape.subgroups, "{shape}");
                assert_eq!(src.contains("vec4<f16>"), shape.f16, "{shape}");
            }
        }
    }

    #[test]
    fn the_override_is_parsed_and_checked() {
        let s = MatvecShape::parse("128x4", true, true).expect("parse");
        assert_eq!((s.wg, s.rows, s.subgroups, s.f16), (128, 4, true, false));
        let s = MatvecShape::parse("256x1,workgroup,f16", true, true).expect("parse");
        assert!(!s.subgroups && s.f16);
        // Subgroups and f16 are never asked of an adapter without them.
        assert!(
            !MatvecShape::parse("64x2", false, false)
                .expect("parse")
                .subgroups
        );
        assert!(
            !MatvecShape::parse("64x2,f16", true, false)
                .expect("parse")
                .f16
        );
        for bad in ["", "64", "64x3", "96x2", "64x2,warp", "x2", "64x-1"] {
            let e = MatvecShape::parse(bad, true, true).expect_err(bad);
            assert!(
                e.contains("PARLEY_GPU_MATVEC") && e.contains("WGxROWS"),
                "{e}"
            );
        }
    }

    #[test]
    fn wide_needs_whole_words_and_vec4s() {
        assert!(is_wide(GpuFormat::F32, 4));
        assert!(!is_wide(GpuFormat::F32, 6));
        assert!(is_wide(GpuFormat::F16, 8));
        assert!(!is_wide(GpuFormat::F16, 4));
        assert!(is_wide(GpuFormat::Q8_0, 32));
        assert!(is_wide(GpuFormat::Q4, 32));
        assert!(!is_wide(GpuFormat::Bf16, 2));
    }
}
