#!/usr/bin/env python3
"""Makes the small delayed-streams LM fixtures that Parley's Rust tests compare against.

Uses the official `moshi` package (pinned in requirements.txt), CPU, float32. Needs the
Mimi fixture (make_mimi_fixtures.py) first: its codec turns speech into the input codes.

Two tiny model directories laid out like Kyutai Hub repositories:
  stt-tiny:   dep_q 0, extra heads (like kyutai/stt-1b-en_fr), text stream only out;
  moshi-tiny: depformer with per-step weights and multi-linear input, user and model
              audio streams, the real Moshi delay pattern.
Each gets config.json, model.safetensors (published parameter names), the tiny Mimi and
its config, and a SentencePiece model trained here. The reference's LMGen runs greedily
over the Mimi codes of about nine seconds of speech; its tokens and logits are saved.
A seed is kept only if every greedy choice wins by a clear margin (no near-ties), and
the tokens must vary with the input.

    NO_TORCH_COMPILE=1 /tmp/refenv/bin/python tests/reference/make_lm_fixtures.py
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np
import sentencepiece as spm
import torch
from safetensors.torch import save_file

from moshi.models.lm import LMGen
from moshi.models.loaders import get_mimi, get_moshi_lm

import make_mimi_fixtures as mf

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
MIMI_DIR = FIX / "mimi-tiny"
FRAME = 1920
MIN_GAP = 1e-3  # smallest accepted gap between the best and second-best logit

SPEECH = ("en-us", 140, "Full duplex means it listens while it speaks. It can interrupt, "
          "laugh, and answer before you have finished, like a person would.")
SPM_TEXT = [
    "parley listens while you talk and answers with its own voice",
    "full duplex means it listens while it speaks",
    "the quick brown fox jumps over the lazy dog",
    "seven slow swans swam south while frogs sang by the river",
    "would you like a cup of tea with a little milk",
] * 20

COMMON = {
    "dim": 32,
    "text_card": 64,
    "existing_text_padding_id": 3,
    "card": 32,
    "num_heads": 4,
    "num_layers": 2,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 24,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
}

STT = dict(COMMON, **{
    "n_q": 8,
    "dep_q": 0,
    "delays": [0] * 9,
    "extra_heads_num_heads": 2,
    "extra_heads_dim": 6,
})

MOSHI = dict(COMMON, **{
    "n_q": 16,
    "dep_q": 8,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
    "depformer_dim": 16,
    "depformer_dim_feedforward": 66,
    "depformer_num_heads": 2,
    "depformer_num_layers": 2,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 8,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
})


def published_names(state: dict, dep_q: int) -> dict:
    """The parameter names of Kyutai's published PyTorch checkpoints: one `in_proj_weight`
    per attention (per-step weights stacked along the output dimension)."""
    out = {}
    grouped: dict = {}
    for k, v in state.items():
        for kind, new in (("in_projs", "in_proj_weight"), ("out_projs", "out_proj.weight")):
            marker = f".self_attn.{kind}."
            if marker in k:
                prefix, rest = k.split(marker)
                idx = int(rest.split(".")[0])
                grouped.setdefault(f"{prefix}.self_attn.{new}", {})[idx] = v
                break
        else:
            out[k] = v.contiguous()
    for k, parts in grouped.items():
        out[k] = torch.cat([parts[i] for i in sorted(parts)], 0).contiguous()
    return out


def train_tokenizer(path_prefix: Path, vocab: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(SPM_TEXT) + "\n")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(path_prefix), vocab_size=vocab,
            model_type="unigram", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
            pad_id=3, num_threads=1, minloglevel=2, hard_vocab_limit=False,
        )


@torch.no_grad()
def speech_codes() -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        voice, speed, text = SPEECH
        mf.speak(text, voice, wav, speed)
        pcm = mf.read_wav(wav)
    pcm = pcm[: len(pcm) // FRAME * FRAME]
    cfg = json.loads((MIMI_DIR / "mimi_config.json").read_text())
    mimi = get_mimi(MIMI_DIR / "mimi.safetensors", cfg, num_codebooks=8).float().eval()
    return mimi.encode(torch.from_numpy(pcm)[None, None])[0].numpy()  # [8, T]


def gap(logits: torch.Tensor) -> float:
    top = logits.float().reshape(-1, logits.shape[-1]).topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


@torch.no_grad()
def run(lm, codes: np.ndarray, dep_q: int):
    """Greedy LMGen over `codes`; returns tokens per returned step, text logits and extra
    heads per step, and the smallest argmax margin seen."""
    gen = LMGen(lm, use_sampling=False, temp=0.0, temp_text=0.0)
    text_logits, margins = [], []
    gen.on_text_logits_hook = lambda l: (text_logits.append(l[0, 0, 0].clone()), margins.append(gap(l)))
    if dep_q:
        orig = lm.forward_depformer

        def spy(*args, **kwargs):
            out = orig(*args, **kwargs)
            margins.append(gap(out))
            return out
        lm.forward_depformer = spy
    tokens, extra = [], []
    with gen.streaming(1):
        for t in range(codes.shape[1]):
            inp = torch.from_numpy(codes[:, t:t + 1].astype(np.int64))[None]
            res = gen.step_with_extra_heads(inp)
            if res is None:
                continue
            out, heads = res
            tokens.append(out[0, :, 0].numpy())
            if heads:
                extra.append(torch.stack([h[0, 0] for h in heads]).numpy())
    if dep_q:
        lm.forward_depformer = orig
    return (np.stack(tokens, 1).astype(np.int64), torch.stack(text_logits).numpy(),
            np.stack(extra) if extra else None, min(margins))


def make(name: str, lm_cfg: dict, model_type: str, extra_cfg: dict, codes: np.ndarray) -> None:
    out = FIX / name
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out / "tokenizer", lm_cfg["text_card"])
    shutil.copy(MIMI_DIR / "mimi.safetensors", out / "mimi.safetensors")
    shutil.copy(MIMI_DIR / "mimi_config.json", out / "mimi_config.json")
    for seed in range(50):
        torch.manual_seed(seed)
        lm = get_moshi_lm(None, lm_kwargs=lm_cfg, device="cpu", dtype=torch.float32).eval()
        save_file(published_names(lm.state_dict(), lm_cfg["dep_q"]), str(out / "model.safetensors"))
        # Reload through the official loader, as a user's checkpoint would be.
        lm = get_moshi_lm(out / "model.safetensors", lm_kwargs=lm_cfg, device="cpu",
                          dtype=torch.float32).eval()
        tokens, logits, extra, margin = run(lm, codes, lm_cfg["dep_q"])
        text = tokens[0]
        distinct, changes = len(np.unique(text)), float((np.diff(text) != 0).mean())
        print(f"{name} seed {seed}: min margin {margin:.2e}, {len(np.unique(text))} distinct "
              f"text tokens, change rate {changes:.2f}")
        if margin > MIN_GAP and distinct >= 8 and changes > 0.3:
            break
    else:
        raise SystemExit(f"{name}: no seed gave informative, tie-free outputs")
    config = dict(lm_cfg, **extra_cfg, **{
        "model_type": model_type,
        "moshi_name": "model.safetensors",
        "mimi_name": "mimi.safetensors",
        "mimi_config_name": "mimi_config.json",
        "tokenizer_name": "tokenizer.model",
    })
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    np.save(out / "input_codes.npy", codes.astype(np.int64))
    np.save(out / "ref_tokens.npy", tokens)
    np.save(out / "ref_text_logits.npy", logits.astype(np.float32))
    if extra is not None:
        np.save(out / "ref_extra_heads.npy", extra.astype(np.float32))
    print(f"{name}: {tokens.shape[1]} returned steps of {codes.shape[1]}; tokens[:, :12] =\n{tokens[:, :12]}")


def main() -> None:
    torch.set_num_threads(1)
    codes = speech_codes()
    print(f"input: {codes.shape[1]} frames of {codes.shape[0]} codebooks")
    make("stt-tiny", STT, "stt",
         {"stt_config": {"audio_silence_prefix_seconds": 1.0, "audio_delay_seconds": 0.5}},
         codes)
    make("moshi-tiny", MOSHI, "moshi", {"lm_gen_config": {"temp": 0.8, "temp_text": 0.7,
                                                           "top_k": 250, "top_k_text": 25}},
         codes)


if __name__ == "__main__":
    main()
