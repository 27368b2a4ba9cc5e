"""The GPU check: every measurement and parity check qat owes a CUDA machine, in one run, one table, one JSON.

    python scripts/gpu_check.py                          # CUDA, full sizes (about two minutes on one H200)
    python scripts/gpu_check.py --device cpu --small     # the same checks at tiny sizes on the CPU (smoke test)
    python scripts/gpu_check.py --only parity gptq --json out.json

Checks (each a row; `result` is pass / FAIL for parity checks, `measured` for figures):
  parity <scheme>   bf16 tiny Llama: fake-quantized weights on the device equal the CPU's (atol=0); the
                    converted model's logits equal the fake-quant model's on the device (atol=0); each export
                    format, reloaded and moved to the device, gives the same logits (atol=0; GGUF, whose float
                    tensors are F32 / F16, is not compared with the bf16 model), and the export written from the
                    device equals the one written from the CPU (reloaded logits, atol=0). Figure: the largest
                    |logit| difference device vs CPU (tolerance-based: cuBLAS and the CPU's BLAS sum in other orders).
  fake_quant        one bf16 Linear fwd+bwd: time and saved-for-backward bytes of each fake-quant variant vs plain
                    (scripts/bench_fake_quant.py's variants and loop).
  qat_step          one training step (AdamW, bf16 autocast) of a Llama vs the FP step: time, CUDA peak memory growth
                    and saved bytes, lean and unfused STE (scripts/bench_qat_step.py).
  gptq              a 4096x4096 layer, 128 x 512 calibration tokens: qat's Hessian, GPTQ (plain, act-order) and AWQ
                    searches vs the reference fasterquant port, time and output error vs RTN, on the device
                    (scripts/bench_ptq.py); on CUDA also qat's GPTQ of the same layer on the CPU: codes equal and the
                    error ratio (GPTQ's rounding decisions amplify last-bit differences of H: a bound, not atol=0).
  fsdp              FSDP2 QAT through Lightning on every CUDA device present (1 is fine): ranks agree, a resume
                    from the sharded checkpoint is bit-identical, the export of it equals the one-process export
                    (tests/train/parallel_script.py with deterministic CUDA kernels). Skipped on the CPU (the suite
                    runs it with 2 gloo processes: tests/train/test_parallel.py; --fsdp-on-cpu N runs it here).

Exit status 1 when a parity check fails, 2 for a device this cannot run on (CUDA asked without one) or an unwritable --json. docs/gpu.md has the figures once a GPU has run this.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import qat
from qat.export import export, load_any
from qat.io import atomic_path, check_writable
from qat.modules import FakeQuantLinear
from qat.ptq import InputStats, gptq_quantize
from qat.ptq.awq import output_error
from qat.spec import QuantSpec
from qat.testing import tiny_llama

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "train"))
import bench_fake_quant  # noqa: E402
import bench_ptq  # noqa: E402
import bench_qat_step  # noqa: E402

# sizes: full (one H200, well under 10 minutes in all) and --small (seconds on a CPU)
SIZES = {
    "full": {"llama": dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_layers=2, num_heads=16,
                           num_kv_heads=4, max_position_embeddings=1024), "ids": (4, 256),
             "linear": (4096, 4096, 8192), "iters": 20,
             "step_llama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=4,
                                num_heads=16, num_kv_heads=4, max_position_embeddings=2048), "step_ids": (8, 1024),
             "steps": 5, "gptq": (4096, 128, 512, 128), "gptq_cpu": True},
    "small": {"llama": dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=1), "ids": (2, 16),
              "linear": (128, 128, 64), "iters": 2,
              "step_llama": dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=1),
              "step_ids": (1, 16), "steps": 1, "gptq": (256, 4, 64, 64), "gptq_cpu": False},
}
# parity schemes and the export formats that hold them (GGUF is left out: its writer quantizes a float model itself)
PARITY = {
    "w4a16_g128": ["native", "compressed_tensors"],
    "gptq_w4a16_g128": ["gptq"],
    "w4a8_kv8": ["native"],  # compressed-tensors records the dynamic input scheme; its runtime applies it, qat's reader does not
    "nvfp4_w4a16": ["native"],
    "mxfp4": ["native"],
    "fp8_block": ["native"],
    "gguf_q4_k": ["gguf"],  # GGUF keeps norms and embeddings in F32 / F16: compared device export vs CPU export only
}
GGUF_TYPES = {"gguf_q4_k": "Q4_K"}
CHECKS = ("parity", "fake_quant", "qat_step", "gptq", "fsdp")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recipe_without_kv(name: str) -> dict:
    recipe = qat.load_recipe(name).to_dict()
    recipe["kv_cache"] = None  # weights and activations; the KV-cache quantizers have their own export tests
    return recipe


def bf16_llama(**sizes):
    """The tiny Llama as a bf16 checkpoint loads (transformers builds it in bf16: config.dtype bf16, RoPE's
    inv_freq in fp32), not a float32 model cast with .to(bf16), whose inv_freq would be rounded to bf16 and
    differ from any reloaded export's."""
    config = tiny_llama(**sizes).config
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits


def check_parity(scheme: str, formats: list[str], size: dict, device: torch.device, tmp: Path) -> dict:
    """One parity row: device vs CPU fake-quantized weights, converted and exported vs fake quant on the device."""
    cpu_model = qat.prepare(bf16_llama(**size["llama"]), recipe_without_kv(scheme))
    dev_model = copy.deepcopy(cpu_model).to(device)
    ids = torch.randint(3, size["llama"]["vocab_size"], size["ids"], generator=torch.Generator().manual_seed(0))
    problems, figures = [], {}
    with torch.no_grad():
        for name, m in cpu_model.named_modules():
            if isinstance(m, FakeQuantLinear):
                if not torch.equal(m.quantized_weight(), dev_model.get_submodule(name).quantized_weight().cpu()):
                    problems.append(f"fake-quantized {name}.weight differs from the CPU's")
    fake = logits(dev_model, ids)
    ref = logits(cpu_model, ids).float()
    figures["max|dlogit| device-cpu"] = float((fake.float().cpu() - ref).abs().max())
    figures["max|logit|"] = float(ref.abs().max())
    converted = qat.convert(copy.deepcopy(dev_model))
    if not torch.equal(logits(converted, ids), fake):
        problems.append("converted != fake quant")
    for fmt in formats:
        suffix, kind = (".gguf", {"gguf_type": GGUF_TYPES[scheme]}) if fmt == "gguf" else ("", {})
        out, cpu_out = tmp / f"{scheme}-{fmt}{suffix}", tmp / f"{scheme}-{fmt}-cpu{suffix}"
        export(dev_model, out, format=fmt, **kind)  # from the device: the writers move what they store to the CPU
        export(cpu_model, cpu_out, format=fmt, **kind)
        if not torch.equal(logits(load_any(out), ids), logits(load_any(cpu_out), ids)):
            problems.append(f"{fmt} export from the device != {fmt} export from the CPU (both reloaded on the CPU)")
        if fmt == "gguf":
            continue
        got = logits(load_any(out).to(device), ids)
        if got.dtype != fake.dtype or not torch.equal(got, fake):
            diff = float((got.float() - fake.float()).abs().max())
            problems.append(f"{fmt} export != fake quant ({got.dtype}, max diff {diff:.3g})")
    figures["formats"] = "+".join(formats)
    return {"check": f"parity {scheme}", "result": "FAIL" if problems else "pass", "figures": figures,
            "problems": problems}


def check_fake_quant(size: dict, device: torch.device) -> dict:
    inf, outf, tokens = size["linear"]
    torch.manual_seed(0)
    linear = torch.nn.Linear(inf, outf, device=device, dtype=torch.bfloat16)
    x = torch.randn(tokens, inf, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, outf, device=device, dtype=torch.bfloat16)
    rows = bench_fake_quant.measure(bench_fake_quant.variants(linear), x, grad, size["iters"])
    figures = {r["variant"]: f"{r['ms']:.2f} ms, {r['time_vs_plain']:.2f}x time, {r['saved_vs_plain']:.2f}x saved"
               for r in rows}
    return {"check": f"fake_quant bf16 {inf}x{outf}, {tokens} tokens", "result": "measured", "figures": figures,
            "rows": rows}


def check_qat_step(size: dict, device: torch.device) -> dict:
    base = tiny_llama(**size["step_llama"]).to(device)
    schemes = {k: v for k, v in bench_qat_step.SCHEMES.items() if "rotations" not in k}
    variants = bench_qat_step.make_variants(base, schemes, None, "both")
    del base
    ids = torch.randint(0, size["step_llama"]["vocab_size"], size["step_ids"], device=device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    rows = bench_qat_step.measure_variants(variants, ids, size["steps"], autocast)
    figures = {r["variant"]: f"{r['step_ms']:.1f} ms, {r['time_ratio_vs_FP']:.2f}x time, "
                             f"{r['mem_ratio_vs_FP']:.2f}x peak, {r['saved_ratio_vs_FP']:.2f}x saved" for r in rows}
    n = sum(p.numel() for p in variants["FP"].parameters()) / 1e6
    return {"check": f"qat_step {n:.0f}M params, {ids.shape[0]}x{ids.shape[1]} tokens"
                     + (", bf16 autocast" if autocast else ""), "result": "measured", "figures": figures, "rows": rows}


def check_gptq(size: dict, device: torch.device) -> dict:
    dim, samples, seqlen, g = size["gptq"]
    w, batches = bench_ptq.layer_problem(dim, samples, seqlen, str(device))
    hessian, rows = bench_ptq.compare_solvers(w, batches, 4, g)
    figures = {"hessian": f"qat {hessian['qat_s']:.3f} s, reference {hessian['reference_s']:.3f} s"}
    figures.update({r["method"]: f"{r['s']:.3f} s, error {r['error_vs_rtn']:.3f}x RTN" for r in rows})
    qat_s = {r["method"]: r["s"] for r in rows}
    figures["gptq time qat / reference"] = f"{qat_s['gptq (qat)'] / qat_s['gptq (reference port)']:.2f}x"
    out = {"check": f"gptq {dim}x{dim}, {samples}x{seqlen} tokens, int4 g{g}", "result": "measured",
           "figures": figures, "rows": rows, "hessian": hessian}
    if size["gptq_cpu"] and device.type != "cpu":
        out["cpu"] = gptq_device_vs_cpu(w, batches, QuantSpec(bits=4, granularity="per_group", group_size=g))
        figures["same layer on the CPU"] = (f"{out['cpu']['cpu_s']:.2f} s vs {out['cpu']['device_s']:.2f} s; codes "
                                            f"equal {100 * out['cpu']['codes_equal']:.2f}%, error ratio "
                                            f"{out['cpu']['error_ratio']:.4f}")
    return out


def gptq_device_vs_cpu(w: torch.Tensor, batches: list[torch.Tensor], spec: QuantSpec) -> dict:
    """qat's GPTQ of one layer on w's device and on the CPU: times, share of equal quantized values, and the
    device's layer-output error over the CPU's (the Hessian of each comes from its own device's Gram GEMMs)."""
    results = {}
    for where in (w.device, torch.device("cpu")):
        stats = InputStats(w.shape[1], device=where, magnitudes=False)
        for b in batches:
            stats.update(b.to(where))
        (res, secs) = bench_ptq.timed(lambda: gptq_quantize(w.to(where), stats.hessian(), spec))
        results[where.type] = (res.weight.cpu(), secs, stats.gram.cpu())
    (qd, td, _), (qc, tc, gram) = results[w.device.type], results["cpu"]
    wc = w.cpu()
    err = lambda q: float(output_error(q - wc, gram))  # noqa: E731
    return {"device_s": td, "cpu_s": tc, "codes_equal": float((qd == qc).float().mean()),
            "error_ratio": err(qd) / err(qc)}


def check_fsdp(accelerator: str, n: int, tmp: Path) -> dict:
    """FSDP2 QAT on `n` devices ("cuda": every GPU; "cpu": gloo processes): tests/train/parallel_script.py, then
    the suite's comparisons."""
    import parallel_script  # tests/train: the suite's 2-process run, parametrised by device

    where = f"{n} GPU(s)" if accelerator == "cuda" else f"{n} CPU processes"
    env = {**os.environ, "PL_DISABLE_FORK": "1", "QAT_PARALLEL_ACCELERATOR": accelerator, "QAT_PARALLEL_DEVICES": str(n),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, parallel_script.__file__, "fsdp", str(tmp)], capture_output=True,
                          text=True, timeout=420, cwd=tmp, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"check": f"fsdp {where}", "result": "FAIL", "figures": {"wall_s": round(wall, 1)},
                "problems": [f"parallel_script exited {proc.returncode}: {proc.stderr[-1500:]}"]}
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(n)]
    problems = []
    for r in range(1, n):
        problems += [f"rank {r} differs at {k}" for k in parallel_script.differing(ranks[0]["straight"],
                                                                                   ranks[r]["straight"])[:3]]
    problems += [f"resumed != straight at {k}" for k in parallel_script.differing(ranks[0]["straight"],
                                                                                  ranks[0]["resumed"])[:3]]
    final = tmp / "straight" / "steps" / f"epoch=0-step={parallel_script.STEPS}.ckpt"
    torch.save(ranks[0]["straight"], tmp / "gathered.pt")
    if not torch.equal(parallel_script.export_logits(final, tmp / "from_ckpt"),
                       parallel_script.export_logits(tmp / "gathered.pt", tmp / "single")):
        problems.append("export of the sharded checkpoint != one-process export of the same weights")
    figures = {"devices": n, "wall_s (2 fits, 6 steps, incl. start-up)": round(wall, 1),
               "learned scales sharded": len(ranks[0]["_sharded"])}
    return {"check": f"fsdp {where}, tiny Llama LSQ + PACT", "result": "FAIL" if problems else "pass",
            "figures": figures, "problems": problems}


def run_checks(args) -> list[dict]:
    size = SIZES["small" if args.small else "full"]
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qat-gpu-check-") as tmp:
        tmp = Path(tmp)
        jobs = []
        if "parity" in args.only:
            jobs += [(f"parity {s}", lambda s=s, f=f: check_parity(s, f, size, device, tmp)) for s, f in PARITY.items()]
        if "fake_quant" in args.only:
            jobs.append(("fake_quant", lambda: check_fake_quant(size, device)))
        if "qat_step" in args.only:
            jobs.append(("qat_step", lambda: check_qat_step(size, device)))
        if "gptq" in args.only:
            jobs.append(("gptq", lambda: check_gptq(size, device)))
        if "fsdp" in args.only:
            (tmp / "fsdp").mkdir()
            if device.type == "cuda":
                jobs.append(("fsdp", lambda: check_fsdp("cuda", torch.cuda.device_count(), tmp / "fsdp")))
            elif args.fsdp_on_cpu:
                jobs.append(("fsdp", lambda: check_fsdp("cpu", args.fsdp_on_cpu, tmp / "fsdp")))
            else:
                rows.append({"check": "fsdp", "result": "skipped", "figures": {
                    "why": "needs CUDA (--fsdp-on-cpu N: gloo processes); the CPU suite runs it with 2 "
                           "(tests/train/test_parallel.py)"}})
        for name, job in jobs:
            start = time.perf_counter()
            try:
                row = job()
            except Exception as err:  # noqa: BLE001 - one check's crash is its row, the others still run
                row = {"check": name, "result": "FAIL", "figures": {},
                       "problems": [f"{type(err).__name__}: {err}", traceback.format_exc()[-2000:]]}
            sync(device)
            row["seconds"] = round(time.perf_counter() - start, 2)
            rows.append(row)
            print(f"[{row['seconds']:7.1f} s] {row['check']}: {row['result']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(device), gpus=torch.cuda.device_count(),
                   gpu_memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1))
    return env


def table(rows: list[dict]) -> str:
    """check | result | seconds | figures (one line per figure)."""
    flat = []
    for r in rows:
        figs = [f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in r.get("figures", {}).items()]
        figs += [f"PROBLEM: {p.splitlines()[0]}" for p in r.get("problems", [])[:4]]
        for i, fig in enumerate(figs or [""]):
            flat.append({"check": r["check"] if i == 0 else "", "result": r["result"] if i == 0 else "",
                         "s": f"{r.get('seconds', 0):.1f}" if i == 0 else "", "figures": fig})
    return qat.format_table(flat)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--small", action="store_true", help="tiny sizes (a smoke test of the script, seconds)")
    parser.add_argument("--only", nargs="+", default=list(CHECKS), choices=CHECKS, help="run only these checks")
    parser.add_argument("--json", default="gpu_check.json", help="where to write the figures")
    parser.add_argument("--fsdp-on-cpu", type=int, default=0, metavar="N",
                        help="without CUDA, run the fsdp check with N gloo processes (about a minute)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        print(f"gpu_check: --device {args.device}: not a device this check runs on; use cuda, cuda:N or cpu",
              file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: --device {args.device} but torch.cuda.is_available() is False; run with --device cpu "
              "--small for the smoke test", file=sys.stderr)
        return 2
    try:  # before any check runs: a full GPU run must not be lost to an unwritable --json
        check_writable(args.json)
    except ValueError as err:
        print(f"gpu_check: --json: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = run_checks(args)
    result = {"environment": environment(device), "small": args.small, "wall_s": round(time.perf_counter() - start, 1),
              "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "checks": rows}
    print(f"\n{json.dumps(result['environment'])}, {result['wall_s']} s\n{table(rows)}\nfigures: {args.json}")
    with atomic_path(args.json) as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=str))
    failed = [r["check"] for r in rows if r["result"] == "FAIL"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
