#!/usr/bin/env bash
# The GPU check for a machine with a real GPU, in a few minutes: parity of the kernels, of
# whole LM steps and of Mimi against their definitions and the CPU path, then the
# benchmarks, each writing JSON into the folder given.
#
#   scripts/gpu-check.sh OUT_DIR
#
# With cargo, it builds the release binary and also runs the GPU test files. Without cargo
# (a GPU machine that only receives a binary), set PARLEY to a release build of `parley`
# made elsewhere (no debug info: `CARGO_PROFILE_RELEASE_DEBUG=0 cargo build --release -p
# parley`, then `strip`: about 46 MB, glibc 2.35 or newer). Vulkan's loader must be
# installed (libvulkan1); the binary also links libasound2 (cpal) and libgomp1: carry their
# .deb files beside the loader's where the machine lacks them (`ldd "$PARLEY"` says).
# WGPU_BACKEND picks another backend.
#
# Files: devices.txt (the adapters), check.json (`bench gpu --check-only`: every
# matrix-vector shape and format against an f64 definition, the tiled kernel too; random
# scaled-down STT and Moshi LMs over 100 greedy steps against the CPU; Mimi's GPU codec
# against the CPU's), stt.json (stt-1b-en_fr in f16, q8_0 and q4 with every kernel shape
# timed, and the listen frame with Mimi's encoder on the GPU), moshi.json (moshi-7b in q4:
# the LM step and the whole duplex frame, Mimi on the GPU), tests.log (with
# cargo), summary.txt. Exits non-zero if any part failed; the parts after a failure still
# run.
set -uo pipefail
out=${1:?usage: scripts/gpu-check.sh OUT_DIR}
mkdir -p "$out" || exit 2
# Absolute paths: the script runs from the repository's root.
out=$(cd "$out" && pwd)
if [ -n "${PARLEY:-}" ]; then
    PARLEY=$(cd "$(dirname "$PARLEY")" && pwd)/$(basename "$PARLEY")
fi
cd "$(dirname "$0")/.."
status=0
: > "$out/summary.txt"
log() { echo "$*" | tee -a "$out/summary.txt"; }

if [ -z "${PARLEY:-}" ]; then
    command -v cargo >/dev/null || { log "no cargo here: set PARLEY to a release build of parley"; exit 2; }
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/parley-target}"
    cargo build --release -p parley || { log "build: FAILED"; exit 2; }
    PARLEY="$CARGO_TARGET_DIR/release/parley"
    if timeout 600 cargo test --release -p parley-engine --test gpu_kernels --test gpu_lm \
        --test gpu_mimi >"$out/tests.log" 2>&1; then
        log "tests: passed ($(grep -c '^test .* ok$' "$out/tests.log") tests)"
    else
        log "tests: FAILED (tests.log)"
        status=1
    fi
fi
[ -x "$PARLEY" ] || { log "PARLEY=$PARLEY is not an executable"; exit 2; }

step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    if timeout "$limit" "$PARLEY" "$@" >"$out/$name.json" 2>"$out/$name.err"; then
        log "$name: ok in $((SECONDS - t0)) s"
    else
        log "$name: FAILED (exit $?) after $((SECONDS - t0)) s: $(tail -n 3 "$out/$name.err" | tr '\n' ' ')"
        status=1
    fi
}

"$PARLEY" devices >"$out/devices.txt" 2>&1 || true
step check 240 bench gpu --check-only --device gpu
step stt 240 bench gpu --preset stt-1b-en_fr --dtype f16,q8_0,q4 --tune --steps 50 --json --device gpu
# One format: the 7B's random weights take most of this step to make on the host.
step moshi 360 bench gpu --preset moshi-7b --dtype q4 --steps 50 --json --device gpu
exit $status
