//! Reading any audio file into 24 kHz mono f32, and writing WAV.
//!
//! WAV goes through hound; everything else (mp3, flac, ogg/vorbis, m4a/aac) through
//! symphonia. Channels are averaged to mono and the result is resampled with rubato.

use std::fs::File;
use std::path::Path;

use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::DecoderOptions;
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use super::resample::resample_mono;
use super::SAMPLE_RATE_HZ;
use crate::{Error, Result};

/// Decoded audio: interleaved-free mono samples at `sample_rate_hz`.
#[derive(Debug, Clone)]
pub struct MonoAudio {
    pub pcm: Vec<f32>,
    pub sample_rate_hz: u32,
}

/// Sample rates an audio file may have (telephone speech to studio masters).
pub const SAMPLE_RATES_HZ: std::ops::RangeInclusive<u32> = 4_000..=384_000;
/// Channels an audio file may have.
pub const MAX_CHANNELS: usize = 64;
/// The longest audio read: 4 hours (at 48 kHz mono, 2.8 GB of f32), so a small compressed
/// file that decodes to endless samples is an error rather than exhausted memory.
pub const MAX_DURATION_S: u64 = 4 * 3600;

/// The checks every file's stream passes before its samples are trusted.
fn check_stream(path: &Path, sample_rate_hz: u32, channels: usize) -> Result<()> {
    if !SAMPLE_RATES_HZ.contains(&sample_rate_hz) {
        return Err(Error::audio(
            path,
            format!(
                "a sample rate of {sample_rate_hz} Hz ({} to {} Hz expected)",
                SAMPLE_RATES_HZ.start(),
                SAMPLE_RATES_HZ.end()
            ),
        ));
    }
    if channels == 0 || channels > MAX_CHANNELS {
        return Err(Error::audio(
            path,
            format!("{channels} channels (1 to {MAX_CHANNELS} expected)"),
        ));
    }
    Ok(())
}

/// An error once `samples` (mono) at `sample_rate_hz` pass [`MAX_DURATION_S`].
fn check_length(path: &Path, samples: usize, sample_rate_hz: u32) -> Result<()> {
    if samples as u64 > MAX_DURATION_S * u64::from(sample_rate_hz) {
        return Err(Error::audio(
            path,
            format!(
                "more than {} hours of audio (at most that is read)",
                MAX_DURATION_S / 3600
            ),
        ));
    }
    Ok(())
}

/// Reads `path` (any supported format, rate and channel count) as 24 kHz mono.
pub fn read_audio_24k(path: &Path) -> Result<Vec<f32>> {
    let audio = read_audio_mono(path)?;
    resample_mono(&audio.pcm, audio.sample_rate_hz, SAMPLE_RATE_HZ)
}

thread_local! {
    /// Set while this thread decodes a compressed file: a panic then is the file's error.
    static DECODING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs, once, a panic hook that says nothing for a panic caught while decoding (the
/// error names the file instead) and hands every other panic to the hook there was.
fn quiet_decoder_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !DECODING.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
}

/// Reads `path` as mono at its own sample rate.
pub fn read_audio_mono(path: &Path) -> Result<MonoAudio> {
    if path.is_dir() {
        return Err(Error::audio(path, "a directory, not an audio file"));
    }
    let is_wav = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("wav") || e.eq_ignore_ascii_case("wave"));
    let audio = if is_wav {
        read_wav(path)?
    } else {
        // symphonia's demuxers have panicked on hostile bytes (an ADTS length that
        // underflows, found by tests/hostile_inputs.rs): a decoder's panic is this file's
        // error, not the program's end. Nothing it touched outlives the call.
        quiet_decoder_panics();
        DECODING.with(|d| d.set(true));
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_with_symphonia(path)));
        DECODING.with(|d| d.set(false));
        r.unwrap_or_else(|_| {
            Err(Error::audio(
                path,
                "the decoder failed on this file (corrupt or not audio)",
            ))
        })?
    };
    if audio.pcm.is_empty() {
        return Err(Error::audio(path, "the file holds no audio samples"));
    }
    if let Some(i) = audio.pcm.iter().position(|x| !x.is_finite()) {
        return Err(Error::audio(
            path,
            format!("sample {i} is not a finite number"),
        ));
    }
    Ok(audio)
}

fn read_wav(path: &Path) -> Result<MonoAudio> {
    let reader = hound::WavReader::open(path).map_err(|e| match e {
        // hound says a header ends early with an `Other` error of this text.
        hound::Error::IoError(io)
            if io.kind() == std::io::ErrorKind::UnexpectedEof
                || io.to_string() == "Failed to read enough bytes." =>
        {
            let len = std::fs::metadata(path).map_or(0, |m| m.len());
            if len == 0 {
                Error::audio(path, "the file is empty (0 bytes), not a WAV file")
            } else {
                Error::audio(
                    path,
                    format!("not a readable WAV file: it ends after {len} bytes, within its header (a RIFF/WAVE header with `fmt ` and `data` chunks expected)"),
                )
            }
        }
        hound::Error::IoError(io) => Error::io(path, io),
        other => Error::audio(path, format!("not a readable WAV file: {other}")),
    })?;
    let spec = reader.spec();
    let channels = spec.channels as usize;
    check_stream(path, spec.sample_rate, channels)?;
    // hound takes the header's sample size as it is.
    let bits_ok = match spec.sample_format {
        hound::SampleFormat::Int => (8..=32).contains(&spec.bits_per_sample),
        hound::SampleFormat::Float => spec.bits_per_sample == 32,
    };
    if !bits_ok {
        return Err(Error::audio(
            path,
            format!(
                "{} bits per {:?} sample (8 to 32 bit integers or 32-bit floats expected)",
                spec.bits_per_sample, spec.sample_format
            ),
        ));
    }
    // The header's length is checked before anything is sized from it (a sparse file can
    // hold gigabytes of claimed samples); the reader reads no more than the file holds.
    check_length(path, reader.duration() as usize, spec.sample_rate)?;
    let claimed = u64::from(reader.len()) * u64::from(spec.bits_per_sample.div_ceil(8));
    let file_len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if claimed > file_len {
        return Err(Error::audio(
            path,
            format!(
                "the header claims {claimed} bytes of samples, more than the file's {file_len} bytes (a truncated file?)"
            ),
        ));
    }
    let corrupt = |e: hound::Error| Error::audio(path, format!("corrupt WAV data: {e}"));
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .into_samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(corrupt)?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|s| s as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(corrupt)?
        }
    };
    Ok(MonoAudio {
        pcm: downmix(&interleaved, channels),
        sample_rate_hz: spec.sample_rate,
    })
}

fn read_with_symphonia(path: &Path) -> Result<MonoAudio> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mss = MediaSourceStream::new(Box::new(file), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    let probed = symphonia::default::get_probe()
        .format(
            &hint,
            mss,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| Error::audio(path, format!("unrecognised or corrupt audio file: {e}")))?;
    let mut format = probed.format;
    let track = format
        .default_track()
        .ok_or_else(|| Error::audio(path, "no audio track"))?;
    let track_id = track.id;
    let mut sample_rate_hz = track.codec_params.sample_rate;
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| Error::audio(path, format!("unsupported codec: {e}")))?;
    let mut pcm = Vec::new();
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymError::ResetRequired) => break,
            Err(e) => return Err(Error::audio(path, format!("corrupt stream: {e}"))),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            // A damaged packet is skipped, as players do; the rest of the file still counts.
            Err(SymError::DecodeError(_)) => continue,
            Err(e) => return Err(Error::audio(path, format!("decoding failed: {e}"))),
        };
        let spec = *decoded.spec();
        let rate = *sample_rate_hz.get_or_insert(spec.rate);
        check_stream(path, rate, spec.channels.count())?;
        check_length(path, pcm.len() + decoded.frames(), rate)?;
        let mut buf = SampleBuffer::<f32>::new(decoded.capacity() as u64, spec);
        buf.copy_interleaved_ref(decoded);
        pcm.extend(downmix(buf.samples(), spec.channels.count().max(1)));
    }
    let sample_rate_hz =
        sample_rate_hz.ok_or_else(|| Error::audio(path, "the stream has no sample rate"))?;
    Ok(MonoAudio {
        pcm,
        sample_rate_hz,
    })
}

fn downmix(interleaved: &[f32], channels: usize) -> Vec<f32> {
    if channels == 1 {
        return interleaved.to_vec();
    }
    interleaved
        .chunks_exact(channels)
        .map(|frame| frame.iter().sum::<f32>() / channels as f32)
        .collect()
}

/// Writes mono f32 samples as a 32-bit float WAV (lossless for the model's output),
/// through a temporary file renamed into place.
pub fn write_wav_f32(path: &Path, pcm: &[f32], sample_rate_hz: u32) -> Result<()> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: sample_rate_hz,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    let wrap = |e: hound::Error| match e {
        hound::Error::IoError(io) => Error::io(path, io),
        other => Error::audio(path, other),
    };
    // Written beside the target and renamed into place: a failure never leaves half a
    // file where the output should be.
    crate::outfile::write_atomically(path, |tmp| {
        let mut writer = hound::WavWriter::create(tmp, spec).map_err(wrap)?;
        for &s in pcm {
            writer.write_sample(s).map_err(wrap)?;
        }
        writer.finalize().map_err(wrap)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("parley-audio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        dir.join(name)
    }

    #[test]
    fn stereo_int16_wav_at_48k_becomes_24k_mono() {
        let path = tmp("stereo48.wav");
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 48_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(&path, spec).expect("create");
        for i in 0..48_000 {
            let v = ((i as f32 / 48.0).sin() * 8000.0) as i16;
            w.write_sample(v).expect("l");
            w.write_sample(v / 2).expect("r");
        }
        w.finalize().expect("finalize");
        let pcm = read_audio_24k(&path).expect("read");
        assert_eq!(pcm.len(), 24_000);
        let peak = pcm.iter().fold(0f32, |m, x| m.max(x.abs()));
        // (1 + 1/2) / 2 of 8000/32768.
        assert!((peak - 0.75 * 8000.0 / 32768.0).abs() < 0.01, "peak {peak}");
    }

    #[test]
    fn compressed_formats_decode_to_the_sine_they_hold() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/audio");
        for name in ["tone.flac", "tone.ogg", "tone.mp3"] {
            let pcm = read_audio_24k(&dir.join(name)).expect(name);
            // 0.5 s at 24 kHz; lossy codecs may add up to a frame of priming.
            assert!(
                (11_900..=13_500).contains(&pcm.len()),
                "{name}: {} samples",
                pcm.len()
            );
            // Amplitude of a -6 dBFS sine (0.5), measured away from the edges.
            let mid = &pcm[2000..10_000];
            let rms = (mid.iter().map(|x| x * x).sum::<f32>() / mid.len() as f32).sqrt();
            assert!((rms - 0.5 / 2f32.sqrt()).abs() < 0.03, "{name}: rms {rms}");
            // 440 Hz: 8000 samples at 24 kHz hold about 293 zero crossings.
            let crossings = mid
                .windows(2)
                .filter(|w| (w[0] < 0.0) != (w[1] < 0.0))
                .count();
            assert!(
                (285..=300).contains(&crossings),
                "{name}: {crossings} zero crossings"
            );
        }
    }

    /// A header's sample rate or channel count out of sense is an error naming it, before
    /// anything is sized from it (2^31 - 1 Hz once took gigabytes to resample).
    #[test]
    fn absurd_headers_are_named_errors() {
        for (rate, channels, want) in [
            (
                2_147_483_647,
                1,
                "a sample rate of 2147483647 Hz (4000 to 384000 Hz expected)",
            ),
            (1, 1, "a sample rate of 1 Hz"),
            (24_000, 65, "65 channels (1 to 64 expected)"),
        ] {
            let path = tmp(&format!("absurd-{rate}-{channels}.wav"));
            let spec = hound::WavSpec {
                channels,
                sample_rate: rate,
                bits_per_sample: 16,
                sample_format: hound::SampleFormat::Int,
            };
            let mut w = hound::WavWriter::create(&path, spec).expect("create");
            for _ in 0..channels as usize * 100 {
                w.write_sample(0i16).expect("sample");
            }
            w.finalize().expect("finalize");
            let err = read_audio_24k(&path).expect_err(want).to_string();
            assert!(err.contains(want) && err.contains("absurd-"), "{err}");
        }
        assert!(check_length(Path::new("x"), 4 * 3600 * 8000 + 1, 8000).is_err());
        assert!(check_length(Path::new("x"), 4 * 3600 * 8000, 8000).is_ok());
    }

    #[test]
    fn float_wav_round_trips_exactly() {
        let path = tmp("f32.wav");
        let pcm: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.01).sin() * 0.5).collect();
        write_wav_f32(&path, &pcm, 24_000).expect("write");
        assert_eq!(read_audio_24k(&path).expect("read"), pcm);
    }

    #[test]
    fn corrupt_and_missing_files_are_named_errors() {
        let path = tmp("corrupt.wav");
        std::fs::write(&path, b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk").expect("write");
        let err = read_audio_24k(&path)
            .expect_err("corrupt wav must fail")
            .to_string();
        assert!(err.contains("corrupt.wav"), "{err}");

        let truncated = tmp("truncated.wav");
        write_wav_f32(&truncated, &[0.1; 100], 24_000).expect("write");
        let bytes = std::fs::read(&truncated).expect("read");
        std::fs::write(&truncated, &bytes[..bytes.len() - 3]).expect("truncate");
        let err = read_audio_24k(&truncated)
            .expect_err("truncated wav must fail")
            .to_string();
        assert!(err.contains("truncated.wav"), "{err}");

        let garbage = tmp("garbage.mp3");
        std::fs::write(&garbage, vec![0x55u8; 4096]).expect("write");
        let err = read_audio_24k(&garbage)
            .expect_err("garbage must fail")
            .to_string();
        assert!(err.contains("garbage.mp3"), "{err}");

        let missing = tmp("missing.flac");
        let err = read_audio_24k(&missing)
            .expect_err("missing must fail")
            .to_string();
        assert!(err.contains("missing.flac"), "{err}");
    }
}
