//! A one-hour session (45,000 steps of 80 ms) of the tiny Moshi-style model on random input
//! codes: the streaming state and the process's memory stay flat (the attention rings
//! wrap; nothing grows with the session).

use std::path::Path;

use parley_engine::models::lm::generator::{GenConfig, LmGen, Sampling};
use parley_engine::models::lm::{LmConfig, LmModel};

/// Resident memory of this process in bytes (Linux), None elsewhere.
fn rss_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[test]
fn one_hour_session_runs_in_constant_memory() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/moshi-tiny");
    let cfg = LmConfig::from_json_file(&dir.join("config.json")).expect("config");
    let context = cfg.context.expect("context");
    let model = LmModel::load(&dir.join("model.safetensors"), cfg).expect("model");
    let sampling = Sampling {
        temp: 0.8,
        top_k: 25,
    };
    let mut gen = LmGen::new(
        model,
        GenConfig {
            text: sampling,
            audio: sampling,
            seed: 1,
        },
    );
    let steps = 45_000; // one hour at 12.5 Hz
    let mut seed = 99u32;
    let mut state = vec![];
    let mut rss = vec![];
    let mut distinct = std::collections::HashSet::new();
    for i in 0..steps {
        let codes: Vec<u32> = (0..8)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) % 32
            })
            .collect();
        let out = gen.step(&codes).expect("step");
        if let Some(t) = out.tokens {
            distinct.insert(t[0]);
        }
        if i == 2 * context || i == steps - 1 {
            state.push(gen.backend().state_bytes());
            rss.push(rss_bytes());
        }
    }
    assert!(distinct.len() > 10, "the model's output should vary");
    assert_eq!(state[0], state[1], "streaming state grew over the session");
    if let (Some(a), Some(b)) = (rss[0], rss[1]) {
        // Allocator noise only: far less than the ~45,000 steps of state a leak would add.
        assert!(
            b < a + (4 << 20),
            "resident memory grew from {a} to {b} bytes"
        );
    }
}
