//! Time spent per named part of a computation, when asked for (benchmarks: `parley bench
//! mimi --by-layer`). Process-wide, because a model step runs on whichever rayon worker
//! takes it (`compute::cpu::on_pool`); meant for one computation at a time. Off, a span
//! costs one atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
/// (name, total seconds, calls), in first-seen order.
static SPANS: Mutex<Vec<(String, f64, usize)>> = Mutex::new(Vec::new());

fn spans() -> std::sync::MutexGuard<'static, Vec<(String, f64, usize)>> {
    SPANS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts recording (clearing what was recorded).
pub fn enable() {
    spans().clear();
    ON.store(true, Ordering::SeqCst);
}

/// Stops recording and returns (name, total seconds, calls) per span, in first-seen order.
pub fn take() -> Vec<(String, f64, usize)> {
    ON.store(false, Ordering::SeqCst);
    std::mem::take(&mut *spans())
}

/// Whether spans are being recorded.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Runs `f`, adding its time to the span `name()` when recording.
pub fn span<T>(name: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let t0 = Instant::now();
    let out = f();
    add(name(), t0);
    out
}

/// The start of a span that is not one closure (`None` when not recording).
pub fn start() -> Option<Instant> {
    enabled().then(Instant::now)
}

/// Adds the time since `start` to the span `name`.
pub fn stop(start: Option<Instant>, name: &str) {
    if let Some(t0) = start {
        add(name.to_string(), t0);
    }
}

fn add(name: String, t0: Instant) {
    let dt = t0.elapsed().as_secs_f64();
    let mut v = spans();
    match v.iter_mut().find(|(n, _, _)| *n == name) {
        Some(e) => {
            e.1 += dt;
            e.2 += 1;
        }
        None => v.push((name, dt, 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_add_up_only_when_enabled() {
        span(|| "off".into(), || ());
        assert!(take().is_empty());
        enable();
        // Recorded from any thread (a model step runs on a rayon worker).
        std::thread::spawn(|| span(|| "b".into(), || ()))
            .join()
            .expect("thread");
        for _ in 0..3 {
            span(
                || "a".into(),
                || std::thread::sleep(std::time::Duration::from_millis(2)),
            );
        }
        span(|| "b".into(), || ());
        let got = take();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].0.as_str(), got[0].2), ("b", 2));
        assert_eq!((got[1].0.as_str(), got[1].2), ("a", 3));
        assert!(got[1].1 >= 0.006, "{got:?}");
        span(|| "after".into(), || ());
        assert!(take().is_empty());
    }
}
