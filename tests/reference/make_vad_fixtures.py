"""Silero VAD fixtures: the official `silero-vad` package's speech probabilities on the
project's dialogue, for `tests/vad_silero.rs`.

    /tmp/refenv/bin/pip install onnxruntime==1.32.0 && /tmp/refenv/bin/pip install --no-deps silero-vad==6.2.3
    /tmp/refenv/bin/python tests/reference/make_vad_fixtures.py

Writes tests/fixtures/vad/dialogue_16k.wav (assets/speech/dialogue.wav resampled to 16 kHz
by sox, 16-bit) and silero_probs.npy (f32, one probability per 512-sample chunk, the
package's ONNX model called chunk after chunk from a fresh state, as its streaming
iterator does; the last partial chunk is left out).
"""
import os
import subprocess
import wave

import numpy as np
import torch
from silero_vad import load_silero_vad

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "vad")


def main():
    os.makedirs(OUT, exist_ok=True)
    wav16 = os.path.join(OUT, "dialogue_16k.wav")
    subprocess.run(
        ["sox", os.path.join(ROOT, "assets", "speech", "dialogue.wav"), "-r", "16000", "-b", "16", "-c", "1", wav16],
        check=True,
    )
    with wave.open(wav16) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    model = load_silero_vad(onnx=True)
    model.reset_states()
    probs = []
    for start in range(0, len(pcm) - 511, 512):
        chunk = torch.from_numpy(pcm[start : start + 512].copy())
        probs.append(float(model(chunk, 16000).item()))
    probs = np.array(probs, dtype=np.float32)
    np.save(os.path.join(OUT, "silero_probs.npy"), probs)
    print(f"{len(probs)} chunks, {int((probs > 0.5).sum())} over 0.5, max {probs.max():.3f}")


if __name__ == "__main__":
    main()
