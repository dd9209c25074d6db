#!/usr/bin/env bash
# Runs the quantized kernels' tests for aarch64 under qemu, twice: on a CPU with the
# dot-product extension (NEON `sdot` and portable paths) and on an ARMv8.0 one (portable
# only). Needs apt (Debian/Ubuntu) and rustup; not part of CI.
set -euo pipefail
cd "$(dirname "$0")/../tools/arm-check"
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get install -y -q qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross
fi
rustup target add aarch64-unknown-linux-gnu
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/parley-arm-target}"
for cpu in max cortex-a53; do
    echo "== qemu-aarch64 -cpu $cpu"
    QEMU_CPU=$cpu cargo test --release --target aarch64-unknown-linux-gnu -- --nocapture
done
