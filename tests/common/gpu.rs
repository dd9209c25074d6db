//! The GPU a test runs on: any adapter, lavapipe included (`--device gpu`), or None with
//! the reason printed, so GPU tests skip rather than fail where no adapter exists.

use std::sync::Arc;

use parley_engine::compute::gpu::{backends, select, Backend, DeviceChoice, Gpu};

pub fn any_gpu() -> Option<Arc<Gpu>> {
    match select(DeviceChoice::Gpu, backends()) {
        Ok((Backend::Gpu(g), line)) => {
            eprintln!("{line}");
            Some(g)
        }
        Ok((Backend::Cpu, _)) => None,
        Err(e) => {
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}
