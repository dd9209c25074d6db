#!/usr/bin/env python3
"""Makes the test dialogue for the latency harness: speech with word alignments.

Plain Python 3 (standard library only), espeak-ng through ctypes (libespeak-ng.so.1), and
the `sox` command for the sample-rate conversion.

Timeline (each silence is measured from the end of one turn's speech to the start of the
next turn's first word, or to the end of the file, so it is exact whatever espeak-ng's own
lead-in and tail are):

    lead-in silence (--lead-in, 0.5 s)
    turn 0: "Hello there. Could you tell me what the weather is like today?"   (3.26 s)
    pause   (--pause, 2.0 s: turns[1].start_s - turns[0].end_s)
    turn 1: "Thanks. Please remind me to bring an umbrella tomorrow morning."  (3.41 s)
    trailing silence (--trail, 2.0 s: duration_s - turns[1].end_s)

How the timing is obtained:
  * espeak-ng runs in AUDIO_OUTPUT_SYNCHRONOUS mode with a synth callback; each turn is one
    espeak_Synth call, in a fresh child process (espeak-ng carries synthesis state from one
    message to the next, so this keeps every turn identical to `espeak-ng -w` of its text).
    The callback collects the 22050 Hz samples and the event list.
  * A word's start is its espeakEVENT_WORD event's `sample` field: the exact sample index,
    counted from the start of that espeak_Synth message, at which the word's audio begins
    (`audio_position` is the same point truncated to ms; the script checks that the two
    agree and that the sample lies inside the callback block that delivered the event).
  * The word's text is input[text_position - 1 : text_position - 1 + length]
    (text_position counts characters from 1).
  * A word ends where the next word starts, except at the end of a clause or sentence
    (an espeakEVENT_END comes before the next word) or of the turn: there it ends one
    sample after the last sample whose magnitude exceeds THRESHOLD, so the pause that
    follows is not counted as part of the word. A turn ends where its last word ends and
    starts where its first word starts.
  * The dialogue is assembled at 22050 Hz with integer-sample silences of exact zeros,
    written to a temporary WAV, and converted to 24 kHz mono 16-bit by
    `sox -R -D in.wav -r 24000 out.wav` (SoX's default high-quality, linear-phase `rate`,
    which keeps time aligned; no dither, so silences stay exact zeros and the output is
    repeatable). Times are seconds, index / 22050, which is the same instant in the
    24 kHz file.

After writing, the script reads the 24 kHz WAV back and checks its format, its length and
that each turn's speech onset and offset in it lie within a few ms of the alignment.

Deterministic: same espeak-ng version (recorded in the JSON), same voice, same sox ->
byte-identical output.

Run from anywhere:
    python3 assets/make_speech.py                      # writes assets/speech/dialogue.{wav,json}
    python3 assets/make_speech.py --out-dir /tmp/sp --voice en-gb
"""

import argparse
import ctypes
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
import wave
from array import array
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
OUT_SR = 24000
RATE_WPM = 175  # espeak-ng's default speed, set explicitly
THRESHOLD = 256  # |sample| above this (of 32767, about -42 dBFS) counts as speech
NAME = "dialogue"

TURNS = [
    "Hello there. Could you tell me what the weather is like today?",
    "Thanks. Please remind me to bring an umbrella tomorrow morning.",
]

# speak_lib.h (espeak-ng 1.51)
AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
espeakCHARS_UTF8 = 1
espeakRATE = 1
EV_LIST_TERMINATED = 0
EV_WORD = 1
EV_SENTENCE = 2
EV_END = 5
EV_MSG_TERMINATED = 6


class _EventId(ctypes.Union):
    _fields_ = [
        ("number", ctypes.c_int),
        ("name", ctypes.c_char_p),
        ("string", ctypes.c_char * 8),
    ]


class EspeakEvent(ctypes.Structure):
    """espeak_EVENT from speak_lib.h."""

    _fields_ = [
        ("type", ctypes.c_int),  # espeak_EVENT_TYPE
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # characters from the start of the text, from 1
        ("length", ctypes.c_int),  # word length in characters (WORD events)
        ("audio_position", ctypes.c_int),  # ms within the message's audio
        ("sample", ctypes.c_int),  # sample index within the message's audio
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


class EspeakVoice(ctypes.Structure):
    """espeak_VOICE from speak_lib.h (used only as selection criteria)."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(EspeakEvent)
)


def fail(msg):
    sys.exit(f"make_speech: {msg}")


class Espeak:
    def __init__(self, voice):
        try:
            self.lib = ctypes.CDLL("libespeak-ng.so.1")
        except OSError as e:
            fail(f"cannot load libespeak-ng.so.1 ({e}); install espeak-ng")
        lib = self.lib
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [SYNTH_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
        ]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_Info.argtypes = [ctypes.c_void_p]

        self.sample_rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, None, 0)
        if self.sample_rate <= 0:
            fail("espeak_Initialize failed")
        self.version = lib.espeak_Info(None).decode()
        lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(EspeakVoice)]
        # as the espeak-ng command does: a voice name (file name), else a language
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            spec = EspeakVoice(languages=voice.encode())
            if lib.espeak_SetVoiceByProperties(ctypes.byref(spec)) != 0:
                fail(f"espeak-ng has no voice {voice!r} (see espeak-ng --voices)")
        if lib.espeak_SetParameter(espeakRATE, RATE_WPM, 0) != 0:
            fail("espeak_SetParameter(espeakRATE) failed")
        self._pcm = None
        self._events = None
        self._cb = SYNTH_CALLBACK(self._callback)  # keep a reference while espeak may call it
        lib.espeak_SetSynthCallback(self._cb)

    def _callback(self, wav, n, events):
        block_start = len(self._pcm)
        i = 0
        while events[i].type != EV_LIST_TERMINATED:
            e = events[i]
            self._events.append(
                dict(type=e.type, text_position=e.text_position, length=e.length,
                     audio_position=e.audio_position, sample=e.sample,
                     block_start=block_start, block_len=max(n, 0))
            )
            i += 1
        if wav and n > 0:
            self._pcm.extend(wav[:n])
        return 0

    def synth(self, text):
        """Returns (samples, events) for one message; event samples count from its start."""
        self._pcm = array("h")
        self._events = []
        data = text.encode("utf-8") + b"\0"
        buf = ctypes.create_string_buffer(data, len(data))
        if self.lib.espeak_Synth(buf, len(data), 0, POS_CHARACTER, 0, espeakCHARS_UTF8, None, None) != 0:
            fail("espeak_Synth failed")
        self.lib.espeak_Synchronize()
        return self._pcm, self._events

    def close(self):
        self.lib.espeak_Terminate()


def last_loud(pcm, lo, hi):
    """One past the last index in [lo, hi) with |sample| > THRESHOLD, or None."""
    for i in range(hi - 1, lo - 1, -1):
        if abs(pcm[i]) > THRESHOLD:
            return i + 1
    return None


def align_turn(text, pcm, events, sr):
    """Words of one turn as (word, start, end) in samples of this turn's audio."""
    words = []  # [word, start, clause_final]
    for e in events:
        if e["type"] == EV_WORD:
            s = e["sample"]
            # consistency of the two timing fields and the delivering block
            if abs(s * 1000 // sr - e["audio_position"]) > 1:
                fail(f"event sample {s} disagrees with audio_position {e['audio_position']} ms")
            if e["block_len"] and not (e["block_start"] <= s <= e["block_start"] + e["block_len"]):
                fail(f"event sample {s} outside its block at {e['block_start']}+{e['block_len']}")
            w = text[e["text_position"] - 1 : e["text_position"] - 1 + e["length"]]
            w = w.strip(" .,;:!?\"'")
            if not w:
                fail(f"empty word at text position {e['text_position']} in {text!r}")
            words.append([w, s, False])
        elif e["type"] in (EV_END, EV_MSG_TERMINATED) and words:
            words[-1][2] = True
    if not words:
        fail(f"no word events for {text!r}")
    expected = [t.strip(".,;:!?\"'") for t in text.split()]
    if [w[0] for w in words] != expected:
        fail(f"word events {[w[0] for w in words]} do not match the text {expected}")
    out = []
    for k, (w, s, clause_final) in enumerate(words):
        nxt = words[k + 1][1] if k + 1 < len(words) else len(pcm)
        if nxt <= s:
            fail(f"word {w!r} does not advance ({s} -> {nxt})")
        end = nxt
        if clause_final or k + 1 == len(words):
            end = last_loud(pcm, s, nxt)
            if end is None:
                fail(f"word {w!r} is silent")
        out.append((w, s, end))
    return out


def onset_offset(pcm, lo, hi, thr):
    on = next((i for i in range(lo, hi) if abs(pcm[i]) > thr), None)
    off = next((i + 1 for i in range(hi - 1, lo - 1, -1) if abs(pcm[i]) > thr), None)
    return on, off


def write_wav(path, pcm, sr):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        data = array("h", pcm)
        if sys.byteorder != "little":
            data.byteswap()
        w.writeframes(data.tobytes())


def read_wav(path):
    with wave.open(str(path), "rb") as w:
        fmt = (w.getnchannels(), w.getsampwidth(), w.getframerate())
        data = array("h", w.readframes(w.getnframes()))
    if sys.byteorder != "little":
        data.byteswap()
    return fmt, data


def synth_worker(voice):
    """Child process: synthesises the text on stdin, pickles the result to stdout."""
    text = sys.stdin.buffer.read().decode("utf-8")
    es = Espeak(voice)
    pcm, events = es.synth(text)
    es.close()
    pickle.dump(dict(sample_rate=es.sample_rate, version=es.version, pcm=pcm, events=events),
                sys.stdout.buffer)


def synth_isolated(voice, text):
    """Synthesises one turn in a fresh process.

    espeak-ng keeps synthesis state between messages in one process (the same text spoken
    twice in a row gives different samples), and espeak_Terminate + espeak_Initialize does
    not reset it cleanly (it can hang), so each turn gets its own process. A turn is then
    independent of the others and sample-identical to `espeak-ng -v VOICE -s 175 -w` of
    the same text (which only adds a trailing pause).
    """
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--synth-worker",
                        "--voice", voice], input=text.encode("utf-8"), capture_output=True)
    if r.returncode != 0:
        fail(f"synthesis of {text!r} failed: {r.stderr.decode(errors='replace').strip()}")
    return pickle.loads(r.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=str(ASSETS / "speech"),
                    help="where dialogue.wav and dialogue.json go (default: assets/speech)")
    ap.add_argument("--voice", default="en-us", help="espeak-ng voice (default: en-us)")
    ap.add_argument("--lead-in", type=float, default=0.5, help="silence before turn 0, s")
    ap.add_argument("--pause", type=float, default=2.0, help="turn 0 end -> turn 1 start, s")
    ap.add_argument("--trail", type=float, default=2.0, help="turn 1 end -> end of file, s")
    ap.add_argument("--synth-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.synth_worker:
        return synth_worker(args.voice)

    sox = shutil.which("sox")
    if sox is None:
        fail("needs the `sox` command for the 22050 -> 24000 Hz conversion (apt install sox)")

    synths = [synth_isolated(args.voice, text) for text in TURNS]
    sr = synths[0]["sample_rate"]
    version = synths[0]["version"]
    timeline = array("h")
    turns, words = [], []
    gaps = [args.lead_in] + [args.pause] * (len(TURNS) - 1)
    prev_end = 0  # where the previous turn's speech ended, in the timeline
    for t, text in enumerate(TURNS):
        pcm, events = synths[t]["pcm"], synths[t]["events"]
        aligned = align_turn(text, pcm, events, sr)
        # place this segment so that its first word starts gaps[t] after the previous end
        first_start = aligned[0][1]
        at = prev_end + round(gaps[t] * sr) - first_start
        if at < len(timeline):
            fail(f"gap {gaps[t]} s too short for espeak-ng's tail before turn {t}")
        timeline.extend(array("h", bytes(2 * (at - len(timeline)))))
        timeline.extend(pcm)
        for w, s, e in aligned:
            words.append(dict(word=w, start=at + s, end=at + e, turn=t))
        turns.append(dict(start=at + first_start, end=at + aligned[-1][2], text=text))
        prev_end = at + aligned[-1][2]
    total = prev_end + round(args.trail * sr)
    if total < len(timeline):
        fail("trailing silence too short for espeak-ng's tail")
    timeline.extend(array("h", bytes(2 * (total - len(timeline)))))

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wav_path = out_dir / f"{NAME}.wav"
    json_path = out_dir / f"{NAME}.json"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src.wav"
        write_wav(src, timeline, sr)
        r = subprocess.run([sox, "-R", "-D", str(src), "-r", str(OUT_SR), "-c", "1", "-b", "16",
                            "-e", "signed-integer", str(wav_path)],
                           capture_output=True, text=True)
        if r.returncode != 0 or "clip" in r.stderr.lower():
            fail(f"sox failed: {r.stderr.strip()}")

    sec = lambda i: round(i / sr, 6)
    doc = {
        "sample_rate_hz": OUT_SR,
        "duration_s": sec(total),
        "turns": [dict(start_s=sec(x["start"]), end_s=sec(x["end"]), text=x["text"]) for x in turns],
        "words": [dict(word=x["word"], start_s=sec(x["start"]), end_s=sec(x["end"]), turn=x["turn"])
                  for x in words],
        "source": {
            "generator": "assets/make_speech.py",
            "espeak_ng_version": version,
            "voice": args.voice,
            "rate_wpm": RATE_WPM,
            "synth_sample_rate_hz": sr,
            "resampler": "sox -R -D (rate, default high quality)",
            "silence_threshold": THRESHOLD,
        },
    }
    json_path.write_text(json.dumps(doc, indent=2) + "\n")

    # read the 24 kHz file back and check it against the alignment
    fmt, out = read_wav(wav_path)
    if fmt != (1, 2, OUT_SR):
        fail(f"{wav_path} is channels/bytes/rate {fmt}, expected (1, 2, {OUT_SR})")
    if abs(len(out) - total * OUT_SR / sr) > 2:
        fail(f"{wav_path} has {len(out)} samples, expected about {total * OUT_SR / sr:.0f}")
    worst = 0.0
    for t, x in enumerate(doc["turns"]):
        lo = int((x["start_s"] - 0.05) * OUT_SR)
        hi = int((x["end_s"] + 0.05) * OUT_SR)
        on, off = onset_offset(out, max(lo, 0), min(hi, len(out)), THRESHOLD)
        # the word start is espeak's segment start, a little before audible onset
        d_on = on / OUT_SR - x["start_s"]
        d_off = off / OUT_SR - x["end_s"]
        if not (-0.002 <= d_on <= 0.05) or abs(d_off) > 0.003:
            fail(f"turn {t}: 24 kHz onset/offset {on / OUT_SR:.4f}/{off / OUT_SR:.4f} s "
                 f"vs alignment {x['start_s']}/{x['end_s']} s")
        worst = max(worst, abs(d_off))
        print(f"turn {t}: {x['start_s']:.3f}-{x['end_s']:.3f} s, {sum(w['turn'] == t for w in doc['words'])} words, "
              f"24 kHz onset +{d_on * 1000:.1f} ms, offset {d_off * 1000:+.2f} ms vs alignment")
    for a, b in zip(doc["turns"], doc["turns"][1:]):
        loud = onset_offset(out, int(a["end_s"] * OUT_SR) + 24, int(b["start_s"] * OUT_SR), THRESHOLD)[0]
        if loud is not None:
            fail(f"pause {a['end_s']}-{b['start_s']} s is not silent at {loud / OUT_SR:.4f} s")

    print(f"wrote {wav_path} ({len(out)} samples, {len(out) / OUT_SR:.3f} s, {OUT_SR} Hz mono 16-bit, "
          f"{wav_path.stat().st_size} bytes)")
    print(f"wrote {json_path} ({len(doc['turns'])} turns, {len(doc['words'])} words; "
          f"espeak-ng {version}, voice {args.voice})")


if __name__ == "__main__":
    main()
