#!/usr/bin/env bash
# Starts a PulseAudio server with a null sink, for machines without sound hardware (CI, VMs).
#
# The null sink is a speaker that plays into nothing; its monitor is the default source, so
# what is played can be recorded back. Debian's pulseaudio package routes ALSA's `default`
# device to PulseAudio whenever a server is running (/etc/alsa/conf.d/99-pulse.conf), which
# is what cpal opens. Clients find the server through XDG_RUNTIME_DIR, so export the same
# XDG_RUNTIME_DIR to the tests (.ci/run does).
#
# Idempotent: does nothing when a server (PulseAudio or PipeWire's pulse) already answers.
# Works as root (PulseAudio warns, and runs). Stop it with `pulseaudio --kill`.
set -euo pipefail

if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  echo "start-audio: set XDG_RUNTIME_DIR to a private directory first" >&2
  exit 1
fi
mkdir -p "$XDG_RUNTIME_DIR"
chmod 700 "$XDG_RUNTIME_DIR"

if pactl info >/dev/null 2>&1; then
  echo "start-audio: a sound server is already running ($(pactl get-default-sink 2>/dev/null || echo '?'))"
  exit 0
fi
if ! command -v pulseaudio >/dev/null 2>&1; then
  echo "start-audio: pulseaudio is not installed (scripts/setup.sh installs it)" >&2
  exit 1
fi

pulseaudio --daemonize=yes --exit-idle-time=-1 -n \
  --load="module-null-sink sink_name=parley_null" \
  --load=module-native-protocol-unix \
  --log-target="newfile:$XDG_RUNTIME_DIR/pulseaudio.log"

for _ in $(seq 50); do
  if pactl info >/dev/null 2>&1; then
    echo "start-audio: PulseAudio is up with the null sink parley_null ($XDG_RUNTIME_DIR)"
    exit 0
  fi
  sleep 0.1
done
echo "start-audio: PulseAudio did not answer within 5 s; see $XDG_RUNTIME_DIR/pulseaudio.log" >&2
exit 1
