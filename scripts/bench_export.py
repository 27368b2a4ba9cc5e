"""GGUF encoder speed: qat's vectorized torch encoders vs gguf-py's numpy ones, one 4096x4096 tensor, one run.

    .venv/bin/python scripts/bench_export.py [--size 4096] [--repeat 3]

Prints seconds per tensor (best of --repeat) for each type, gguf-py's time where it can quantize the type
(it cannot quantize K-quants), the ratio, and whether the blocks are bit-identical. llama.cpp's C reference
times for K-quants quoted in issue #5 (same kind of machine): Q4_K ~1.0 s, Q6_K ~0.43 s.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

LLAMA_CPP_QUOTED = {"Q4_K": 1.0, "Q6_K": 0.43}


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    from gguf import GGMLQuantizationType as T
    from gguf import quants as gq

    from qat.export.ggml_blocks import encode

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--types", default="Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,BF16,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K")
    args = parser.parse_args()
    w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    w_np = w.numpy()
    print(f"tensor {args.size}x{args.size} fp32, torch threads {torch.get_num_threads()}, best of {args.repeat}")
    print(f"{'type':6} {'qat s':>8} {'gguf-py s':>10} {'speed-up':>9} {'identical':>10} {'llama.cpp s (quoted)':>21}")
    for name in args.types.split(","):
        ours, (blocks, _) = best_of(lambda: encode(w, name), args.repeat)
        try:
            theirs, ref = best_of(lambda: gq.quantize(w_np, T[name]), 1 if args.repeat > 1 else args.repeat)
            same = str(np.array_equal(blocks.numpy(), ref))
            ratio = f"{theirs / ours:8.1f}x"
            theirs_s = f"{theirs:10.3f}"
        except NotImplementedError:
            same, ratio, theirs_s = "n/a", "      n/a", "       n/a"
        quoted = f"{LLAMA_CPP_QUOTED[name]:21.2f}" if name in LLAMA_CPP_QUOTED else " " * 21
        print(f"{name:6} {ours:8.3f} {theirs_s} {ratio} {same:>10} {quoted}")


if __name__ == "__main__":
    main()
