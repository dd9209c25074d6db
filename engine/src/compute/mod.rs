//! Compute backends. `cpu`: the weight-streaming kernels that the CPU path runs for
//! small-batch products (candle-core's gemm does the rest). The wgpu runtime comes next.

pub mod cpu;
pub mod gpu;
