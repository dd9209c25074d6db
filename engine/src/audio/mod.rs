//! Audio: files in and out, resampling to the model rate. Devices, rings and the virtual
//! device come with the real-time pipeline.

pub mod file;
pub mod resample;

/// The one sample rate every model stage works at.
pub const SAMPLE_RATE_HZ: u32 = 24_000;
/// One model frame: 80 ms at 24 kHz.
pub const FRAME_LEN_SAMPLES: usize = 1920;
