"""Benchmark the PTQ solvers on one 2048x2048 layer with 128 x 512 calibration tokens.

Inputs are heavy-tailed (Student-t token scales), correlated (a low-rank shared factor) and have a few
dominant channels, like LLM activations. Measured side by side in one run:
  * Hessian accumulation: qat's streaming `InputStats` vs the reference GPTQ running-average update;
  * GPTQ solve: qat's `gptq_quantize` vs a faithful port of the reference `fasterquant`;
  * layer-output error ||X (W^ - W)^T||^2 relative to RTN (min-max, same scheme), plain and act-order;
  * AWQ scale search + clip search time and error relative to RTN.

    .venv/bin/python scripts/bench_ptq.py            # full size
    .venv/bin/python scripts/bench_ptq.py --dim 512 --samples 16   # quick

With --model, instead: end-to-end GPTQ (true-sequential) on a model, the reference path (a full block forward per
stage, method.stage_cache=false) and the staged path back to back on the same calibration data: wall and CPU
seconds of each, their ratio, and whether every quantized weight and qparam is equal (atol=0).

    .venv/bin/python scripts/bench_ptq.py --model smollm2-135m --quant w4a16_g128_ragged --blocks 4
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from qat.primitives import fake_quantize_forward
from qat.ptq import InputStats, gptq_quantize, search_clip, search_scale
from qat.ptq.awq import output_error, rtn_weight
from qat.spec import QuantSpec


def make_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, 32, generator=g) @ torch.randn(32, dim, generator=g)  # correlation
    x = torch.randn(n, dim, generator=g) + 0.7 * factors / math.sqrt(32)
    x *= torch.distributions.StudentT(3.0).sample((n, 1)).abs().clamp(0.1, 20)  # heavy-tailed tokens
    x *= torch.logspace(-0.5, 0.5, dim)[torch.randperm(dim, generator=g)]
    x[:, torch.randperm(dim, generator=g)[: dim // 200 + 1]] *= 20.0  # a few dominant channels
    return x


def reference_hessian(batches, dim):
    """IST-DASLab/gptq add_batch: running average with sqrt(2/n) scaling (on the batches' device)."""
    H, n = torch.zeros(dim, dim, device=batches[0].device), 0
    for inp in batches:
        tmp = inp.shape[0]
        H *= n / (n + tmp)
        n += tmp
        inp = math.sqrt(2 / n) * inp.float()
        H += inp.t() @ inp
    return H


def reference_fasterquant(W, H, bits, groupsize, actorder, blocksize=128, percdamp=0.01):
    """A port of IST-DASLab/gptq fasterquant (symmetric min-max quantizer), for timing and error; runs on W's device."""
    W, H = W.clone().float(), H.clone()
    maxq = 2 ** bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Q = torch.zeros_like(W)
    H[range(len(H)), range(len(H))] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scale = zero = None
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1, device=W.device), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if (i1 + i) % groupsize == 0:
                xmax = W[:, i1 + i:i1 + i + groupsize].abs().amax(1).clamp(min=1e-8)
                scale, zero = 2 * xmax / maxq, torch.full_like(xmax, (maxq + 1) / 2)
            q = scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)
            Q[:, i1 + i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, torch.argsort(perm)]
    return Q


def sync() -> None:
    """Wait for queued CUDA work (timings of asynchronous kernels); nothing without CUDA in use."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn):
    """(fn(), seconds), CUDA work included."""
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def end_to_end(args) -> None:
    """Reference vs staged true-sequential GPTQ on a real model, back to back."""
    from qat.data import calibration_batches
    from qat.models import load_model
    from qat.ptq import ptq_model

    data = {"path": args.data, "tokenizer": args.model, "text_field": "extract", "sample_by": None,
            "val_fraction": 0.02, "test_fraction": 0.02}
    batches = calibration_batches(data, args.samples, args.seqlen, "train", 8)
    states, times = {}, {}
    for cache in (False, True):
        model = load_model(args.model)
        if args.blocks:
            model.model.layers = model.model.layers[:args.blocks]
        wall, cpu = time.perf_counter(), time.process_time()
        ptq_model(model, args.quant, {"name": "gptq", "stage_cache": cache}, batches, progress=False)
        times[cache] = (time.perf_counter() - wall, time.process_time() - cpu)
        states[cache] = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        del model
    equal = states[False].keys() == states[True].keys() and all(torch.equal(v, states[True][k]) for k, v in states[False].items())
    n = args.blocks or "all"
    print(f"{args.model} {args.quant}, {n} blocks, {args.samples}x{args.seqlen} tokens, {torch.get_num_threads()} threads")
    for cache, label in ((False, "reference (stage_cache=false)"), (True, "staged (stage_cache=true)")):
        print(f"{label:32s} wall {times[cache][0]:8.1f} s   cpu {times[cache][1]:8.1f} s")
    print(f"ratio reference / staged: wall {times[False][0] / times[True][0]:.2f}x   cpu {times[False][1] / times[True][1]:.2f}x   "
          f"weights and qparams equal (atol=0): {equal}")


def layer_problem(dim: int, samples: int, seqlen: int, device: str = "cpu", seed: int = 0):
    """(weight [dim, dim], calibration batches of `seqlen` rows) on `device`, drawn on the CPU from `seed`."""
    torch.manual_seed(seed)
    x = make_inputs(samples * seqlen, dim, seed)
    w = torch.randn(dim, dim) / math.sqrt(dim)
    return w.to(device), [b.to(device) for b in x.split(seqlen)]


def compare_solvers(w: torch.Tensor, batches: list[torch.Tensor], bits: int, g: int, awq: bool = True):
    """Time and layer-output error (relative to RTN) of qat's Hessian, GPTQ (plain, act-order) and AWQ searches
    against the reference port, on w's device. Also used by scripts/gpu_check.py.

    Returns:
        ({"qat_s", "reference_s", "max_rel_diff"} of the Hessian, rows {"method", "s", "error_vs_rtn"}).
    """
    dim = w.shape[1]
    spec = QuantSpec(bits=bits, granularity="per_group", group_size=g)

    def ours_hessian():
        st = InputStats(dim, device=w.device, magnitudes=False)  # what GPTQ records
        for b in batches:
            st.update(b)
        return st

    ref_h, t_ref_h = timed(lambda: reference_hessian(batches, dim))
    stats, t_h = timed(ours_hessian)
    H, gram = stats.hessian(), stats.gram
    hessian = {"qat_s": t_h, "reference_s": t_ref_h,
               "max_rel_diff": float((H - ref_h).abs().max() / ref_h.abs().max())}
    err = lambda q: float(output_error(q - w, gram))  # noqa: E731
    e_rtn = err(rtn_weight(w, spec))
    rows = [("rtn (min-max)", 0.0, e_rtn)]
    for act in (False, True):
        tag = " act-order" if act else ""
        res, t = timed(lambda: gptq_quantize(w, H, spec, actorder=act))
        ref_q, t_ref = timed(lambda: reference_fasterquant(w, H, bits, g, act))
        rows += [(f"gptq{tag} (qat)", t, err(res.weight)), (f"gptq{tag} (reference port)", t_ref, err(ref_q))]
    if awq:
        x_mean = torch.cat([b.abs() for b in batches]).mean(0)
        (s, _, _), t_scale = timed(lambda: search_scale([w], [gram], x_mean, [spec]))
        w_s = w * s
        (scale, zp), t_clip = timed(lambda: search_clip(w_s, gram / torch.outer(s, s), spec))
        q_awq = fake_quantize_forward(w_s, scale, zp, spec)[0] / s
        rows += [("awq scale search", t_scale, err(rtn_weight(w_s, spec) / s)),
                 ("awq scale + clip search", t_scale + t_clip, err(q_awq))]
    return hessian, [{"method": n, "s": t, "error_vs_rtn": e / e_rtn} for n, t, e in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--model", default=None, help="end-to-end GPTQ on this model instead (e.g. smollm2-135m)")
    parser.add_argument("--quant", default="w4a16_g128_ragged")
    parser.add_argument("--data", default="wiki")
    parser.add_argument("--blocks", type=int, default=0, help="only the first N decoder blocks (0: all)")
    parser.add_argument("--device", default="cpu", help="the layer benchmark's device (cpu, cuda)")
    args = parser.parse_args()
    if args.model:
        end_to_end(args)
        return
    torch.manual_seed(0)
    dim, g = args.dim, args.group_size
    print(f"layer {dim}x{dim}, {args.samples}x{args.seqlen} tokens, int{args.bits} g{g}, {torch.get_num_threads()} "
          f"threads, {args.device}")
    w, batches = layer_problem(dim, args.samples, args.seqlen, args.device)
    hessian, rows = compare_solvers(w, batches, args.bits, g)
    print(f"hessian  qat {hessian['qat_s']:6.2f} s   reference {hessian['reference_s']:6.2f} s   ratio "
          f"{hessian['qat_s'] / hessian['reference_s']:.2f}x   max rel diff {hessian['max_rel_diff']:.1e}")
    print(f"{'method':28s} {'time s':>8s} {'error / rtn':>12s}")
    for r in rows:
        print(f"{r['method']:28s} {r['s']:8.2f} {r['error_vs_rtn']:12.3f}")

if __name__ == "__main__":
    main()
