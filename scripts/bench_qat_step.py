"""Step time and peak memory of a QAT training step vs a full-precision step of the same model, same run.

    python scripts/bench_qat_step.py                       # tiny-ish Llama (random), W4A16 g128 and W4A8
    python scripts/bench_qat_step.py --model smollm2-135m --batch 2 --seq 128 --steps 4
    python scripts/bench_qat_step.py --model moe --experts grouped_mm   # tiny Qwen3-MoE (8 experts, top-2), W4A16
    python scripts/bench_qat_step.py --ste both     # each QAT variant with the lean STE and with the unfused one
    python scripts/bench_qat_step.py --layers 1 --hidden 2048 --inter 7168 --vocab 256   # ~one decoder layer's cost
    python scripts/bench_qat_step.py --set rotations --model smollm2-135m   # the online rotations' share (R3 + R4)
    python scripts/bench_qat_step.py --set learned --layers 2 --hidden 256 --vocab 32000   # learned R1 / R2's cost

Each variant gets a fresh copy of the model and its own AdamW; steps alternate FP / QAT variants (round
robin) so machine noise hits all of them alike; the median step time is reported, wall clock and, on CPU,
the process CPU time of the step (`cpu_ms`: what a loaded, shared machine distorts least). Peak memory is the peak
RSS growth over a step on CPU (sampled every ms; the step's activations, gradients, fake-quant temporaries),
or torch.cuda.max_memory_allocated growth on GPU. On CPU with glibc, `alloc_peak_MB` is the peak growth of the bytes
malloc has handed out and not taken back (mallinfo2, sampled likewise): the step's live tensors, without the freed
memory the allocator keeps mapped that RSS also counts. `saved_MB` is exact: the bytes autograd keeps between forward
and backward (distinct storages, parameters excluded), counted on one extra step: what the lean STE removes.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import resource
import statistics
import threading
import time

import torch

import qat
from qat.jobs.measure import saved_for_backward_bytes
from qat.models import load_model
from qat.testing import tiny_moe
from qat.transform.rotations.learned import attach_learned_rotations, resolve_init

SCHEMES = {"W4A16": "w4a16_g128", "W4A8 (int8 per-token act)": "w4a8_kv8",
           "W4A8 + rotations (R1/R2 fused, R4 online)": "w4a8_kv8+rot"}
# the online rotations' share of a step: the same scheme with R1 / R2 (fused: free at run time) and R4 (a Hadamard
# on every down_proj input, forward and backward); R3 rotates keys for the KV quantizer, which a step here has not
ROTATIONS = {"r1": "random_hadamard", "r2": "random_hadamard", "r4": "hadamard"}
OFFLINE = {"r1": "random_hadamard", "r2": "random_hadamard"}
# --set rotations: one recipe with its KV-cache quantizers in the step (KV QAT), side by side with R1 / R2 only
# (fused into the weights: no run-time cost) and with R3 (queries and keys after RoPE) and R4 (down_proj input)
# online too; the step-time ratio of the two is the online rotations' share
ROTATION_SCHEMES = {"W4A4KV4, R1/R2 fused": "w4a4_kv4_rot+kv+offline", "W4A4KV4, R1/R2 fused + R3/R4 online":
                    "w4a4_kv4_rot+kv+online"}
# --set learned: the same recipe (R1 / R2 fused) with SpinQuant-style learned R1 / R2 on top (as qat-train's
# module.learned_rotations attaches them), R1 applied to the embedding's output and lm_head's input (now), or
# through their weights, E @ R1 and W_head @ R1 over the whole vocabulary at every step (before)
LEARNED_SCHEMES = {"W4A4KV4, R1/R2 fused": "w4a4_kv4_rot+kv+offline",
                   "+ learned R1/R2, embedding/lm_head online": "w4a4_kv4_rot+kv+offline+learned",
                   "+ learned R1/R2, embedding/lm_head weights (before)": "w4a4_kv4_rot+kv+offline+learned_weights"}


def _recipe(name: str, group_size: int | None) -> dict:
    """A recipe by `name` with suffixes: +rot (ROTATIONS), +kv (keep its KV scheme; dropped otherwise),
    +offline / +online (its own rotations limited to R1 / R2, or all of them); +learned / +learned_weights are
    attached by make_variants."""
    base, *flags = name.split("+")
    recipe = qat.load_recipe(base).to_dict()
    if "kv" not in flags:
        recipe["kv_cache"] = None  # weights + activations only
    if "rot" in flags:
        recipe["rotations"] = ROTATIONS
    if "offline" in flags:
        recipe["rotations"] = {k: v for k, v in recipe["rotations"].items() if k not in ("r3", "r4")}
    if group_size and recipe["weight"].get("granularity") == "per_group":
        recipe["weight"]["group_size"] = group_size
    return recipe


def make_variants(base, schemes: dict[str, str], group_size: int | None, ste: str = "lean"):
    variants = {"FP": copy.deepcopy(base).train()}
    modes = {"lean": [True], "unfused": [False], "both": [False, True]}[ste]
    for label, name in schemes.items():
        recipe = _recipe(name, group_size)
        for lean in modes:
            model = qat.prepare(copy.deepcopy(base).train(), recipe)
            flags = name.split("+")
            if "learned" in flags or "learned_weights" in flags:  # AdamW steps them here: the same in both rows
                attach_learned_rotations(model, online_ends="learned" in flags,  # training's start (init auto)
                                         init=resolve_init("auto", model.qat_recipe.rotations))
            qat.set_lean_ste(model, lean)
            variants[f"{label}, {'lean' if lean else 'unfused'} STE"] = model
    return variants


def saved_mb(model, ids) -> float:
    """MB of distinct storages autograd saves for backward in one forward (parameters excluded)."""
    saved = saved_for_backward_bytes(model, lambda: model(input_ids=ids, labels=ids, use_cache=False).loss)
    model.zero_grad(set_to_none=True)
    return saved / 2**20


def step(model, opt, ids) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one training step."""
    start, cpu = time.perf_counter(), time.process_time()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc >= 2.33
        return None
    fn.restype = _MallInfo2
    return fn


MALLINFO2 = _mallinfo2()


def malloc_in_use_mb() -> float | None:
    """MB malloc has handed out and not taken back (main arena + mmapped chunks: where a one-thread torch
    allocates), or None off glibc."""
    if MALLINFO2 is None:
        return None
    info = MALLINFO2()
    return (info.uordblks + info.hblkhd) / 2**20


class PeakRSS:
    """Samples RSS (and malloc's in-use bytes, `alloc_peak`) every millisecond in a thread (torch kernels release
    the GIL): peak growth over a block."""

    def __enter__(self):
        self.base, self.peak, self.done = rss_mb(), 0.0, threading.Event()
        self.alloc_base = malloc_in_use_mb()
        self.alloc_peak = 0.0 if self.alloc_base is not None else None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        self.peak = max(self.peak, rss_mb() - self.base)
        if self.alloc_base is not None:
            self.alloc_peak = max(self.alloc_peak, malloc_in_use_mb() - self.alloc_base)

    def _run(self):
        while not self.done.wait(0.001):
            self._sample()

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self._sample()


def measure_variants(variants: dict, ids: torch.Tensor, steps: int, autocast: torch.dtype | None = None) -> list[dict]:
    """Median step time, peak memory growth and saved-for-backward MB of each variant (each with its own AdamW),
    `steps` timed steps after one warm-up, round robin, relative to "FP". On CUDA the peak is the allocator's
    growth over a step (max_memory_allocated), on CPU the sampled RSS growth and, with glibc, the sampled growth of
    malloc's in-use bytes (`alloc_peak_MB`). `autocast`: run the steps (and
    the saved-bytes count) under torch.autocast in that dtype. Also used by scripts/gpu_check.py."""
    cuda = ids.is_cuda

    def amp():
        return torch.autocast(ids.device.type, dtype=autocast) if autocast else contextlib.nullcontext()

    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, float] = {k: 0.0 for k in variants}
    alloc: dict[str, float] = {k: 0.0 for k in variants}
    for i in range(steps + 1):
        for name, model in variants.items():
            with amp():
                alloc_peak = 0.0
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    dt, dc = step(model, opts[name], ids)
                    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
                else:
                    with PeakRSS() as meter:
                        dt, dc = step(model, opts[name], ids)
                    peak, alloc_peak = meter.peak, meter.alloc_peak or 0.0
            if i > 0:
                times[name].append(dt)
                cpu[name].append(dc)
                peaks[name] = max(peaks[name], peak)
                alloc[name] = max(alloc[name], alloc_peak)
    saved = {}
    for k, m in variants.items():
        with amp():
            saved[k] = saved_mb(m, ids)
    fp_t, fp_c = statistics.median(times["FP"]), statistics.median(cpu["FP"])
    rows = []
    for name in variants:
        t, c = statistics.median(times[name]), statistics.median(cpu[name])
        cpu_cols = {} if cuda else {"cpu_ms": 1000 * c, "cpu_ratio_vs_FP": c / fp_c}
        alloc_cols = {} if cuda or MALLINFO2 is None else {
            "alloc_peak_MB": alloc[name], "alloc_ratio_vs_FP": alloc[name] / max(alloc["FP"], 1e-9)}
        rows.append({"variant": name, "step_ms": 1000 * t, "time_ratio_vs_FP": t / fp_t, **cpu_cols,
                     "tokens_per_s": ids.numel() / t, "step_peak_MB": peaks[name],
                     "mem_ratio_vs_FP": peaks[name] / max(peaks["FP"], 1e-9), **alloc_cols, "saved_MB": saved[name],
                     "saved_ratio_vs_FP": saved[name] / max(saved["FP"], 1e-9)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | smollm2-135m | a local folder")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 1 warm-up)")
    parser.add_argument("--group-size", type=int, default=None, help="override g (SmolLM2: 64; 576 %% 128 != 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--experts", default=None, help="moe: transformers' experts implementation "
                                                        "(eager | batched_mm | grouped_mm; default: transformers')")
    parser.add_argument("--ste", default="lean", choices=["lean", "unfused", "both"],
                        help="straight-through estimator of the QAT variants (qat.set_lean_ste)")
    parser.add_argument("--layers", type=int, default=4, help="tiny: decoder layers")
    parser.add_argument("--hidden", type=int, default=512, help="tiny: hidden size (heads of 64, kv heads 1/4)")
    parser.add_argument("--inter", type=int, default=1536, help="tiny: MLP intermediate size")
    parser.add_argument("--kv-heads", type=int, default=None, help="tiny: key/value heads (default: heads / 2)")
    parser.add_argument("--vocab", type=int, default=8192, help="tiny: vocabulary (small: the step is the layers)")
    parser.add_argument("--set", default="default", choices=["default", "rotations", "learned"],
                        help="variants: W4A16 / W4A8 / W4A8 + rotations, the online rotations side by side, or "
                             "learned R1 / R2 with the embedding / lm_head rotated online or through their weights")
    args = parser.parse_args()
    tiny = dict(num_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.inter,
                num_heads=args.hidden // 64, num_kv_heads=args.kv_heads or max(1, args.hidden // 128), vocab_size=args.vocab)
    schemes = {"default": SCHEMES, "rotations": ROTATION_SCHEMES, "learned": LEARNED_SCHEMES}[args.set]
    if args.model == "moe":  # fused experts take weight-only schemes (their inner activation is not reachable)
        base = tiny_moe("qwen3_moe", num_layers=4, hidden_size=512, expert_size=512, num_experts=8, num_heads=8,
                        num_kv_heads=4, vocab_size=8192, experts_implementation=args.experts).to(args.device)
        schemes = {"W4A16": "w4a16_g128"}  # and no R4: fused experts have no down_proj Linear
    else:
        base = load_model(args.model, **(tiny if args.model == "tiny" else {})).to(args.device)
    group = args.group_size or (64 if base.config.hidden_size % 128 else None)
    variants = make_variants(base, schemes, group, args.ste)
    del base
    ids = torch.randint(0, variants["FP"].config.vocab_size, (args.batch, args.seq), device=args.device)
    rows = measure_variants(variants, ids, args.steps)
    impl = getattr(variants["FP"].config, "_experts_implementation", None) if args.model == "moe" else None
    print(f"model {args.model}, batch {args.batch} x {args.seq} tokens, {args.steps} steps, device {args.device}, "
          f"group size {group or 128}" + (f", experts {impl}" if impl else "")
          + f", {sum(p.numel() for p in variants['FP'].parameters()) / 1e6:.1f}M parameters")
    print(qat.format_table(rows))


if __name__ == "__main__":
    main()
