"""Smart Turn v3.2 fixtures: the pipecat-ai wheel's own feature code and the model's
probabilities on the project's dialogue, for `tests/smart_turn.rs`.

    /tmp/refenv/bin/pip install onnxruntime==1.32.0 && /tmp/refenv/bin/pip install --no-deps pipecat-ai==1.14.0
    python3 scripts/fetch_onnx.py      # the model, into ~/.cache/parley/smart-turn/
    /tmp/refenv/bin/python tests/reference/make_smart_turn_fixtures.py

For each cut point of tests/fixtures/vad/dialogue_16k.wav (the audio up to it, as the
end of a user's turn would be judged), the last 8 s front-padded with zeros as pipecat's
`LocalSmartTurnAnalyzerV3` does, the wheel's `compute_whisper_log_mel_features`, and the
model's output. The published "-cpu" model quantizes its activations, so at some inputs
its output jumps under changes of its features far below 1e-4; each cut also records how
far the output moves under 8 draws of uniform noise of +-1e-5 on the features (`spread`),
and the Rust test allows that much beyond 1e-3. Writes tests/fixtures/smart_turn/cuts.json
(cut points in samples, probabilities, spreads) and features_<cut>.npy for two cuts, one
shorter than 8 s and one longer (f32 [80, 800]).
"""
import importlib.util
import json
import os
import sysconfig
import wave

import numpy as np
import onnxruntime

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "smart_turn")
CUTS_S = [2.0, 3.9, 6.45, 9.3, 11.0]
FEATURES_AT_S = (6.45, 9.3)


def features_module():
    # The module is numpy-only; importing it through the `pipecat` package would pull in
    # the whole framework's dependencies.
    path = os.path.join(sysconfig.get_paths()["purelib"], "pipecat", "audio", "turn", "smart_turn", "_whisper_features.py")
    spec = importlib.util.spec_from_file_location("whisper_features", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def last_8s(audio):
    n = 8 * 16000
    if len(audio) > n:
        return audio[-n:]
    return np.pad(audio, (n - len(audio), 0), mode="constant")


def main():
    os.makedirs(OUT, exist_ok=True)
    feats = features_module()
    with wave.open(os.path.join(ROOT, "tests", "fixtures", "vad", "dialogue_16k.wav")) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    model = os.path.join(cache, "parley", "smart-turn", "smart-turn-v3.2-cpu.onnx")
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    cuts = []
    for cut_s in CUTS_S:
        end = min(int(round(cut_s * 16000)), len(pcm))
        f = feats.compute_whisper_log_mel_features(last_8s(pcm[:end]), do_normalize=True)
        run = lambda x: float(session.run(None, {"input_features": x[None].astype(np.float32)})[0].reshape(-1)[0])
        prob = run(f)
        rng = np.random.default_rng(end)
        spread = max(abs(run(f + rng.uniform(-1e-5, 1e-5, f.shape)) - prob) for _ in range(8))
        cuts.append({"end_sample": end, "probability": prob, "spread": spread})
        if cut_s in FEATURES_AT_S:
            np.save(os.path.join(OUT, f"features_{end}.npy"), f.astype(np.float32))
        print(f"cut {cut_s:5.2f} s: probability {prob:.4f}, spread under 1e-5 noise {spread:.4f}")
    with open(os.path.join(OUT, "cuts.json"), "w") as o:
        json.dump({"sample_rate_hz": 16000, "cuts": cuts}, o, indent=1)


if __name__ == "__main__":
    main()
