"""SmolLM2-135M perplexity with and without rotations, on the README's protocol (wiki test split, 32 x 128
tokens), one process: the model and the blocks are loaded once, each row prepares a fresh copy.

    nice -n 10 python scripts/rotation_ppl.py                     # FP, W4A4KV4 / W4A8KV4: RTN vs RTN + Hadamard
    python scripts/rotation_ppl.py --recipes w4a8_kv4_rot --rows ablation            # R1 / R1+R2 / ... one by one
    python scripts/rotation_ppl.py --recipes w4a8_kv4_rot --rows none,all --only weight   # one quantizer role
    python scripts/rotation_ppl.py --methods gptq --rows all        # GPTQ + Hadamard (128 x 128 calibration tokens)
    python scripts/rotation_ppl.py --invariance                     # float logits of each rotation vs the model's

RTN here is the recipe as prepared (per-channel min-max weights, dynamic per-token activations and KV), without
calibration; GPTQ calibrates on the first 128 x 128 tokens of the train split (the README's protocol). A row's
rotations: "none", "all" (the recipe's own), or rotation names joined by "+" (e.g. "r1+r2+r3+r4"), each of the
kind the recipe gives it (else random Hadamard R1 / R2, Hadamard R3 / R4). `--only weight|input|kv_cache` keeps
one quantizer role of the recipe (R3 needs kv_cache).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import qat
from qat.data import build_blocks
from qat.export.load import load_any
from qat.jobs.eval import corpus_config, tokenizer_for
from qat.jobs.measure import perplexity
from qat.ptq import ptq_model

ABLATION = "none,r1,r1+r2,r1+r2+r3,all,r4,r3,r2+r3+r4"
ROLES = ("weight", "input", "kv_cache")
KINDS = {"r1": "random_hadamard", "r2": "random_hadamard", "r3": "hadamard", "r4": "hadamard"}  # unless the recipe says
KV_OFF = {"bits": 8, "granularity": "per_token", "dynamic": True}  # routes attention through qat; removed after


def rotations_of(recipe: dict, row: str) -> dict | None:
    """The `rotations` node of a row: none, all (the recipe's) or names joined by '+' (of the recipe's kind, else
    QuaRot's: random Hadamard R1 / R2, Hadamard R3 / R4)."""
    own = {**KINDS, **(recipe.get("rotations") or {})}
    if row == "none":
        return None
    if row == "all":
        return recipe.get("rotations")
    names = row.split("+")
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise SystemExit(f"row {row!r}: {unknown} are not rotations; choose from {sorted(KINDS)}")
    return {**{n: own[n] for n in names}, "seed": own.get("seed", 0)}


def restrict(recipe: dict, only: str | None) -> dict:
    """The recipe with one quantizer role kept (R3 dropped without the KV role: it needs a KV scheme)."""
    if only is None:
        return recipe
    out = {**recipe, **{role: None for role in ROLES if role != only}}
    if only != "kv_cache" and out.get("rotations"):
        out["rotations"] = {k: v for k, v in out["rotations"].items() if k != "r3"} or None
    return out


def invariance(base, blocks) -> None:
    """Max |logit difference| of the float model with each rotation (online ones through qat's KV attention,
    quantizers taken out) against the plain float model, on 4 blocks."""
    ids = blocks[:4]
    with torch.no_grad():
        ref = base(ids).logits
    rows = []
    for rot in ({"r1": "random_hadamard"}, {"r1": "hadamard"}, {"r2": "random_hadamard"}, {"r3": "hadamard"},
                {"r4": "hadamard"}, {"kv_cache": "llama_cpp"},
                {"r1": "random_hadamard", "r2": "random_hadamard", "r3": "hadamard", "r4": "hadamard"}):
        model = qat.prepare(copy.deepcopy(base), {"targets": ["Linear"], "ignore": ["lm_head", "re:.*_proj"],
                                                  "kv_cache": KV_OFF, "rotations": rot})
        for module in model.modules():
            if hasattr(module, "k_quantizer"):
                module.k_quantizer = module.v_quantizer = None
        with torch.no_grad():
            diff = (model(ids).logits - ref).abs()
        rows.append({"rotations": "+".join(rot), "kinds": ",".join(rot.values()), "max_abs": float(diff.max()),
                     "mean_abs": float(diff.mean()), "max_abs_logit": float(ref.abs().max())})
        print(rows[-1], flush=True)
    print(qat.format_table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipes", default="w4a4_kv4_rot,w4a8_kv4_rot")
    parser.add_argument("--rows", default="none,all", help=f"rotations per row; 'ablation' = {ABLATION}")
    parser.add_argument("--methods", default="rtn", help="rtn and/or gptq")
    parser.add_argument("--only", choices=ROLES, default=None, help="keep one quantizer role of the recipe")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--calibration", type=int, default=128, help="GPTQ: calibration blocks of --seq tokens")
    parser.add_argument("--no-fp", action="store_true", help="skip the float row")
    parser.add_argument("--invariance", action="store_true", help="float logits per rotation, then exit")
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = tokenizer_for(None, args.model)
    base = load_any(args.model, "float32").eval()
    blocks = build_blocks(corpus_config("wiki", args.seq, args.blocks), tok, splits=["test"])["test"]
    if args.invariance:
        return invariance(base, blocks)
    calibration = []
    if "gptq" in args.methods:
        cfg = corpus_config("wiki", args.seq, None)
        cfg.max_train_blocks = args.calibration
        train = build_blocks(cfg, tok, splits=["train"])["train"][:args.calibration]
        calibration = [train[i:i + 8] for i in range(0, len(train), 8)]
    rows = []

    def row(label, model, seconds):
        start = time.perf_counter()
        with torch.no_grad():
            ppl = perplexity(model, blocks)
        rows.append({"method": label, "ppl": round(ppl, 3), "prepare_s": round(seconds, 1),
                     "eval_s": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)

    if not args.no_fp:
        row("FP", base, 0.0)
    for name in args.recipes.split(","):
        recipe = qat.load_recipe(name).to_dict()
        for method in args.methods.split(","):
            for spec in (ABLATION if args.rows == "ablation" else args.rows).split(","):
                r = restrict({**recipe, "rotations": rotations_of(recipe, spec)}, args.only)
                start = time.perf_counter()
                model = copy.deepcopy(base)
                if method == "rtn":
                    model = qat.prepare(model, r)
                else:
                    model = ptq_model(model, r, method, calibration, progress=False)
                label = f"{name.removesuffix('_rot')}{'/' + args.only if args.only else ''} {method.upper()}"
                row(f"{label} + {spec}", model, time.perf_counter() - start)
                del model
    print(f"{args.model}, wiki test, {blocks.shape[0]} x {blocks.shape[1]} tokens")
    print(qat.format_table(rows))


if __name__ == "__main__":
    main()
