#!/usr/bin/env python3
"""Writes the tensor layouts of Kyutai's published checkpoints, from the reference itself.

For each published model of shared/MODEL_FACTS.md this builds the official `moshi`
package's LMModel from the model's config.json on PyTorch's `meta` device (no memory, no
weights) and records its state_dict: every tensor's name, dtype and shape, in the order
and with the dtypes the published file has. The Rust tests (tests/published_layouts.rs)
check each layout against the published tensor count and file size, write random
weights in that layout (two layers, or all of them for the STT 1B memory test) and load
them with Parley's strict loader, so the loader is held to the reference's names rather
than to a list of Parley's own.

config.json: the published file's content where public records give it whole (STT 2.6B,
TTS 1.6B: third-party checks that compare every key); for the STT 1B repositories it is
rebuilt from the facts page (the same keys as STT 2.6B's, the 1B's values) and marked
`config_source: "reconstructed"`. Moshi 7B repositories have no config.json: the
reference loader's defaults (`_lm_kwargs`) are the config.

    NO_TORCH_COMPILE=1 /var/tmp/refenv/bin/python tests/reference/make_published_layouts.py
"""

import json
import os
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch

from moshi.models import loaders
from moshi.models.loaders import get_moshi_lm

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "published"

STT_26B = {
    "card": 2048, "n_q": 32, "dep_q": 0, "delays": [0] * 33, "dim": 2048, "text_card": 4000,
    "existing_text_padding_id": 3, "num_heads": 32, "num_layers": 48, "hidden_scale": 4.125,
    "causal": True, "layer_scale": None, "context": 375, "max_period": 100000.0,
    "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope",
    "depformer_dim": 1024, "depformer_num_heads": 16, "depformer_num_layers": 6,
    "depformer_dim_feedforward": None, "depformer_multi_linear": True,
    "depformer_pos_emb": "none", "depformer_weights_per_step": True, "conditioners": {},
    "cross_attention": False, "model_id": {"sig": "dabcc802", "epoch": 50},
    "lm_gen_config": {"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50},
    "stt_config": {"audio_delay_seconds": 2.5, "audio_silence_prefix_seconds": 1.0},
    "model_type": "stt", "mimi_name": "mimi-pytorch-e351c8d8@125.safetensors",
    "tokenizer_name": "tokenizer_en_audio_4000.model",
}

STT_1B = dict(STT_26B)
STT_1B.update({
    "text_card": 8000, "num_heads": 16, "num_layers": 16, "context": 750,
    "stt_config": {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0},
    "tokenizer_name": "tokenizer_en_fr_audio_8000.model",
})
STT_1B.pop("model_id")
STT_1B_CANDLE = dict(STT_1B, extra_heads_num_heads=4, extra_heads_dim=6)

TTS = {
    "card": 2048, "n_q": 32, "dep_q": 32, "delays": [0, 0] + [2] * 31, "dim": 2048,
    "text_card": 8000, "existing_text_padding_id": 3, "num_heads": 16, "num_layers": 16,
    "hidden_scale": 4.125, "causal": True, "layer_scale": None, "context": 500,
    "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
    "positional_embedding": "rope", "depformer_dim": 1024, "depformer_num_heads": 16,
    "depformer_num_layers": 4, "depformer_dim_feedforward": 3072,
    "depformer_multi_linear": True, "depformer_pos_emb": "none",
    "depformer_weights_per_step": True, "depformer_low_rank_embeddings": 128,
    "demux_second_stream": True, "text_card_out": None, "cross_attention": True,
    "conditioners": {
        "speaker_wavs": {"type": "tensor", "tensor": {"dim": 512}},
        "cfg": {"type": "lut", "lut": {"n_bins": 7, "dim": 16, "tokenizer": "noop",
                "possible_values": ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"]}},
        "control": {"type": "lut", "lut": {"dim": 2048, "n_bins": 1, "tokenizer": "noop",
                    "possible_values": ["ok"]}},
    },
    "fuser": {"cross_attention_pos_emb": True, "cross_attention_pos_emb_scale": 1,
              "sum": ["control", "cfg"], "prepend": [], "cross": ["speaker_wavs"]},
    "tts_config": {"audio_delay": 1.28, "second_stream_ahead": 2},
    "model_id": {"sig": "1e68beda", "epoch": 240},
    "depformer_weights_per_step_schedule": list(range(8)) + [8] * 8 + [9] * 8 + [10] * 8,
    "tokenizer_name": "tokenizer_spm_8k_en_fr_audio.model",
    "mimi_name": "tokenizer-e351c8d8-checkpoint125.safetensors",
    "moshi_name": "dsm_tts_1e68beda@240.safetensors", "model_type": "tts",
    "lm_gen_config": {"temp": 0.6, "text_temp": 0.6},
}

# name, repo, config (None: no config.json), config source, weights file, published facts
MODELS = [
    ("stt-1b-en_fr", "kyutai/stt-1b-en_fr", STT_1B, "reconstructed",
     "model.safetensors", 131, 1978423520, "computed"),
    ("stt-1b-en_fr-candle", "kyutai/stt-1b-en_fr-candle", STT_1B_CANDLE, "reconstructed",
     "model.safetensors", 135, 1978522200, "published"),
    ("stt-2.6b-en", "kyutai/stt-2.6b-en", STT_26B, "published",
     "model.safetensors", 323, 5234275128, "published"),
    ("moshiko", "kyutai/moshiko-pytorch-bf16", None, "none: the loader's defaults",
     "model.safetensors", 355, 15375500136, "count published, size computed"),
    ("tts-1.6b-en_fr", "kyutai/tts-1.6b-en_fr", TTS, "published",
     "dsm_tts_1e68beda@240.safetensors", 418, 3683719712, "published"),
]

# The keys the reference's CheckpointInfo takes out of config.json before building.
METADATA = ["moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name",
            "model_type", "lm_gen_config", "stt_config", "tts_config", "model_id"]


def published_names(state):
    """The reference saves each attention's projections one per step
    (`in_projs.{i}.weight`); the published files hold them stacked on the rows under the
    older names (`in_proj_weight`, `out_proj.weight`), which the reference's
    `StreamingMultiheadAttention._load_hook` splits on load. This is that hook's inverse."""
    out = {}
    stacked = {}
    for name, t in state.items():
        for new, old in ((".in_projs.", ".in_proj_weight"), (".out_projs.", ".out_proj.weight")):
            if new in name and name.endswith(".weight"):
                prefix, rest = name.split(new)
                step = int(rest.split(".")[0])
                stacked.setdefault(prefix + old, []).append((step, t))
                break
        else:
            out[name] = (t.dtype, list(t.shape))
    for name, parts in stacked.items():
        parts.sort(key=lambda p: p[0])
        rows = sum(p[1].shape[0] for p in parts)
        out[name] = (parts[0][1].dtype, [rows] + list(parts[0][1].shape[1:]))
    return out


def layout(config):
    kwargs = dict(loaders._lm_kwargs if config is None else config)
    for key in METADATA:
        kwargs.pop(key, None)
    model = get_moshi_lm(None, lm_kwargs=kwargs, device="meta", dtype=torch.bfloat16)
    names = []
    for name, (dtype, shape) in sorted(published_names(model.state_dict()).items()):
        dtype = {torch.bfloat16: "BF16", torch.float32: "F32"}[dtype]
        names.append([name, dtype, shape])
    return names


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, repo, config, source, weights, count, size, facts in MODELS:
        tensors = layout(config)
        doc = {
            "repo": repo,
            "config": config,
            "config_source": source,
            # What the reference builds from: the config, or the loader's defaults.
            "lm_kwargs": dict(loaders._lm_kwargs) if config is None else None,
            "weights_file": weights,
            "published": {"tensors": count, "bytes": size, "facts": facts},
            "tensors": tensors,
        }
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"{name}: {len(tensors)} tensors (published {count})")


if __name__ == "__main__":
    main()
