#!/usr/bin/env python3
"""Encodes and decodes test strings with the `sentencepiece` library on the fixture
tokenizers, so Parley's tokenizer can be checked against it without Python.

    /tmp/refenv/bin/python tests/reference/make_tokenizer_fixtures.py
"""

import json
import random
from pathlib import Path

import sentencepiece as spm

FIX = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
TEXTS = [
    "parley listens while you talk",
    "Full duplex means it listens while it speaks.",
    "the quick brown fox",
    "an unseen word: xylophone, 42 zebras!",
    "  leading and   repeated   spaces ",
    "café crème brûlée",
    "",
    "a",
]


def main() -> None:
    for name in ["stt-tiny", "moshi-tiny"]:
        sp = spm.SentencePieceProcessor(model_file=str(FIX / name / "tokenizer.model"))
        rng = random.Random(0)
        cases = {
            "vocab_size": sp.get_piece_size(),
            "eos_id": sp.eos_id(),
            "encode": [{"text": t, "ids": sp.encode(t)} for t in TEXTS],
            "decode": [],
            "pieces": [sp.id_to_piece(i) for i in range(sp.get_piece_size())],
        }
        for _ in range(20):
            ids = [rng.randrange(sp.get_piece_size()) for _ in range(rng.randrange(1, 12))]
            cases["decode"].append({"ids": ids, "text": sp.decode(ids)})
        (FIX / name / "tokenizer_cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
        print(name, sp.get_piece_size(), "pieces")


if __name__ == "__main__":
    main()
