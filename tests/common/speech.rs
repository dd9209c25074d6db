//! The speech recording the codec tests stream, and how far two signals differ.

use std::path::Path;

use parley_engine::audio::file::read_audio_24k;

/// The tiny codec fixture's input (4.6 s of speech), cut to whole 80 ms frames.
pub fn speech() -> Vec<f32> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mimi-tiny/input.wav");
    let mut pcm = read_audio_24k(&path).expect("read");
    pcm.truncate(pcm.len() / 1920 * 1920);
    pcm
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}
