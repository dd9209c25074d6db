//! Time spent per named part of a computation, on the calling thread, when asked for
//! (benchmarks: `parley bench mimi --by-layer`). Off, a span costs one thread-local read.

use std::cell::RefCell;
use std::time::Instant;

thread_local! {
    /// (name, total seconds, calls), in first-seen order; None when off.
    static SPANS: RefCell<Option<Vec<(String, f64, usize)>>> = const { RefCell::new(None) };
}

/// Starts recording on this thread (clearing what was recorded).
pub fn enable() {
    SPANS.with(|s| *s.borrow_mut() = Some(vec![]));
}

/// Stops recording and returns (name, total seconds, calls) per span, in first-seen order.
pub fn take() -> Vec<(String, f64, usize)> {
    SPANS.with(|s| s.borrow_mut().take().unwrap_or_default())
}

/// Whether this thread records.
pub fn enabled() -> bool {
    SPANS.with(|s| s.borrow().is_some())
}

/// Runs `f`, adding its time to the span `name()` when recording.
pub fn span<T>(name: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    if SPANS.with(|s| s.borrow().is_none()) {
        return f();
    }
    let t0 = Instant::now();
    let out = f();
    let dt = t0.elapsed().as_secs_f64();
    let name = name();
    SPANS.with(|s| {
        if let Some(v) = s.borrow_mut().as_mut() {
            match v.iter_mut().find(|(n, _, _)| *n == name) {
                Some(e) => {
                    e.1 += dt;
                    e.2 += 1;
                }
                None => v.push((name, dt, 1)),
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_add_up_only_when_enabled() {
        span(|| "off".into(), || ());
        assert!(take().is_empty());
        enable();
        for _ in 0..3 {
            span(
                || "a".into(),
                || std::thread::sleep(std::time::Duration::from_millis(2)),
            );
        }
        span(|| "b".into(), || ());
        let got = take();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].0.as_str(), got[0].2), ("a", 3));
        assert!(got[0].1 >= 0.006, "{got:?}");
        assert_eq!((got[1].0.as_str(), got[1].2), ("b", 1));
        span(|| "after".into(), || ());
        assert!(take().is_empty());
    }
}
