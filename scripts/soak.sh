#!/usr/bin/env bash
# Long use: a live duplex session through the real ALSA path (PulseAudio's null sink) at
# real-time pace, with the fixture Moshi, for MINUTES minutes (default 60). The recording
# assets/speech/dialogue.wav plays into the sink in a loop, so the microphone (the sink's
# monitor) hears speech. Halfway through, the sink is unloaded for 3 s and loaded again:
# the session must reopen both devices and go on. Resident memory is sampled every minute.
#
#   scripts/soak.sh [MINUTES] [OUT_DIR]      (PARLEY=path/to/parley, default target/release)
#
# Writes OUT_DIR/events.jsonl (the session's events), OUT_DIR/rss.csv (minute, kB) and
# OUT_DIR/summary.json: frames, deadline misses, input overruns and output underruns (the
# xruns), warnings, errors, RSS at start and end. Exits non-zero unless the session closed
# cleanly with zero deadline misses and zero xruns outside the device's absence, and came
# back after the sink's return.
set -euo pipefail

MINUTES="${1:-60}"
OUT="${2:-soak-out}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PARLEY="${PARLEY:-$ROOT/target/release/parley}"
[ -x "$PARLEY" ] || { echo "soak: no parley binary at $PARLEY (cargo build --release, or set PARLEY)" >&2; exit 1; }
mkdir -p "$OUT"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/parley-runtime-$(id -u)}"
bash "$ROOT/scripts/start-audio.sh" >/dev/null

# Speech into the sink, forever (until this script ends).
( while true; do paplay "$ROOT/assets/speech/dialogue.wav" || sleep 1; done ) &
PLAYER=$!
# stdin stays open and silent: the microphone is the input.
mkfifo "$OUT/stdin.fifo" 2>/dev/null || true
sleep infinity > "$OUT/stdin.fifo" &
HOLDER=$!
cleanup() { kill "$PLAYER" "$HOLDER" 2>/dev/null || true; pkill -P "$PLAYER" paplay 2>/dev/null || true; }
trap cleanup EXIT

"$PARLEY" headless --audio mic --mode duplex --model-dir "$ROOT/tests/fixtures/moshi-tiny" \
  --device cpu < "$OUT/stdin.fifo" > "$OUT/events.jsonl" 2> "$OUT/stderr.log" &
PID=$!
# The metrics' times count from the session's start, after the model has loaded: the
# moment `session.created` appears (to the loop's second) is that clock's zero here.
STARTED=""
echo "minute,rss_kb" > "$OUT/rss.csv"
START=$(date +%s)
FLAP_AT=$(( MINUTES * 60 / 2 ))
FLAPPED=0
MINUTE=0
while [ $(( $(date +%s) - START )) -lt $(( MINUTES * 60 )) ]; do
  kill -0 "$PID" 2>/dev/null || { echo "soak: parley ended early" >&2; break; }
  if [ -z "$STARTED" ] && [ -s "$OUT/events.jsonl" ]; then STARTED=$(date +%s.%N); fi
  NOW=$(( $(date +%s) - START ))
  if [ $(( NOW / 60 )) -ge "$MINUTE" ]; then
    echo "$MINUTE,$(ps -o rss= -p "$PID" | tr -d ' ')" >> "$OUT/rss.csv"
    MINUTE=$(( MINUTE + 1 ))
  fi
  if [ "$FLAPPED" = 0 ] && [ "$NOW" -ge "$FLAP_AT" ]; then
    date +%s.%N > "$OUT/flap_start"
    pactl unload-module module-null-sink
    sleep 3
    pactl load-module module-null-sink sink_name=parley_null >/dev/null
    pactl set-default-sink parley_null
    pactl set-default-source parley_null.monitor
    date +%s.%N > "$OUT/flap_end"
    FLAPPED=1
  fi
  sleep 1
done
echo "$MINUTE,$(ps -o rss= -p "$PID" | tr -d ' ')" >> "$OUT/rss.csv"
kill -TERM "$PID" 2>/dev/null || true
wait "$PID" || true

python3 - "$OUT" "${STARTED:-0}" "$MINUTES" <<'EOF'
import json, sys, pathlib
out, started = pathlib.Path(sys.argv[1]), float(sys.argv[2])
events = [json.loads(l) for l in (out / "events.jsonl").read_text().splitlines() if l.strip()]
metrics = [e for e in events if e.get("type") == "parley.metrics"]
warnings = [e["message"] for e in events if e.get("type") == "parley.warning"]
errors = [e["error"]["message"] for e in events if e.get("type") == "error"]
rss = [l.split(",") for l in (out / "rss.csv").read_text().splitlines()[1:] if l.split(",")[1]]
# The counters run from the session's start; xruns while the sink was away (its streams
# were gone) and in the seconds of reopening are expected, and counted apart.
flap = None
if (out / "flap_start").exists():
    flap = (float((out / "flap_start").read_text()) - started - 2,
            float((out / "flap_end").read_text()) - started + 10)
def delta(key, inside):
    d, prev = 0, 0
    for m in metrics:
        near = flap is not None and flap[0] <= m["done_at_s"] <= flap[1]
        if near == inside:
            d += m[key] - prev
        prev = m[key]
    return d
summary = {
    "minutes": float(sys.argv[3]) if len(sys.argv) > 3 else None,
    "frames": len(metrics),
    "deadline_misses": sum(1 for m in metrics if m["deadline_missed"]),
    "input_overruns": delta("input_overruns", False),
    "output_underruns": delta("output_underruns", False),
    "xruns_around_the_device_loss": delta("input_overruns", True) + delta("output_underruns", True),
    "latency_ms_max": max((m["latency_ms"] for m in metrics), default=0),
    # The least audio the speaker's ring held beyond a callback's needs (a running minimum
    # since the start): before the sink went away, and at the end (the loss drains it).
    "output_low_water_ms_before_device_loss": next(
        (m.get("output_low_water_ms") for m in reversed(metrics)
         if flap is None or m["done_at_s"] < flap[0]), None),
    "output_low_water_ms_end": metrics[-1].get("output_low_water_ms") if metrics else None,
    "warnings": warnings,
    "errors": errors,
    "closed": bool(events) and events[-1].get("type") == "session.closed",
    "rss_kb_start": int(rss[0][1]) if rss else None,
    "rss_kb_end": int(rss[-1][1]) if rss else None,
    "rss_kb_max": max(int(r[1]) for r in rss) if rss else None,
    "reopened": sum(w.endswith("` is back") for w in warnings),
}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
ok = (summary["closed"] and not errors and summary["deadline_misses"] == 0
      and summary["input_overruns"] == 0 and summary["output_underruns"] == 0
      and (flap is None or summary["reopened"] >= 2))
sys.exit(0 if ok else 1)
EOF
