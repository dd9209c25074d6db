#!/usr/bin/env python3
"""Word timestamps from text tokens, as Kyutai's reference STT script computes them
(`tokens_to_timestamped_text` in delayed-streams-modeling's
scripts/stt_from_file_pytorch.py), on token streams for the stt-tiny fixture.

The reference script is not part of the `moshi` package: pass the path of a checkout's
copy (it imports julius and sphn, so install those beside moshi):

    /tmp/refenv/bin/pip install julius sphn
    /tmp/refenv/bin/python tests/reference/make_stt_fixtures.py PATH/TO/stt_from_file_pytorch.py
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "stt-tiny"
FRAME_RATE = 12.5
PAD, END_OF_PADDING = 3, 0


def load_reference(path: str):
    spec = importlib.util.spec_from_file_location("stt_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tokens_to_timestamped_text


def spoken(sp, words_with_gaps, eos_at_end: bool) -> list[int]:
    """A token stream as an STT model emits it: padding, then each word's tokens after an
    end-of-padding marker."""
    out = [PAD] * 5
    for word, gap in words_with_gaps:
        out.append(END_OF_PADDING)
        out.extend(sp.encode(word))
        out.extend([PAD] * gap)
    if eos_at_end:
        out.append(sp.eos_id())
    out.extend([PAD] * 20)
    return out


def main() -> None:
    ref = load_reference(sys.argv[1])
    sp = spm.SentencePieceProcessor(model_file=str(FIX / "tokenizer.model"))
    streams = {
        "words": spoken(sp, [("parley", 4), ("listens", 2), ("while", 0), ("you", 7), ("talk", 3)], True),
        # Two words inside one segment: the reference splits by token counts.
        "merged": [PAD, PAD, END_OF_PADDING] + sp.encode("quick brown") + [PAD] * 3
        + [END_OF_PADDING] + sp.encode("fox") + [sp.eos_id()] + [PAD] * 4,
        # No end-of-stream token: the last word ends with the stream.
        "open_end": [PAD] * 3 + [END_OF_PADDING] + sp.encode("speaks") + [PAD] * 2,
        "no_boundaries": [PAD] * 10 + sp.encode("talk"),
        # The stt-tiny model's own greedy output on the fixture speech.
        # (ids past the tiny vocabulary, which a real model never emits, become padding).
        "model": [t if t < sp.get_piece_size() else PAD for t in np.load(FIX / "ref_tokens.npy")[0].tolist()],
    }
    cases = []
    for name, tokens in streams.items():
        for offset in [0.0, 1.5]:
            words = ref(torch.tensor(tokens), sp, FRAME_RATE, END_OF_PADDING, PAD, offset)
            cases.append({
                "name": name, "tokens": tokens, "offset_seconds": offset,
                "words": [{"text": w.text, "start": float(w.timestamp[0]), "end": float(w.timestamp[1])}
                          for w in words],
            })
            print(name, offset, [str(w) for w in words][:6])
    (FIX / "timestamp_cases.json").write_text(json.dumps(cases, indent=1) + "\n")


if __name__ == "__main__":
    main()
