//! Parley's quantized kernels (engine/src/compute/quant.rs, included as
//! it is) built for aarch64 and tested under qemu, with the two items of the engine it
//! uses (`Error`, `compute::cpu`'s `PARALLEL_MIN_WEIGHTS` and `transpose`) restated.
#[derive(Debug)]
pub enum Error {
    InvalidInput(String),
}
impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Error::InvalidInput(s) = self;
        f.write_str(s)
    }
}
pub type Result<T> = std::result::Result<T, Error>;
pub mod compute;
