"""SmolLM2-135M perplexity with and without rotations, on the README's protocol (wiki test split, 32 x 128
tokens), one process: the model and the blocks are loaded once, each row prepares a fresh copy.

    nice -n 5 python scripts/rotation_ppl.py                      # FP, W4A4KV4 / W4A8KV4: RTN vs RTN + Hadamard
    python scripts/rotation_ppl.py --recipes w4a4_kv4_rot --blocks 8

RTN here is the recipe as prepared (per-channel min-max weights, dynamic per-token activations and KV), without
calibration; "+ Hadamard" is the same recipe with its `rotations` (R1, R2 fused; R3, R4 online).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import qat
from qat.jobs.eval import corpus_config, tokenizer_for
from qat.data import build_blocks
from qat.export.load import load_any
from qat.jobs.measure import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipes", default="w4a4_kv4_rot,w4a8_kv4_rot")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = tokenizer_for(None, args.model)
    base = load_any(args.model, "float32").eval()
    blocks = build_blocks(corpus_config("wiki", args.seq, args.blocks), tok, splits=["test"])["test"]
    rows = []

    def row(label, model, seconds):
        start = time.perf_counter()
        with torch.no_grad():
            ppl = perplexity(model, blocks)
        rows.append({"method": label, "ppl": round(ppl, 3), "prepare_s": round(seconds, 1),
                     "eval_s": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)

    row("FP", base, 0.0)
    for name in args.recipes.split(","):
        recipe = qat.load_recipe(name).to_dict()
        for label, rotations in (("RTN", None), ("RTN + Hadamard", recipe.get("rotations"))):
            start = time.perf_counter()
            model = qat.prepare(copy.deepcopy(base), {**recipe, "rotations": rotations})
            row(f"{name.removesuffix('_rot')} {label}", model, time.perf_counter() - start)
            del model
    print(f"{args.model}, wiki test, {blocks.shape[0]} x {blocks.shape[1]} tokens")
    print(qat.format_table(rows))


if __name__ == "__main__":
    main()
