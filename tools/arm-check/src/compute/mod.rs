//! `compute::cpu`'s two items the kernels use, restated; `quant` and `team` as they are.
pub mod cpu {
    pub(crate) const PARALLEL_MIN_WEIGHTS: usize = 1 << 18;
    pub(crate) fn transpose(out_t: Vec<f32>, rows: usize, m: usize) -> Vec<f32> {
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0f32; m * rows];
        for (j, row) in out_t.chunks_exact(m).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                out[i * rows + j] = v;
            }
        }
        out
    }
}
#[path = "../../../../engine/src/compute/quant.rs"]
pub mod quant;
#[path = "../../../../engine/src/compute/team.rs"]
pub mod team;
