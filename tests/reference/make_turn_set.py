#!/usr/bin/env python3
"""Makes a labelled turn-taking set: user turns spoken by espeak-ng in several voices and
rates, with the ends of turns and the pauses inside sentences labelled, for
`parley bench latency --alignment` (its turn-taking table).

Turns of three kinds:
  * completed turns (one or two full sentences);
  * turns with pauses in the middle of a sentence ("I would like to book a table for ...
    four people"), where an end-of-turn detector must not fire;
  * short answers ("Yes.", "No thanks.").

Each piece of text between pauses is synthesised on its own (`espeak-ng -w`), trimmed to
its speech (first and last sample above THRESHOLD), and the set is assembled at 22050 Hz
with exact-zero silences: LEAD_S before the first turn, TURN_GAP_S between turns (long
enough for every detector to decide), the labelled pause inside a sentence. Then
`sox -R -D` converts it to 24 kHz mono 16-bit. Times are seconds from the file's start.

Writes OUT_DIR/turns.wav and OUT_DIR/turns.json:
  {"turns": [{"start_s", "end_s", "kind", "voice", "rate", "text"}],
   "pauses": [{"start_s", "end_s"}],   # silences inside a sentence
   "words": []}

Deterministic for one espeak-ng version (recorded in the JSON) and sox.

    python3 tests/reference/make_turn_set.py                 # assets/speech/turns.{wav,json}
    python3 tests/reference/make_turn_set.py --out-dir /tmp/t
"""

import argparse
import json
import subprocess
import sys
import tempfile
import wave
from array import array
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SR = 22050
OUT_SR = 24000
THRESHOLD = 256  # |sample| above this (of 32767, about -42 dBFS) is speech
LEAD_S = 0.5
TURN_GAP_S = 3.0

# (voice, words per minute)
VOICES = [
    ("en-us", 175),
    ("en-gb", 150),
    ("en-us+f3", 200),
    ("en-gb-scotland", 165),
    ("en-029", 185),
    ("en-us+m4", 140),
]

# Each turn: its kind and its pieces; a number between pieces is a pause inside the
# sentence, in seconds.
TURNS = [
    ("complete", ["Could you tell me what the weather is like today?"]),
    ("mid_pause", ["I would like to book a table for", 0.8, "four people tonight."]),
    ("short", ["Yes."]),
    ("complete", ["Please remind me to call my sister tomorrow morning."]),
    ("mid_pause", ["The thing I really wanted to ask about is", 1.0, "the train schedule."]),
    ("short", ["No thanks."]),
    ("mid_pause", ["Can you play some music by", 0.7, "the Beatles?"]),
    ("complete", ["Thanks. That is all I needed."]),
    ("mid_pause", ["So if I leave at", 0.9, "seven, will I make it in time?"]),
    ("short", ["Sure."]),
    ("mid_pause", ["I think that", 0.6, "we should", 0.8, "probably wait until Friday."]),
    ("complete", ["What time does the pharmacy close on Sundays?"]),
    ("short", ["Okay."]),
    ("mid_pause", ["My favourite colour is", 1.2, "green."]),
    ("complete", ["Set a timer for ten minutes, please."]),
    ("short", ["Yes, please."]),
]


def fail(msg):
    sys.exit(f"make_turn_set: {msg}")


def synth(text, voice, rate, tmp):
    """espeak-ng's audio of `text`, trimmed to its speech, as 16-bit samples at 22050 Hz."""
    path = Path(tmp) / "piece.wav"
    try:
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(path), text],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        fail(f"espeak-ng failed on {text!r} with voice {voice}: {e}")
    with wave.open(str(path)) as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (SR, 1, 2):
            fail(f"espeak-ng wrote {w.getframerate()} Hz, {w.getnchannels()} ch")
        pcm = array("h", w.readframes(w.getnframes()))
    loud = [i for i, v in enumerate(pcm) if abs(v) > THRESHOLD]
    if not loud:
        fail(f"no speech in espeak-ng's audio of {text!r}")
    return pcm[loud[0] : loud[-1] + 1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=REPO / "assets" / "speech")
    args = ap.parse_args()
    version = subprocess.run(
        ["espeak-ng", "--version"], capture_output=True, text=True
    ).stdout.strip()
    out = array("h", [0] * int(LEAD_S * SR))
    turns, pauses = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (kind, pieces) in enumerate(TURNS):
            voice, rate = VOICES[i % len(VOICES)]
            start = len(out)
            for p in pieces:
                if isinstance(p, float):
                    pauses.append({"start_s": len(out) / SR, "end_s": (len(out) + int(p * SR)) / SR})
                    out.extend([0] * int(p * SR))
                else:
                    out.extend(synth(p, voice, rate, tmp))
            turns.append(
                {
                    "start_s": start / SR,
                    "end_s": len(out) / SR,
                    "kind": kind,
                    "voice": voice,
                    "rate": rate,
                    "text": " ".join(p for p in pieces if isinstance(p, str)),
                }
            )
            out.extend([0] * int(TURN_GAP_S * SR))
        raw = Path(tmp) / "set22k.wav"
        with wave.open(str(raw), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SR)
            w.writeframes(out.tobytes())
        args.out_dir.mkdir(parents=True, exist_ok=True)
        wav = args.out_dir / "turns.wav"
        tmp_wav = args.out_dir / ".turns.wav.tmp"
        subprocess.run(
            ["sox", "-R", "-D", str(raw), "-r", str(OUT_SR), "-b", "16", "-t", "wav", str(tmp_wav)],
            check=True,
        )
        tmp_wav.replace(wav)
    with wave.open(str(wav)) as w:
        n = w.getnframes()
        if (w.getframerate(), w.getnchannels()) != (OUT_SR, 1):
            fail("sox wrote the wrong format")
    doc = {
        "generator": "tests/reference/make_turn_set.py",
        "espeak_ng": version,
        "duration_s": n / OUT_SR,
        "turns": turns,
        "pauses": pauses,
        "words": [],
    }
    js = args.out_dir / "turns.json"
    tmp_js = args.out_dir / ".turns.json.tmp"
    tmp_js.write_text(json.dumps(doc, indent=1) + "\n")
    tmp_js.replace(js)
    kinds = {k: sum(t["kind"] == k for t in turns) for k in ("complete", "mid_pause", "short")}
    print(f"{wav}: {n / OUT_SR:.1f} s, {len(turns)} turns {kinds}, {len(pauses)} pauses inside sentences")


if __name__ == "__main__":
    main()
