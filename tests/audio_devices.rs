//! The live audio device layer and the virtual device: the real-time processors (format
//! conversion, downmix, overruns, underruns, and that they never allocate), the streaming
//! resamplers, `FileSource` pacing and `RecordingSink`, and a run on the real default
//! devices (skipped with a printed reason where there are none, unless
//! `PARLEY_REQUIRE_AUDIO=1`).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use parley_engine::audio::device::{
    event_channel, list_devices, AudioEvent, AudioStats, CaptureProcessor, DeviceOptions,
    MicSource, PlaybackProcessor, SpeakerSink,
};
use parley_engine::audio::file::read_audio_24k;
use parley_engine::audio::resample::{InputResampler, OutputResampler};
use parley_engine::audio::virtual_device::{FileSource, Pace, RecordingSink};
use parley_engine::audio::{FrameSink, FrameSource, FRAME_LEN_SAMPLES, SAMPLE_RATE_HZ};
use parley_engine::Error;
use ringbuf::traits::{Consumer, Observer};

// Every allocation in this test binary goes through assert_no_alloc's checker: inside
// `assert_no_alloc(..)`, which wraps the body of every audio callback, an allocation aborts
// the process. So the processor tests below, and the callbacks cpal runs in the real-device
// test, fail loudly if the real-time path ever allocates. (In release builds the crate's
// default `disable_release` feature turns the checker off and the allocator does not exist.)
#[cfg(debug_assertions)]
#[global_allocator]
static ALLOC: assert_no_alloc::AllocDisabler = assert_no_alloc::AllocDisabler;

fn sine(freq_hz: f32, rate_hz: u32, len: usize, amplitude: f32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            amplitude * (2.0 * std::f32::consts::PI * freq_hz * i as f32 / rate_hz as f32).sin()
        })
        .collect()
}

fn rms(x: &[f32]) -> f32 {
    (x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32).sqrt()
}

/// Moves frames from any source to any sink, as a pipeline would; returns the frame count.
fn pump(
    source: &mut dyn FrameSource,
    sink: &mut dyn FrameSink,
    max_frames: usize,
) -> parley_engine::Result<usize> {
    let mut frame = [0.0f32; FRAME_LEN_SAMPLES];
    let mut n = 0;
    while n < max_frames && source.next_frame(&mut frame)? {
        sink.write_frame(&frame)?;
        n += 1;
    }
    Ok(n)
}

/// Writes past the test harness's output capture, so a skip reason is always seen.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

// ---------------------------------------------------------------------------------------
// (a) The real-time path never allocates, and the check really catches allocations.

/// Runs the capture and playback callback bodies (`process_callback`, exactly what the cpal
/// closures call) over every sample format and every path (overrun, underrun, idle).
fn run_callbacks_once() -> parley_engine::audio::AudioStatsSnapshot {
    let stats = AudioStats::new();
    let (mut capture, mut ring) =
        CaptureProcessor::with_ring(2, 4096, stats.clone()).expect("capture ring");
    let (mut playback, mut feed) =
        PlaybackProcessor::with_ring(2, 4096, stats.clone()).expect("playback ring");
    let in_f32 = vec![0.25f32; 2 * 3000];
    let in_i16 = vec![1000i16; 2 * 3000];
    let in_u16 = vec![40_000u16; 2 * 3000];
    let mut out_f32 = vec![0.0f32; 2 * 3000];
    let mut out_i16 = vec![0i16; 2 * 3000];
    let mut out_u16 = vec![0u16; 2 * 3000];
    let mut popped = vec![0.0f32; 4096];
    feed.set_active(true);
    assert_eq!(feed.push(&[0.5; 1000]), 1000);

    // Everything in here runs as it does in the callbacks; an allocation aborts the process.
    assert_no_alloc::assert_no_alloc(|| {
        capture.process_callback(&in_f32);
        capture.process_callback(&in_i16); // 6000 mono samples into a 4096 ring: overrun
        let _ = ring.pop_slice(&mut popped);
        capture.process_callback(&in_u16);
        playback.process_callback(&mut out_f32); // 1000 queued, 2000 short: underrun
        playback.process_callback(&mut out_i16);
        // A cancelled reply: the queued audio is dropped by the next callback, not played.
        feed.push(&[0.5; 1000]);
        feed.discard_queued();
        playback.process_callback(&mut out_f32);
        feed.set_active(false);
        playback.process_callback(&mut out_u16); // idle silence
    });
    assert_eq!(feed.queued_samples(), 0, "the discard emptied the ring");
    assert!(
        out_f32.iter().all(|&v| v == 0.0),
        "discarded audio was played"
    );
    stats.snapshot()
}

#[test]
fn callbacks_do_not_allocate() {
    let s = run_callbacks_once();
    assert!(s.overrun_samples > 0, "the overrun path ran: {s:?}");
    assert!(s.underrun_samples > 0, "the underrun path ran: {s:?}");
    assert_eq!(s.capture_callbacks, 3);
    assert_eq!(s.playback_callbacks, 4);
}

const ALLOC_CHILD_ENV: &str = "PARLEY_ALLOC_CHECK_CHILD";

/// Run only as a child process of `an_allocation_under_the_guard_aborts_the_process`.
#[test]
#[ignore = "run in a child process by an_allocation_under_the_guard_aborts_the_process"]
fn alloc_check_child() {
    match std::env::var(ALLOC_CHILD_ENV).as_deref() {
        Ok("allocate") => assert_no_alloc::assert_no_alloc(|| {
            let v: Vec<u8> = Vec::with_capacity(std::hint::black_box(64));
            std::hint::black_box(v);
        }),
        Ok("callbacks") => {
            run_callbacks_once();
        }
        _ => {}
    }
}

#[cfg(debug_assertions)]
#[test]
fn an_allocation_under_the_guard_aborts_the_process() {
    let run = |mode: &str| {
        let exe = std::env::current_exe().expect("test binary path");
        Command::new(exe)
            .args([
                "alloc_check_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ALLOC_CHILD_ENV, mode)
            .output()
            .expect("run the test binary as a child")
    };

    // The control: the callbacks' bodies run in the child without tripping the checker.
    let clean = run("callbacks");
    let clean_out = String::from_utf8_lossy(&clean.stdout);
    assert!(
        clean.status.success() && clean_out.contains("1 passed"),
        "the clean child failed: {:?}\n{clean_out}\n{}",
        clean.status,
        String::from_utf8_lossy(&clean.stderr)
    );

    // One 64-byte allocation under the guard kills the process.
    let bad = run("allocate");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success(),
        "an allocation under assert_no_alloc went unnoticed: {:?}",
        bad.status
    );
    assert!(
        stderr.contains("memory allocation of 64 bytes failed"),
        "expected the allocation-failure abort, got: {stderr}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(bad.status.signal(), Some(6), "SIGABRT: {:?}", bad.status);
    }
}

// ---------------------------------------------------------------------------------------
// (b) The processors: conversion, downmix, overrun, underrun and silence.

#[test]
fn capture_converts_every_format_and_downmixes_to_mono() {
    let stats = AudioStats::new();
    let mut out = [0.0f32; 8];

    let (mut p, mut ring) = CaptureProcessor::with_ring(2, 64, stats.clone()).expect("ring");
    // i16: full scale is 32768; the channels are averaged.
    p.process(&[16384i16, -16384, 16384, 16384, -32768, -32768]);
    assert_eq!(ring.pop_slice(&mut out), 3);
    assert_eq!(&out[..3], &[0.0, 0.5, -1.0]);

    // u16: the midpoint 32768 is zero.
    p.process(&[32768u16 + 16384, 32768, 0, 0]);
    assert_eq!(ring.pop_slice(&mut out), 2);
    assert_eq!(&out[..2], &[0.25, -1.0]);

    // i8 and i32, too.
    p.process(&[64i8, 64]);
    p.process(&[i32::MIN, 0]);
    assert_eq!(ring.pop_slice(&mut out), 2);
    assert_eq!(&out[..2], &[0.5, -0.5]);

    // f32 over three channels.
    let (mut p3, mut ring3) = CaptureProcessor::with_ring(3, 64, stats.clone()).expect("ring");
    p3.process(&[0.25f32, 0.5, 0.75, -0.3, -0.3, -0.3]);
    assert_eq!(ring3.pop_slice(&mut out), 2);
    assert!(
        (out[0] - 0.5).abs() < 1e-6 && (out[1] + 0.3).abs() < 1e-6,
        "{out:?}"
    );

    let s = stats.snapshot();
    assert_eq!((s.captured_samples, s.overrun_samples), (9, 0));
    assert_eq!(s.capture_callbacks, 5);
}

#[test]
fn capture_counts_what_does_not_fit_as_overrun() {
    let stats = AudioStats::new();
    let (mut p, mut ring) = CaptureProcessor::with_ring(1, 100, stats.clone()).expect("ring");
    // Longer than the callbacks' staging buffer too, so the block loop is exercised.
    let input: Vec<f32> = (0..1500).map(|i| i as f32 / 2000.0).collect();
    p.process(&input);
    let s = stats.snapshot();
    assert_eq!(s.captured_samples, 1500);
    assert_eq!(s.overrun_samples, 1400);
    assert_eq!(s.overrun_events, 1);
    // The ring kept the oldest samples.
    let mut kept = vec![0.0; 100];
    assert_eq!(ring.pop_slice(&mut kept), 100);
    assert_eq!(kept, &input[..100]);

    // With room again, nothing more is dropped.
    p.process(&input[..50]);
    let s = stats.snapshot();
    assert_eq!((s.overrun_samples, s.overrun_events), (1400, 1));
    assert_eq!(ring.occupied_len(), 50);
}

#[test]
fn playback_plays_its_margin_ahead_of_each_run_and_measures_how_close_it_came_to_running_dry() {
    let stats = AudioStats::new();
    let (p, mut feed) = PlaybackProcessor::with_ring(1, 64, stats.clone()).expect("ring");
    // 3 ms at 1 kHz: a run of output starts with 3 samples of silence plus one block of
    // the device (its callbacks ask for 4 here) plus one of the capture device (none yet).
    let mut p = p.with_margin(Duration::from_millis(3), 1000);
    let mut out = [9.0f32; 4];
    p.process(&mut out);
    assert_eq!(out, [0.0; 4]);
    // Output expected but nothing written yet: idle, not an underrun, no low-water mark.
    feed.set_active(true);
    p.process(&mut out);
    let s = stats.snapshot();
    assert_eq!((s.underrun_events, s.playback_low_water_us), (0, None));

    assert_eq!(feed.push(&[1.0, 2.0, 3.0, 4.0, 5.0]), 5);
    p.process(&mut out);
    assert_eq!(out, [0.0; 4], "7 samples of margin first");
    // 5 queued + 7 of margin, 4 taken: 8 ms to spare.
    assert_eq!(stats.snapshot().playback_low_water_us, Some(8000));
    p.process(&mut out);
    assert_eq!(
        out,
        [0.0, 0.0, 0.0, 1.0],
        "the rest of the margin, then the audio"
    );
    assert_eq!(stats.snapshot().playback_low_water_us, Some(4000));
    assert_eq!(feed.push(&[6.0, 7.0]), 2);
    p.process(&mut out);
    assert_eq!(out, [2.0, 3.0, 4.0, 5.0]);
    assert_eq!(stats.snapshot().playback_low_water_us, Some(2000));
    p.process(&mut out);
    assert_eq!(out, [6.0, 7.0, 0.0, 0.0], "no second margin within a run");
    let s = stats.snapshot();
    assert_eq!(
        (
            s.underrun_events,
            s.underrun_samples,
            s.playback_low_water_us
        ),
        (1, 2, Some(0))
    );

    // A dropped reply starts a new run: the empty ring is idle until audio comes, and that
    // audio gets its margin again, now with the capture device's block (2 samples) in it.
    assert_eq!(feed.push(&[8.0, 8.0]), 2);
    feed.discard_queued();
    p.process(&mut out);
    assert_eq!(out, [0.0; 4]);
    assert_eq!(stats.snapshot().underrun_events, 1);
    let (capture, _ring) = CaptureProcessor::with_ring(1, 64, stats.clone()).expect("ring");
    let mut capture = capture.with_rate(1000);
    capture.process(&[0.1f32, 0.2, 0.3]); // the first callback is not a block
    capture.process(&[0.1f32, 0.2]);
    assert_eq!(feed.push(&[10.0, 11.0, 12.0, 13.0, 14.0, 15.0]), 6);
    p.process(&mut out);
    assert_eq!(out, [0.0; 4]);
    p.process(&mut out);
    assert_eq!(out, [0.0; 4]);
    p.process(&mut out);
    assert_eq!(out, [0.0, 10.0, 11.0, 12.0], "3 + 4 + 2 samples of margin");

    // After the output is finished, running dry is neither an underrun nor a low-water mark.
    feed.set_active(false);
    p.process(&mut out);
    assert_eq!(out, [13.0, 14.0, 15.0, 0.0]);
    let s = stats.snapshot();
    assert_eq!((s.underrun_events, s.playback_low_water_us), (1, Some(0)));
    assert_eq!(s.played_samples, 13);
}

#[test]
fn playback_fills_silence_and_counts_underruns_only_when_output_is_expected() {
    let stats = AudioStats::new();
    let (mut p, mut feed) = PlaybackProcessor::with_ring(2, 64, stats.clone()).expect("ring");

    // Idle (nothing written yet): silence, and no underrun.
    let mut out = [7i16; 8];
    p.process(&mut out);
    assert_eq!(out, [0; 8]);
    assert_eq!(stats.snapshot().underrun_events, 0);

    // Active with 3 samples queued for a 5-frame buffer: the 3 on both channels, then
    // silence, and 2 samples of underrun.
    feed.set_active(true);
    assert_eq!(feed.push(&[0.5, -0.5, 1.0]), 3);
    let mut out = [7i16; 10];
    p.process(&mut out);
    assert_eq!(
        out,
        [16384, 16384, -16384, -16384, 32767, 32767, 0, 0, 0, 0]
    );
    let s = stats.snapshot();
    assert_eq!(
        (s.played_samples, s.underrun_samples, s.underrun_events),
        (3, 2, 1)
    );

    // u16 silence is the midpoint, and f32 passes through.
    let mut out = [1u16; 4];
    p.process(&mut out);
    assert_eq!(out, [32768; 4]);
    assert_eq!(feed.push(&[0.25, -0.75]), 2);
    let mut out = [9.0f32; 4];
    p.process(&mut out);
    assert_eq!(out, [0.25, 0.25, -0.75, -0.75]);
    let s = stats.snapshot();
    assert_eq!(
        (s.played_samples, s.underrun_samples, s.underrun_events),
        (5, 4, 2)
    );
    assert_eq!(s.playback_callbacks, 4);

    // After the output is finished, running dry is not an underrun.
    feed.set_active(false);
    let mut out = [0.0f32; 6];
    p.process(&mut out);
    assert_eq!(stats.snapshot().underrun_events, 2);

    // Mono devices get the samples as they are; a buffer longer than the staging buffer too.
    let (mut mono, mut feed) = PlaybackProcessor::with_ring(1, 4000, stats.clone()).expect("ring");
    let pcm: Vec<f32> = (0..3000).map(|i| (i as f32 / 3000.0) - 0.5).collect();
    assert_eq!(feed.push(&pcm), 3000);
    let mut out = vec![0.0f32; 3000];
    mono.process(&mut out);
    assert_eq!(out, pcm);
}

#[test]
fn rings_of_nothing_are_errors() {
    assert!(CaptureProcessor::with_ring(0, 10, AudioStats::new()).is_err());
    assert!(PlaybackProcessor::with_ring(2, 0, AudioStats::new()).is_err());
}

// ---------------------------------------------------------------------------------------
// The streaming resamplers.

/// How many samples `pcm` (a sine of `freq_hz` at `rate_hz` starting at phase 0) lags
/// `sin(2 pi f t)`, from its phase over `pcm[range]` (away from the edges); unambiguous within
/// half a period.
fn sine_lag_samples(pcm: &[f32], range: std::ops::Range<usize>, freq_hz: f64, rate_hz: u32) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq_hz / rate_hz as f64;
    let (mut s, mut c) = (0.0, 0.0);
    for k in range {
        let x = pcm[k];
        s += x as f64 * (w * k as f64).sin();
        c += x as f64 * (w * k as f64).cos();
    }
    // x = sin(wk - phi) = sin(wk) cos(phi) - cos(wk) sin(phi).
    (-c).atan2(s) / w
}

#[test]
fn input_resampler_makes_24k_frames_on_time_and_at_level() {
    for rate_hz in [48_000u32, 44_100, 16_000, 24_000] {
        let mut r = InputResampler::new(rate_hz).expect("resampler");
        let mut frame = [0.0f32; FRAME_LEN_SAMPLES];
        // One second of two tones, pushed in pieces of awkward sizes as callbacks deliver
        // them: 50 Hz to measure the timing (phase), 440 Hz for the level.
        for freq_hz in [50.0, 440.0] {
            let input = sine(freq_hz, rate_hz, rate_hz as usize, 0.5);
            let mut frames = Vec::new();
            for piece in input.chunks(337) {
                r.push(piece).expect("push");
                while r.pop_frame(&mut frame) {
                    frames.extend_from_slice(&frame);
                }
            }
            // 12.5 frames' worth (the filter holds back a few samples); the second tone
            // follows the first without a gap.
            assert!(
                (12 * FRAME_LEN_SAMPLES..=13 * FRAME_LEN_SAMPLES).contains(&frames.len()),
                "{rate_hz} Hz: {} samples",
                frames.len()
            );
            if freq_hz == 50.0 {
                let lag = sine_lag_samples(&frames, 480..11_520, freq_hz as f64, SAMPLE_RATE_HZ);
                assert!(
                    lag.abs() < 1.5,
                    "{rate_hz} Hz: output lags by {lag:.2} samples"
                );
            } else {
                let level = rms(&frames[4800..]);
                assert!(
                    (level - 0.5 / 2f32.sqrt()).abs() < 0.01,
                    "{rate_hz} Hz: rms {level}"
                );
            }
        }
    }
}

#[test]
fn output_resampler_gives_the_device_rate_on_time_and_exactly_as_long() {
    for rate_hz in [48_000u32, 44_100, 24_000, 16_000] {
        let mut r = OutputResampler::new(rate_hz).expect("resampler");
        for (freq_hz, frames) in [(50.0, 10), (440.0, 1), (440.0, 7)] {
            let input = sine(freq_hz, SAMPLE_RATE_HZ, frames * FRAME_LEN_SAMPLES, 0.5);
            let mut out = Vec::new();
            for frame in input.chunks(FRAME_LEN_SAMPLES) {
                out.extend_from_slice(r.process(frame).expect("process"));
            }
            out.extend_from_slice(r.flush().expect("flush"));
            // Every stream (each ended by a flush) comes out exactly as long as it went in.
            let want = (input.len() as u64 * rate_hz as u64 + 12_000) / SAMPLE_RATE_HZ as u64;
            assert_eq!(out.len() as u64, want, "{rate_hz} Hz, {frames} frames");
            let n = out.len();
            if freq_hz == 50.0 {
                let lag = sine_lag_samples(&out, n / 10..n * 9 / 10, freq_hz as f64, rate_hz);
                assert!(
                    lag.abs() < 1.5,
                    "{rate_hz} Hz: output lags by {lag:.2} samples"
                );
            } else if frames > 1 {
                let level = rms(&out[n / 10..n * 9 / 10]);
                assert!(
                    (level - 0.5 / 2f32.sqrt()).abs() < 0.01,
                    "{rate_hz} Hz: rms {level}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// (c) The virtual device.

#[test]
fn file_source_unpaced_yields_every_frame_zero_padded() {
    let pcm: Vec<f32> = (0..3 * FRAME_LEN_SAMPLES + 100)
        .map(|i| (i % 1000) as f32 / 1000.0 + 0.001)
        .collect();
    let mut source = FileSource::from_pcm_24k(pcm.clone(), Pace::Unpaced);
    assert_eq!(source.frame_count(), 4);
    let mut frame = [0.0f32; FRAME_LEN_SAMPLES];
    let mut got = Vec::new();
    while source.next_frame(&mut frame).expect("next_frame") {
        got.extend_from_slice(&frame);
    }
    assert_eq!(got.len(), 4 * FRAME_LEN_SAMPLES);
    assert_eq!(&got[..pcm.len()], &pcm[..]);
    assert!(got[pcm.len()..].iter().all(|&x| x == 0.0), "zero padding");
    assert_eq!(source.frames_read(), 4);
    // The end stays the end.
    assert!(!source.next_frame(&mut frame).expect("after the end"));
}

#[test]
fn file_source_in_real_time_takes_80_ms_per_frame() {
    let pcm = sine(300.0, SAMPLE_RATE_HZ, 5 * FRAME_LEN_SAMPLES, 0.3);
    let mut source = FileSource::from_pcm_24k(pcm, Pace::RealTime);
    let mut frame = [0.0f32; FRAME_LEN_SAMPLES];
    let t0 = Instant::now();
    let mut n = 0;
    while source.next_frame(&mut frame).expect("next_frame") {
        n += 1;
        // Never ahead of the microphone it stands in for (a lower bound only).
        assert!(
            t0.elapsed() >= FileSource::due_after_start(n - 1) - Duration::from_millis(1),
            "frame {n} came early"
        );
    }
    assert_eq!(n, 5);
    assert!(
        t0.elapsed() >= Duration::from_millis(4 * 80),
        "{:?}",
        t0.elapsed()
    );
}

/// In real time a frame's first half comes when it has been spoken, 40 ms before the frame,
/// and the frame begins with it; unpaced there are no halves (the frame is there at once).
#[test]
fn file_source_in_real_time_hands_out_first_halves_early() {
    let pcm = sine(300.0, SAMPLE_RATE_HZ, 3 * FRAME_LEN_SAMPLES, 0.3);
    let mut source = FileSource::from_pcm_24k(pcm.clone(), Pace::RealTime);
    let (mut frame, mut half) = ([0.0f32; FRAME_LEN_SAMPLES], [0.0f32; FRAME_LEN_SAMPLES / 2]);
    let t0 = Instant::now();
    for k in 0..3u64 {
        assert!(source.next_part(&mut half).expect("next_part"));
        let at = t0.elapsed();
        let due = FileSource::due_after_start(k);
        assert!(
            at + Duration::from_millis(41) >= due,
            "frame {k}'s half came early ({at:?})"
        );
        assert!(
            at + Duration::from_millis(20) < due,
            "frame {k}'s half came late ({at:?})"
        );
        assert!(source.next_frame(&mut frame).expect("next_frame"));
        assert_eq!(&frame[..FRAME_LEN_SAMPLES / 2], &half[..]);
        let start = k as usize * FRAME_LEN_SAMPLES;
        assert_eq!(&frame[..], &pcm[start..start + FRAME_LEN_SAMPLES]);
    }
    assert!(!source.next_part(&mut half).expect("the end"));
    let mut unpaced = FileSource::from_pcm_24k(pcm, Pace::Unpaced);
    assert!(!unpaced.next_part(&mut half).expect("unpaced"));
}

#[test]
fn recording_sink_keeps_every_frame_and_its_time() {
    let dir = std::env::temp_dir().join(format!("parley-audio-devices-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let input = dir.join("input.wav");
    let pcm = sine(440.0, SAMPLE_RATE_HZ, 3 * FRAME_LEN_SAMPLES, 0.4);
    parley_engine::audio::file::write_wav_f32(&input, &pcm, SAMPLE_RATE_HZ).expect("write");

    // The virtual microphone and speaker, through the same traits as the live ones.
    let start = Instant::now();
    let mut source = FileSource::open(&input, Pace::Unpaced)
        .expect("open")
        .starting_at(start);
    let mut sink = RecordingSink::starting_at(start);
    let handle = sink.handle();
    let moved = {
        let (source, sink): (&mut dyn FrameSource, &mut dyn FrameSink) = (&mut source, &mut sink);
        pump(source, sink, usize::MAX).expect("pump")
    };
    assert_eq!(moved, 3);
    sink.finish().expect("finish");

    let rec = handle.recording();
    assert_eq!(rec.pcm_24k, pcm);
    assert_eq!(rec.frame_times.len(), 3);
    assert!(rec.frame_times.windows(2).all(|w| w[0] <= w[1]));
    let finished = rec.finished_at.expect("finish recorded");
    assert!(finished >= rec.frame_times[2]);
    assert_eq!(handle.frames_written(), 3);

    let output = dir.join("output.wav");
    handle.write_wav(&output).expect("write recording");
    assert_eq!(read_audio_24k(&output).expect("read back"), pcm);

    // Frames are whole frames.
    let err = sink.write_frame(&[0.0; 100]).expect_err("short frame");
    assert!(err.to_string().contains("1920"), "{err}");
}

// ---------------------------------------------------------------------------------------
// (d) The real default devices (ALSA; in CI, PulseAudio's null sink behind it).

fn audio_required() -> bool {
    std::env::var("PARLEY_REQUIRE_AUDIO").is_ok_and(|v| v == "1")
}

/// No usable audio: skip with the reason, or fail when `PARLEY_REQUIRE_AUDIO=1`.
fn no_audio(reason: &str) {
    assert!(
        !audio_required(),
        "PARLEY_REQUIRE_AUDIO=1, but there is no usable audio device: {reason}"
    );
    say(&format!(
        "skipping: no usable audio device: {reason} (set PARLEY_REQUIRE_AUDIO=1 to fail instead)"
    ));
}

#[test]
fn default_devices_capture_frames_and_play_audio() {
    let list = match list_devices() {
        Ok(list) => list,
        Err(e) => return no_audio(&format!("cannot list devices: {e}")),
    };
    say(&format!("audio host {}: {list:?}", list.host));
    let (events_tx, events_rx) = event_channel();
    let stats = AudioStats::new();
    let options = DeviceOptions {
        stats: stats.clone(),
        events: Some(events_tx),
        ..DeviceOptions::default()
    };
    let mut mic = match MicSource::open(None, options.clone()) {
        Ok(mic) => mic,
        Err(e) => return no_audio(&format!("cannot open the default input: {e}")),
    };
    let mut speaker = match SpeakerSink::open(None, options) {
        Ok(speaker) => speaker,
        Err(e) => return no_audio(&format!("cannot open the default output: {e}")),
    };
    say(&format!("{}\n{}", mic.info(), speaker.info()));
    let out_rate_hz = speaker.info().sample_rate_hz;

    // Play 0.64 s of a tone from its own thread (write_frame blocks on the ring as a
    // pipeline's audio-out thread would), while this thread captures about 0.5 s.
    let tone = sine(440.0, SAMPLE_RATE_HZ, 8 * FRAME_LEN_SAMPLES, 0.3);
    let player = std::thread::Builder::new()
        .name("test-player".into())
        .spawn(move || -> parley_engine::Result<SpeakerSink> {
            let mut source = FileSource::from_pcm_24k(tone, Pace::Unpaced);
            let n = pump(&mut source, &mut speaker, usize::MAX)?;
            assert_eq!(n, 8);
            speaker.finish()?;
            Ok(speaker)
        })
        .expect("spawn the player");

    let mut frame = [1e9f32; FRAME_LEN_SAMPLES];
    let mut half = [1e9f32; FRAME_LEN_SAMPLES / 2];
    let mut captured = Vec::new();
    let mut parts = 0;
    let t0 = Instant::now();
    for _ in 0..6 {
        // A frame's first half as soon as it is captured, then the frame beginning with it.
        let part = mic.next_part(&mut half).expect("a captured half");
        assert!(mic.next_frame(&mut frame).expect("a captured frame"));
        if part {
            assert_eq!(&frame[..FRAME_LEN_SAMPLES / 2], &half[..]);
            parts += 1;
        }
        assert!(frame.iter().all(|x| x.is_finite() && x.abs() <= 1.5));
        captured.extend_from_slice(&frame);
    }
    let capture_time = t0.elapsed();
    let speaker = player
        .join()
        .expect("player thread")
        .expect("playback through the default device");

    let s = stats.snapshot();
    say(&format!(
        "captured 6 frames in {capture_time:?} (rms {:.4}), {parts} begun by halves; stats {s:?}",
        rms(&captured)
    ));
    // Capture runs in real time, so frames are not all whole before they are asked for.
    assert!(parts > 0, "no frame was handed out by halves");
    assert_eq!(captured.len(), 6 * FRAME_LEN_SAMPLES);
    assert!(s.capture_callbacks > 0 && s.captured_samples > 0, "{s:?}");
    // `finish` returned, so the device took every sample the tone became at its rate.
    let tone_at_device_rate = (8 * FRAME_LEN_SAMPLES) as u64 * out_rate_hz as u64 / 24_000;
    assert!(s.played_samples >= tone_at_device_rate, "{s:?}");
    assert_eq!(speaker.queued_samples(), 0);
    let lost: Vec<AudioEvent> = events_rx
        .try_iter()
        .filter(|e| matches!(e, AudioEvent::DeviceLost { .. }))
        .collect();
    assert!(lost.is_empty(), "{lost:?}");
}

#[test]
fn an_unknown_device_name_is_an_error_listing_the_devices() {
    let list = match list_devices() {
        Ok(list) => list,
        Err(e) => return no_audio(&format!("cannot list devices: {e}")),
    };
    let name = "parley-no-such-device";
    let err = match MicSource::open(Some(name), DeviceOptions::default()) {
        Ok(_) => panic!("opened a device that does not exist"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(matches!(err, Error::AudioDevice { .. }), "{msg}");
    assert!(
        msg.contains(name) && msg.contains("no such input device"),
        "{msg}"
    );
    for device in &list.inputs {
        assert!(msg.contains(&device.name), "{msg} lacks {}", device.name);
    }
    let err = match SpeakerSink::open(Some(name), DeviceOptions::default()) {
        Ok(_) => panic!("opened a device that does not exist"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("no such output device"), "{err}");
    for device in &list.outputs {
        assert!(err.contains(&device.name), "{err} lacks {}", device.name);
    }
}

// A device that disappears mid-stream: PulseAudio killed under the default ALSA device.
// The streams run in a child process whose `XDG_RUNTIME_DIR` points at a private PulseAudio
// server, so the kill touches nothing else.

const LOST_CHILD_ENV: &str = "PARLEY_LOST_DEVICE_CHILD";

/// Kills the private PulseAudio server when the child test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A PulseAudio server of the child's own (its `XDG_RUNTIME_DIR`) with a null sink, or
/// `None` after printing why it could not start (the parent then skips).
fn private_pulse() -> Option<KillOnDrop> {
    let runtime = std::path::PathBuf::from(std::env::var_os("XDG_RUNTIME_DIR").expect("dir"));
    let pulse = Command::new("pulseaudio")
        .args([
            "--daemonize=no",
            "--exit-idle-time=-1",
            "-n",
            "--load=module-null-sink sink_name=parley_lost",
            "--load=module-native-protocol-unix",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let pulse = match pulse {
        Ok(child) => KillOnDrop(child),
        Err(e) => {
            println!("SKIP: cannot start pulseaudio: {e}");
            return None;
        }
    };
    let socket = runtime.join("pulse/native");
    let t = Instant::now();
    while !socket.exists() {
        if t.elapsed() > Duration::from_secs(10) {
            println!("SKIP: pulseaudio made no socket at {}", socket.display());
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(pulse)
}

/// Run only as a child process of `a_lost_device_is_an_error_and_an_event_not_a_hang`.
#[test]
#[ignore = "run in a child process by a_lost_device_is_an_error_and_an_event_not_a_hang"]
fn lost_device_child() {
    if std::env::var_os(LOST_CHILD_ENV).is_none() {
        return;
    }
    let Some(mut pulse) = private_pulse() else {
        return;
    };

    let (events_tx, events_rx) = event_channel();
    let options = DeviceOptions {
        events: Some(events_tx),
        ..DeviceOptions::default()
    };
    let mut mic = MicSource::open(None, options.clone()).expect("open the input");
    let mut speaker = SpeakerSink::open(None, options).expect("open the output");
    let mut frame = [0.0f32; FRAME_LEN_SAMPLES];
    for _ in 0..3 {
        assert!(mic.next_frame(&mut frame).expect("a frame before the loss"));
        speaker
            .write_frame(&frame)
            .expect("a frame before the loss");
    }

    // The sound server dies, as when a USB headset is pulled.
    let _ = pulse.0.kill();
    let _ = pulse.0.wait();
    let lost_at = Instant::now();
    let bound = Duration::from_secs(5);

    let mic_err = loop {
        match mic.next_frame(&mut frame) {
            Ok(true) => assert!(lost_at.elapsed() < bound, "the input never failed"),
            Ok(false) => panic!("a live input ended instead of failing"),
            Err(e) => break e,
        }
    };
    println!("input failed after {:?}: {mic_err}", lost_at.elapsed());
    assert!(
        matches!(mic_err, Error::AudioDeviceLost { .. }),
        "{mic_err}"
    );
    let speaker_err = loop {
        match speaker.write_frame(&frame) {
            Ok(()) => assert!(lost_at.elapsed() < bound, "the output never failed"),
            Err(e) => break e,
        }
    };
    println!("output failed after {:?}: {speaker_err}", lost_at.elapsed());
    assert!(
        matches!(speaker_err, Error::AudioDeviceLost { .. }),
        "{speaker_err}"
    );
    assert!(lost_at.elapsed() < bound, "took {:?}", lost_at.elapsed());
    // Later calls keep failing at once instead of blocking.
    assert!(mic.next_frame(&mut frame).is_err());
    assert!(speaker.finish().is_err());

    let lost: Vec<_> = events_rx
        .try_iter()
        .filter_map(|e| match e {
            AudioEvent::DeviceLost { direction, .. } => Some(direction),
            AudioEvent::StreamError { .. } | AudioEvent::Reopened { .. } => None,
        })
        .collect();
    assert_eq!(lost.len(), 2, "one DeviceLost per stream: {lost:?}");

    let t = Instant::now();
    drop(mic);
    drop(speaker);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "closing took {:?}",
        t.elapsed()
    );
}

#[cfg(target_os = "linux")]
#[test]
fn a_lost_device_is_an_error_and_an_event_not_a_hang() {
    run_child("lost_device_child", LOST_CHILD_ENV);
}

/// Runs the ignored test `name` of this binary in a child process with `env` set and a
/// private `XDG_RUNTIME_DIR`, and requires it to pass (or to say why it skipped) within a
/// minute.
#[cfg(target_os = "linux")]
fn run_child(name: &str, env: &str) {
    use std::os::unix::fs::PermissionsExt;

    let dir = std::env::temp_dir().join(format!("parley-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("runtime dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let stdout_path = dir.join("child.stdout");
    let stderr_path = dir.join("child.stderr");
    let mut child = Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(env, "1")
        .env("XDG_RUNTIME_DIR", &dir)
        .env_remove("PULSE_SERVER")
        .env_remove("PULSE_RUNTIME_PATH")
        .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("run the test binary as a child");

    // A hang is the failure this test exists to catch: give the child a deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("child status") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let Some(status) = status else {
        panic!("the child hung after its device was lost\n{stdout}\n{stderr}");
    };
    if let Some(line) = stdout.lines().find(|l| l.starts_with("SKIP: ")) {
        return no_audio(&line["SKIP: ".len()..]);
    }
    say(&stdout);
    assert!(
        status.success() && stdout.contains("1 passed"),
        "{status:?}\n{stdout}\n{stderr}"
    );
}

const BACK_CHILD_ENV: &str = "PARLEY_DEVICE_BACK_CHILD";

/// Run only as a child process of `a_device_that_comes_back_is_reopened`.
#[test]
#[ignore = "run in a child process by a_device_that_comes_back_is_reopened"]
fn device_back_child() {
    use parley_engine::audio::reopen::{ReopenOptions, ReopeningMic, ReopeningSpeaker};
    if std::env::var_os(BACK_CHILD_ENV).is_none() {
        return;
    }
    let Some(_pulse) = private_pulse() else {
        return;
    };
    let pactl = |args: &[&str]| {
        let out = Command::new("pactl").args(args).output().expect("pactl");
        assert!(
            out.status.success(),
            "pactl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (events_tx, events_rx) = event_channel();
    let options = DeviceOptions {
        events: Some(events_tx),
        ..DeviceOptions::default()
    };
    let reopen = ReopenOptions {
        retry_every: Duration::from_millis(200),
        give_up_after: Duration::from_secs(30),
    };
    let mut mic = ReopeningMic::open(None, options.clone(), reopen.clone()).expect("input");
    let mut speaker = ReopeningSpeaker::open(None, options, reopen).expect("output");
    let tone = sine(440.0, 24_000, FRAME_LEN_SAMPLES, 0.3);
    let mut frame = [0.0f32; FRAME_LEN_SAMPLES];
    for _ in 0..3 {
        assert!(mic.next_frame(&mut frame).expect("a frame before the loss"));
        speaker.write_frame(&tone).expect("a frame before the loss");
    }

    // The sink (and its monitor, the default source) goes away: every call still returns,
    // at the frame clock, and the streams are reported lost.
    pactl(&["unload-module", "module-null-sink"]);
    let gone = Instant::now();
    let mut slowest = Duration::ZERO;
    while gone.elapsed() < Duration::from_secs(4) {
        let t = Instant::now();
        assert!(mic
            .next_frame(&mut frame)
            .expect("silence while the device is away"));
        speaker
            .write_frame(&tone)
            .expect("dropped while the device is away");
        slowest = slowest.max(t.elapsed());
    }
    println!(
        "slowest frame while away: {slowest:?}; lost: in {} out {}",
        mic.is_lost(),
        speaker.is_lost()
    );
    assert!(
        mic.is_lost() && speaker.is_lost(),
        "both streams should be lost"
    );
    assert!(slowest < Duration::from_secs(3), "a call took {slowest:?}");

    // It comes back: both streams reopen within a few tries, and audio moves again.
    pactl(&["load-module", "module-null-sink", "sink_name=parley_back"]);
    let back = Instant::now();
    while (mic.is_lost() || speaker.is_lost()) && back.elapsed() < Duration::from_secs(20) {
        mic.next_frame(&mut frame).expect("a frame");
        speaker.write_frame(&tone).expect("a frame");
    }
    println!("reopened after {:?}", back.elapsed());
    assert!(!mic.is_lost() && !speaker.is_lost(), "not reopened");
    for _ in 0..10 {
        assert!(mic
            .next_frame(&mut frame)
            .expect("a frame after the return"));
        speaker
            .write_frame(&tone)
            .expect("a frame after the return");
    }
    let events: Vec<AudioEvent> = events_rx.try_iter().collect();
    let count = |f: &dyn Fn(&AudioEvent) -> bool| events.iter().filter(|e| f(e)).count();
    assert_eq!(
        count(&|e| matches!(e, AudioEvent::DeviceLost { .. })),
        2,
        "{events:?}"
    );
    assert_eq!(
        count(&|e| matches!(e, AudioEvent::Reopened { .. })),
        2,
        "{events:?}"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn a_device_that_comes_back_is_reopened() {
    run_child("device_back_child", BACK_CHILD_ENV);
}
