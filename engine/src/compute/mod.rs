//! Compute backends. `cpu`: the weight-streaming kernels that the CPU path runs for
//! small-batch products (candle-core's gemm does the rest). `gpu`: the wgpu runtime and
//! its kernels. [`Dtype`]: the weight format asked for, mapped to either.

pub mod cpu;
pub mod gpu;
pub mod gpu_matvec;
pub mod prefetch;
pub mod quant;
pub mod team;

/// The weight format asked for on the command line, for whichever device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dtype {
    /// q8_0 on the CPU where it fits in memory and keeps up (else q6, q5 or q4: see
    /// `WeightPrecision::auto_for`), bf16 on the GPU (what Kyutai publishes, so nothing is
    /// rounded).
    #[default]
    Auto,
    F32,
    /// GPU only.
    F16,
    Bf16,
    Q8_0,
    /// CPU only.
    Q6,
    /// CPU only.
    Q5,
    Q4,
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "q6" => Ok(Self::Q6),
            "q5" | "q5_0" => Ok(Self::Q5),
            "q4" | "q4k" | "q4_0" => Ok(Self::Q4),
            other => Err(format!(
                "unknown weight format `{other}` (auto, f32, f16, bf16, q8_0, q6, q5 or q4)"
            )),
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q6 => "q6",
            Self::Q5 => "q5",
            Self::Q4 => "q4",
        })
    }
}

impl Dtype {
    /// The CPU's precision for this format (`auto` without a known model size: q8_0).
    pub fn cpu(self) -> crate::Result<cpu::WeightPrecision> {
        use cpu::WeightPrecision as P;
        match self {
            Self::F32 => Ok(P::F32),
            Self::Auto => Ok(P::Q8_0),
            Self::Bf16 => Ok(P::Bf16),
            Self::Q8_0 => Ok(P::Q8_0),
            Self::Q6 => Ok(P::Q6),
            Self::Q5 => Ok(P::Q5),
            Self::Q4 => Ok(P::Q4),
            Self::F16 => Err(crate::Error::InvalidInput(
                "f16 weights are a GPU format; on the CPU use bf16".into(),
            )),
        }
    }

    /// Mimi's precision for this choice: Mimi runs on the CPU, in f32 (the reference's
    /// arithmetic) when asked, bf16 beside a bf16 or f16 LM, and q8_0 otherwise, `auto`
    /// included (its transformers and large convolutions through the integer kernels:
    /// 0.6x bf16's time per frame on one thread; latents within 2% of f32's,
    /// `tests/mimi_streaming.rs`).
    pub fn mimi_precision(self) -> cpu::WeightPrecision {
        match self {
            Self::F32 => cpu::WeightPrecision::F32,
            Self::Bf16 | Self::F16 => cpu::WeightPrecision::Bf16,
            Self::Auto | Self::Q8_0 | Self::Q6 | Self::Q5 | Self::Q4 => cpu::WeightPrecision::Q8_0,
        }
    }

    /// The GPU's format for this choice.
    pub fn gpu(self) -> crate::Result<gpu::GpuFormat> {
        use gpu::GpuFormat as G;
        Ok(match self {
            Self::Auto | Self::Bf16 => G::Bf16,
            Self::F32 => G::F32,
            Self::F16 => G::F16,
            Self::Q8_0 => G::Q8_0,
            Self::Q4 => G::Q4,
            Self::Q6 | Self::Q5 => {
                return Err(crate::Error::InvalidInput(format!(
                    "{self} weights are a CPU format; on the GPU use q8_0 or q4"
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q5_and_q6_are_cpu_formats_and_the_gpu_refuses_them_by_name() {
        for (name, want, cpu) in [
            ("q5", Dtype::Q5, cpu::WeightPrecision::Q5),
            ("q5_0", Dtype::Q5, cpu::WeightPrecision::Q5),
            ("q6", Dtype::Q6, cpu::WeightPrecision::Q6),
        ] {
            let d: Dtype = name.parse().expect("parses");
            assert_eq!(d, want);
            assert_eq!(d.cpu().expect("cpu"), cpu);
            assert_eq!(d.mimi_precision(), cpu::WeightPrecision::Q8_0);
            let err = d.gpu().expect_err("the GPU has no q5 or q6 kernels");
            let err = err.to_string();
            assert!(
                err.contains(&want.to_string()) && err.contains("CPU"),
                "{err}"
            );
        }
        let err = "q7".parse::<Dtype>().expect_err("unknown");
        assert!(err.contains("q6") && err.contains("q5"), "{err}");
        assert_eq!(Dtype::Q4.gpu().expect("q4"), gpu::GpuFormat::Q4);
    }
}
