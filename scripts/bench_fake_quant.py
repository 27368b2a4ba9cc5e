"""Forward+backward time and memory of one Linear: plain vs fake-quant W4A16 (g128) vs W4A8, and the 4-bit float
formats MXFP4 / NVFP4 as W4A16 and W4A4 (dynamic per-block activations; NVFP4 also with the recipe nvfp4_w4a4's
static global, calibrated on one batch and then held).

Measured side by side in one run, variants interleaved round-robin so that machine noise hits all alike.
Memory is what autograd saves for backward (deterministic on CPU; on CUDA the peak allocation is printed
too). Where torchao is importable, its QAT fake quantizers (int4 / int8, and the NVFP4 / MXFP4 prototypes) run on
the same problem as peers; each one that is not is named ("not importable").

    .venv/bin/python scripts/bench_fake_quant.py [--in 2048 --out 2048 --tokens 4096 --iters 10]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from qat.modules import FakeQuantLinear
from qat.spec import QuantSpec, TensorSchemes

W4 = QuantSpec(bits=4, granularity="per_group", group_size=128)
A8 = QuantSpec(bits=8, granularity="per_token", dynamic=True)
FP4 = {name: QuantSpec(bits=4, dtype="fp4_e2m1", granularity="per_group", group_size=g, grid=grid)
       for name, g, grid in (("MXFP4", 32, "mx"), ("NVFP4", 16, "nvfp4"))}


def variants(linear: nn.Linear) -> dict[str, nn.Module]:
    out = {
        "plain": linear,
        "qat W4A16 g128": FakeQuantLinear.from_float(linear, TensorSchemes(weight=W4)),
        "qat W4A8": FakeQuantLinear.from_float(linear, TensorSchemes(weight=W4, input=A8)),
    }
    for name, spec in FP4.items():
        out[f"qat {name} W4A16"] = FakeQuantLinear.from_float(linear, TensorSchemes(weight=spec))
        out[f"qat {name} W4A4"] = FakeQuantLinear.from_float(
            linear, TensorSchemes(weight=spec, input=spec.replace(dynamic=True)))
    static = FakeQuantLinear.from_float(linear, TensorSchemes(weight=FP4["NVFP4"],
                                                              input=FP4["NVFP4"].replace(static_global=True)))
    with torch.no_grad():  # calibrate the global on one batch, then hold it (as after calibration / freezing in QAT)
        static(torch.randn(64, linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype))
    static.input_quantizer.observing = False
    out["qat NVFP4 W4A4 static-global"] = static
    out.update(torchao_peers(linear))
    return out


def torchao_peers(linear: nn.Linear) -> dict[str, nn.Module]:
    """torchao's QAT fake quantizers on the same Linear, where importable (torchao is not a qat dependency):
    int4 / int8 (torchao.quantization.qat) and the NVFP4 / MX (MXFP4) prototypes (torchao.prototype.qat, W4A4
    only: torchao 0.18 refuses weight-only NVFP4 / MX QAT). MX runs with the OCP FLOOR scale (qat's rule: its
    dequantized weights equal qat's MXFP4 fake quant bit for bit) and emulated matmuls. Each peer is built and
    run once on a few tokens; one that cannot be is named with the reason, not silently dropped."""
    peers: dict[str, nn.Module] = {}

    def add(name, build):
        try:
            module = build()
            module(torch.randn(4, linear.in_features, device=linear.weight.device,
                               dtype=linear.weight.dtype)).sum().backward()
            peers[name] = module
        except Exception as err:  # noqa: BLE001 - any import/API mismatch (or no kernel on this device) drops the peer
            print(f"(torchao {name}: not importable / not runnable here: {type(err).__name__}: {str(err).splitlines()[0][:160]})")

    def intx(act: bool):
        from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig

        w_cfg = IntxFakeQuantizeConfig(torch.int4, group_size=128, is_symmetric=True)
        a_cfg = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False) if act else None
        return FakeQuantizedLinear.from_linear(linear, activation_config=a_cfg, weight_config=w_cfg)

    def fp4(kind: str):
        from torchao.prototype import qat as proto

        if kind == "NVFP4":
            cfg = proto.NVFP4FakeQuantizeConfig()
            return proto.NVFP4FakeQuantizedLinear.from_linear(linear, activation_config=cfg, weight_config=cfg)
        from torchao.prototype.mx_formats.config import ScaleCalculationMode

        cfg = proto.MXFakeQuantizeConfig(torch.float4_e2m1fn_x2, 32, ScaleCalculationMode.FLOOR)
        return proto.MXFakeQuantizedLinear.from_linear(linear, activation_config=cfg, weight_config=cfg)

    add("W4A16 g128", lambda: intx(False))
    add("W4A8", lambda: intx(True))
    for kind in FP4:
        add(f"{kind} W4A4", lambda k=kind: fp4(k))
        print(f"(torchao {kind} W4A16: no peer; torchao's {kind} QAT linear needs an activation config)")
    return {f"torchao {k}": v for k, v in peers.items()}


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward (parameters excluded: they are held anyway)."""
    params = {p.data_ptr() for p in module.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return total


def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    module(x).backward(grad)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(mods: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, iters: int) -> list[dict]:
    """Median fwd+bwd time and saved-for-backward bytes of each variant (2 warm-up rounds, then `iters` rounds
    round-robin), relative to "plain". Also used by scripts/gpu_check.py."""
    times: dict[str, list[float]] = {k: [] for k in mods}
    for _ in range(2):  # warm-up
        for m in mods.values():
            step(m, x, grad)
    for _ in range(iters):
        for name, m in mods.items():
            times[name].append(step(m, x, grad))
    base_t = statistics.median(times["plain"])
    base_m = saved_bytes(mods["plain"], x)
    rows = []
    for name, m in mods.items():
        t, mem = statistics.median(times[name]), saved_bytes(m, x)
        rows.append({"variant": name, "ms": t * 1e3, "time_vs_plain": t / base_t, "saved_MiB": mem / 2**20,
                     "saved_vs_plain": mem / base_m})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="inf", type=int, default=2048)
    parser.add_argument("--out", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=8 * 512)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", default=None,
                        help="keep only the variants whose name contains one of these words (plain is always kept)")
    args = parser.parse_args()
    torch.manual_seed(0)
    linear = nn.Linear(args.inf, args.out, device=args.device)
    x = torch.randn(args.tokens, args.inf, device=args.device, requires_grad=True)
    grad = torch.randn(args.tokens, args.out, device=args.device)
    mods = variants(linear)
    if args.only:
        mods = {k: m for k, m in mods.items() if k == "plain" or any(w in k for w in args.only)}
    rows = measure(mods, x, grad, args.iters)
    print(f"Linear {args.inf}x{args.out}, {args.tokens} tokens, fwd+bwd, {args.device}, median of {args.iters}")
    print("| variant | time (ms) | vs plain | saved for backward (MiB) | vs plain |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['ms']:.1f} | {r['time_vs_plain']:.3f}x | {r['saved_MiB']:.1f} | "
              f"{r['saved_vs_plain']:.3f}x |")
    if args.device.startswith("cuda"):
        print(f"CUDA peak allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
