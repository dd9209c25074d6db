#!/usr/bin/env python3
"""Makes the small Mimi fixtures that Parley's Rust tests compare against.

Uses the official `moshi` package (pinned in requirements.txt), on the CPU, in float32:
  1. speaks two sentences with espeak-ng (one to test on, one only to seed codebooks);
  2. builds a Mimi with a reduced config that keeps the real structure (SEANet ratios
     8,6,5,4, the 1920-sample frame, the 25 -> 12.5 Hz learnt resampling, RoPE transformers
     with a context shorter than the test so the KV ring wraps, a split RVQ);
  3. makes it informative: small biases, layer scales of order one, and codebook centroids
     drawn from latents (and then residuals) of real speech, as k-means would start;
  4. saves the checkpoint under the published parameter names, in f32 and bf16, with its
     Mimi config JSON and a config.json, laid out like a Kyutai model repository;
  5. runs the reference offline and streaming and saves codes, latents and audio as .npy;
  6. checks that codes vary with the input before anything is trusted.

Run from the repository root:
    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install -r tests/reference/requirements.txt
    NO_TORCH_COMPILE=1 /tmp/refenv/bin/python tests/reference/make_mimi_fixtures.py
"""

import json
import os
import subprocess
import tempfile
import wave
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np
import torch
from safetensors.torch import save_file

from moshi.models.loaders import get_mimi

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "mimi-tiny"
SR = 24000
FRAME = 1920

TEST_TEXT = "Parley listens while you talk, and answers with its own voice."
# Only seeds the codebooks (about a minute of varied speech, so k-means has many more
# points than centroids); never committed.
INIT_SPEECH = [
    ("en-us", 140, "The quick brown fox jumps over the lazy dog. Seven slow swans swam south, "
     "while a chorus of frogs sang loudly by the river bank at night."),
    ("en-gb", 175, "Numbers like thirty three, four hundred and twelve, or nine thousand "
     "sound different from words such as shimmering, thoughtful, or zigzag."),
    ("en-us+f3", 120, "Would you like a cup of tea? Yes please, with a little milk and no sugar. "
     "The weather today is cloudy with occasional bright spells."),
    ("fr-fr", 150, "Bonjour, comment allez-vous aujourd'hui? Il fait beau, allons nous promener "
     "le long de la riviere avant le diner."),
    ("en-gb-scotland", 160, "Pack my box with five dozen liquor jugs. How vexingly quick daft "
     "zebras jump! Sphinx of black quartz, judge my vow."),
]

CONFIG = {
    "sample_rate": SR,
    "channels": 1,
    "frame_rate": 12.5,
    "seanet": {
        "channels": 1,
        "dimension": 32,
        "causal": True,
        "n_filters": 4,
        "n_residual_layers": 1,
        "activation": "ELU",
        "compress": 2,
        "dilation_base": 2,
        "disable_norm_outer_blocks": 0,
        "kernel_size": 7,
        "residual_kernel_size": 3,
        "last_kernel_size": 3,
        "norm": "none",
        "pad_mode": "constant",
        "ratios": [8, 6, 5, 4],
        "true_skip": True,
    },
    "quantizer": {
        "dimension": 16,
        "n_q": 8,
        "bins": 32,
        "input_dimension": 32,
        "output_dimension": 32,
    },
    "transformer": {
        "d_model": 32,
        "num_heads": 4,
        "num_layers": 2,
        "causal": True,
        "layer_scale": 0.01,
        "context": 12,
        "conv_layout": True,
        "max_period": 10000,
        "gating": "none",
        "norm": "layer_norm",
        "positional_embedding": "rope",
        "dim_feedforward": 64,
        "input_dimension": 32,
        "output_dimensions": [32],
    },
}


def speak(text: str, voice: str, path: Path, speed: int = 150) -> None:
    """espeak-ng to a 24 kHz mono 16-bit WAV (sox converts)."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
        subprocess.run(
            ["sox", str(raw), "-r", str(SR), "-c", "1", "-b", "16", str(path), "pad", "0.1", "0.3"],
            check=True,
        )


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert w.getframerate() == SR and w.getnchannels() == 1 and w.getsampwidth() == 2
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    # Same scaling as Parley's reader: i16 / 32768.
    return data.astype(np.float32) / 32768.0


@torch.no_grad()
def latents(mimi, pcm: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pcm)[None, None]
    return mimi._encode_to_unquantized_latent(x)  # [1, C, T] at 12.5 Hz


@torch.no_grad()
def seed_codebooks(rvq, emb: torch.Tensor, gen: torch.Generator) -> None:
    """Centroids drawn from the projected latents (then from the residuals) of real speech
    and refined by a few Lloyd iterations, as training's k-means does; cluster usage
    random, so that the division in the reference's `embedding` matters."""
    x = rvq.input_proj(emb)[0].T  # [T, dim]
    residual = x.clone()
    for layer in rvq.vq.layers:
        cb = layer._codebook
        bins = cb.embedding_sum.shape[0]
        idx = torch.randperm(residual.shape[0], generator=gen)[:bins]
        centroids = residual[idx].clone()
        for _ in range(KMEANS_ITERS):
            assign = torch.cdist(residual, centroids).argmin(-1)
            for b in range(bins):
                members = residual[assign == b]
                if len(members):
                    centroids[b] = members.mean(0)
        usage = 0.5 + 1.5 * torch.rand(bins, generator=gen)
        cb.embedding_sum.copy_(centroids * usage[:, None])
        cb.cluster_usage.copy_(usage)
        cb._initialized.fill_(1.0)
        cb._embedding = None
        codes = cb.encode(residual)
        residual = residual - cb.decode(codes)


def published_names(state: dict) -> dict:
    """The names of Kyutai's published Mimi checkpoint (the reference accepts both)."""
    out = {}
    for k, v in state.items():
        k = k.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight")
        k = k.replace("self_attn.out_projs.0.weight", "self_attn.out_proj.weight")
        out[k] = v.contiguous()
    return out


def stats(name: str, codes: np.ndarray) -> None:
    k, t = codes.shape
    distinct = [len(np.unique(codes[i])) for i in range(k)]
    changes = [(np.diff(codes[i]) != 0).mean() for i in range(k)]
    print(f"{name}: {k} codebooks x {t} frames; distinct per codebook {distinct}; "
          f"frame-to-frame change rate {np.round(changes, 2).tolist()}")
    assert min(distinct) >= 8, f"{name}: codes barely vary ({distinct}); fixture is uninformative"
    assert min(changes) >= 0.3, f"{name}: codes rarely change between frames ({changes})"


@torch.no_grad()
def min_margin(quantizer, emb: torch.Tensor) -> float:
    """Smallest gap between the nearest and second-nearest centroid, over every code the
    quantizer picks for `emb` ([1, C, T]), relative to the nearest distance. A fixture
    with near-ties would make code parity depend on rounding, not on correctness."""
    worst = float("inf")
    for rvq, n in [(quantizer.rvq_first, quantizer.rvq_first.n_q), (quantizer.rvq_rest, quantizer.rvq_rest.n_q)]:
        residual = rvq.input_proj(emb)[0].T.double()
        for layer in rvq.vq.layers[:n]:
            e = layer._codebook.embedding.double()
            d = torch.cdist(residual, e)
            top = d.topk(2, largest=False).values
            worst = min(worst, ((top[:, 1] - top[:, 0]) / top[:, 0].clamp(min=1e-12)).min().item())
            residual = residual - e[d.argmin(-1)]
    return worst


@torch.no_grad()
def run_reference(mimi, pcm: np.ndarray, prefix: str) -> dict:
    x = torch.from_numpy(pcm)[None, None]
    n_frames = pcm.shape[0] // FRAME
    res = {}
    res["latent_offline"] = latents(mimi, pcm)[0].numpy()
    codes = mimi.encode(x)
    res["codes_offline"] = codes[0].numpy().astype(np.int64)
    res["decoded_offline"] = mimi.decode(codes)[0, 0].numpy()
    stream_codes, stream_pcm = [], []
    stream_latents = []
    with mimi.streaming(1):
        for i in range(n_frames):
            emb = mimi._encode_to_unquantized_latent(x[..., i * FRAME:(i + 1) * FRAME])
            stream_latents.append(emb)
            c = mimi.quantizer.encode(emb)
            stream_codes.append(c)
            stream_pcm.append(mimi.decode(c))
    margin = min(min_margin(mimi.quantizer, res_latent) for res_latent in
                 [torch.from_numpy(res["latent_offline"])[None], torch.cat(stream_latents, -1)])
    res["margin"] = margin
    res["codes_stream"] = torch.cat(stream_codes, -1)[0].numpy().astype(np.int64)
    res["decoded_stream"] = torch.cat(stream_pcm, -1)[0, 0].numpy()
    return {f"{prefix}{k}": v for k, v in res.items()}


MIN_MARGIN = 3e-5
KMEANS_ITERS = 5


@torch.no_grad()
def build(seed: int, init_pcm: np.ndarray):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(1234 + seed)
    mimi = get_mimi(None, CONFIG, num_codebooks=CONFIG["quantizer"]["n_q"], device="cpu")
    mimi = mimi.float().eval()
    for name, p in mimi.named_parameters():
        if name.endswith(".bias"):
            p.mul_(0.05)
        if "layer_scale" in name:
            p.copy_(0.3 + 0.7 * torch.rand(p.shape, generator=gen))
    emb = latents(mimi, init_pcm)
    seed_codebooks(mimi.quantizer.rvq_first, emb, gen)
    seed_codebooks(mimi.quantizer.rvq_rest, emb, gen)
    # Bring the decoded audio to speech level (rms 0.1), so that the tests' absolute
    # tolerance on samples is a tight one.
    codes = mimi.encode(torch.from_numpy(init_pcm[: (len(init_pcm) // FRAME) * FRAME])[None, None])
    rms = mimi.decode(codes).pow(2).mean().sqrt().item()
    last = mimi.decoder.model[-1].conv.conv
    last.weight.mul_(0.1 / rms)
    last.bias.mul_(0.1 / rms)
    return mimi


def main() -> None:
    torch.set_num_threads(1)  # deterministic reductions
    OUT.mkdir(parents=True, exist_ok=True)
    init_parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (voice, speed, text) in enumerate(INIT_SPEECH):
            path = Path(tmp) / f"init{i}.wav"
            speak(text, voice, path, speed)
            init_parts.append(read_wav(path))
    init_pcm = np.concatenate(init_parts)
    test_wav = OUT / "input.wav"
    speak(TEST_TEXT, "en-gb", test_wav)
    pcm = read_wav(test_wav)
    # Whole frames only, so that offline and streaming see the same samples.
    pcm = pcm[: (pcm.shape[0] // FRAME) * FRAME]
    print(f"test audio: {pcm.shape[0] / SR:.2f} s, {pcm.shape[0] // FRAME} frames")

    n_q = CONFIG["quantizer"]["n_q"]
    for seed in range(50):
        mimi = build(seed, init_pcm)
        state = published_names(mimi.state_dict())
        save_file(state, str(OUT / "mimi.safetensors"))
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()},
                  str(OUT / "mimi_bf16.safetensors"))
        # Reload through the official loader, as a user's checkpoint would be.
        ref = get_mimi(OUT / "mimi.safetensors", CONFIG, num_codebooks=n_q).float().eval()
        outs = run_reference(ref, pcm, "")
        ref16 = get_mimi(OUT / "mimi_bf16.safetensors", CONFIG, num_codebooks=n_q).float().eval()
        outs16 = run_reference(ref16, pcm, "bf16_")
        margin = min(outs.pop("margin"), outs16.pop("bf16_margin"))
        print(f"seed {seed}: smallest relative margin between nearest centroids {margin:.2e}")
        if margin > MIN_MARGIN:
            break
    else:
        raise SystemExit("no seed gave a quantizer without near-ties")
    outs.update({k: v for k, v in outs16.items() if "codes" in k})

    (OUT / "mimi_config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (OUT / "config.json").write_text(json.dumps({
        "mimi_name": "mimi.safetensors",
        "mimi_config_name": "mimi_config.json",
    }, indent=2) + "\n")
    stats("offline codes", outs["codes_offline"])
    stats("streaming codes", outs["codes_stream"])
    n_diff = int((outs["codes_offline"] != outs["codes_stream"]).sum())
    print(f"reference offline vs streaming: {n_diff} codes differ (ring wrap, T=2 per step)")
    for name, arr in outs.items():
        np.save(OUT / f"ref_{name}.npy", arr)
    audio = outs["decoded_offline"]
    print(f"decoded audio: rms {np.sqrt((audio ** 2).mean()):.4f}, "
          f"max |stream - offline| {np.abs(outs['decoded_stream'] - audio).max():.2e}")


if __name__ == "__main__":
    main()
