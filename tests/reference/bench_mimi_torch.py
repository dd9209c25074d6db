#!/usr/bin/env python3
"""Times the official moshi package's Mimi (full published config, random weights,
float32, CPU) streaming one 80 ms frame at a time, to set beside `parley bench mimi`.

    NO_TORCH_COMPILE=1 /tmp/refenv/bin/python tests/reference/bench_mimi_torch.py --threads 1
"""

import argparse
import os
import time

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np
import torch

from moshi.models.loaders import get_mimi


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--codebooks", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mimi = get_mimi(None, num_codebooks=args.codebooks).float().eval()
    with torch.no_grad():
        # Random codebooks (left as initialised they are all zeros).
        for name, buf in mimi.named_buffers():
            if name.endswith("embedding_sum"):
                buf.copy_(torch.randn_like(buf) * 0.1)
        t = np.arange(1920 * (args.frames + args.warmup)) / 24000
        pcm = torch.from_numpy((0.3 * np.sin(2 * np.pi * 220 * t * (1 + t))).astype(np.float32))
        enc, dec = [], []
        with mimi.streaming(1):
            for i in range(args.frames + args.warmup):
                frame = pcm[i * 1920:(i + 1) * 1920][None, None]
                t0 = time.perf_counter()
                codes = mimi.encode(frame)
                t1 = time.perf_counter()
                mimi.decode(codes)
                t2 = time.perf_counter()
                if i >= args.warmup:
                    enc.append((t1 - t0) * 1e3)
                    dec.append((t2 - t1) * 1e3)
    tot = np.array(enc) + np.array(dec)
    print(f"torch {torch.__version__} mimi streaming, {args.codebooks} codebooks, "
          f"{args.threads} thread(s), {args.frames} frames")
    for name, v in [("encode", enc), ("decode", dec), ("total", tot)]:
        v = np.array(v)
        print(f"  {name:<8} mean {v.mean():6.2f}  p50 {np.percentile(v, 50):6.2f}  "
              f"p90 {np.percentile(v, 90):6.2f}  max {v.max():6.2f} ms")
    print(f"  real-time factor {tot.mean() / 80:.3f}")


if __name__ == "__main__":
    main()
