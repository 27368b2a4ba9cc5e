"""GGUF encoder speed: qat's torch encoders vs gguf-py's numpy ones on one 4096x4096 fp32 tensor, in one run.

    .venv/bin/python scripts/bench_export.py [--size 4096] [--repeat 5] [--types Q8_0,Q4_K] [--compiled]

For each type: qat's time for the blocks alone (`encode_blocks`, what the GGUF writer stores and what
gguf-py's `quantize` returns) and with the decoded values too (`encode`), gguf-py's time where it can
quantize the type (it cannot quantize the K-quants), the speed-up, whether the blocks are bit-identical,
and llama.cpp's C times quoted in issue #5 (constants, measured on the issue's machine, not here).
Times are the best of --repeat runs, wall clock and process CPU time (CPU time is the steadier of the
two on a shared machine; torch may use several threads, gguf-py uses one).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

# Quoted in issue #5 (the machine, 4096x4096): NOT measured by this script.
GGUF_PY_QUOTED = {"Q8_0": 0.16, "Q4_0": 0.08}
LLAMA_CPP_QUOTED = {"Q4_K": 1.0, "Q6_K": 0.43}
TYPES = "Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K"


def best_of(fn, repeat: int) -> tuple[float, float, object]:
    """(best wall seconds, best CPU seconds, last result) over `repeat` calls."""
    wall = cpu = float("inf")
    out = None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu, out


def gguf_py(w_np: np.ndarray, name: str, repeat: int):
    """(wall, cpu, blocks) of gguf-py's quantize, or None where it cannot quantize `name`."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants as gq

    try:
        gq.quantize(w_np[:1], T[name])
    except NotImplementedError:
        return None
    return best_of(lambda: gq.quantize(w_np, T[name]), repeat)


def row(name: str, w: torch.Tensor, repeat: int) -> str:
    from qat.export.ggml_blocks import encode, encode_blocks

    wall, cpu, blocks = best_of(lambda: encode_blocks(w, name), repeat)
    full, _, _ = best_of(lambda: encode(w, name), max(1, repeat // 2))
    ref = gguf_py(w.numpy(), name, repeat)
    if ref is None:
        theirs = ratio = same = "n/a"
    else:
        theirs = f"{ref[0]:.3f} / {ref[1]:.3f}"
        ratio = f"{ref[0] / wall:.1f}x / {ref[1] / cpu:.1f}x"
        same = str(bool(np.array_equal(blocks.numpy(), ref[2])))
    quoted = LLAMA_CPP_QUOTED.get(name, GGUF_PY_QUOTED.get(name))
    quoted = "" if quoted is None else f"{quoted:.2f} ({'llama.cpp' if name in LLAMA_CPP_QUOTED else 'gguf-py'})"
    return (f"{name:5} {wall:7.3f} / {cpu:6.3f} {full:8.3f}  {theirs:>15}  {ratio:>13}  {same:>9}  {quoted}")


def _legacy_fields(view: torch.Tensor, name: str) -> list[torch.Tensor]:
    """The legacy block's fields (fp16 scale, fp16 minimum, Q5's high bits, packed low nibbles / int8 codes) from
    the grid functions of `qat.formats.ggml`, in a form inductor can fuse: the experiment behind the compiled column
    (not shipped; see docs/export.md, "Speed")."""
    from qat.formats.common import block_range
    from qat.formats.ggml import FORMAT, LEGACY, ggml_spec, ggml_stored_codes

    bits, sym = LEGACY[name]
    spec = ggml_spec(name)
    scale, zero_point = FORMAT.qparams(*block_range(view, FORMAT.peak_range(spec)), spec)
    stored = ggml_stored_codes(view, scale, zero_point, spec)
    fields = [scale.to(torch.float16)] + ([] if sym else [zero_point.to(torch.float16)])
    if bits == 8:
        return fields + [stored]
    u = stored.view(torch.uint8)
    if bits == 5:
        high = ((u >> 4) & 1).to(torch.int32) << torch.arange(32, dtype=torch.int32)
        fields.append(high.sum(-1, dtype=torch.int32))
        u = u & 15
    return fields + [u[:, :16] | (u[:, 16:] << 4)]


def compiled_row(name: str, w: torch.Tensor, repeat: int) -> str:
    """torch.compile of the same grid functions, the block bytes joined in eager, against gguf-py in this run."""
    from qat.export.ggml_blocks import encode_blocks

    fields = torch.compile(_legacy_fields, dynamic=False)
    view = w.reshape(-1, 32)

    def blocks():
        return torch.cat([f.view(torch.uint8).reshape(f.shape[0], -1) for f in fields(view, name)], 1).view(w.shape[0], -1)

    start = time.perf_counter()
    out = blocks()
    compile_s = time.perf_counter() - start
    wall, _, _ = best_of(blocks, repeat)
    ref = gguf_py(w.numpy(), name, repeat)
    same = bool(torch.equal(out, encode_blocks(w, name)))
    return (f"{name:5} compiled {wall:7.4f} s (first call, compiling: {compile_s:5.1f} s)  gguf-py {ref[0]:7.4f} s  "
            f"speed-up {ref[0] / wall:5.1f}x  identical to encode_blocks: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--types", default=TYPES)
    parser.add_argument("--compiled", action="store_true",
                        help="also time torch.compile of the legacy grids (an experiment, not what qat ships)")
    args = parser.parse_args()
    w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"tensor {args.size}x{args.size} fp32, torch threads {torch.get_num_threads()}, best of {args.repeat}; "
          "times in seconds as wall / CPU")
    print(f"{'type':5} {'qat blocks':>16} {'+values':>8}  {'gguf-py':>15}  {'speed-up':>13}  {'identical':>9}  "
          "quoted in issue #5 (not measured here)")
    for name in args.types.split(","):
        print(row(name, w, args.repeat), flush=True)
    if args.compiled:
        from qat.formats.ggml import LEGACY

        for name in [n for n in args.types.split(",") if n in LEGACY]:
            print(compiled_row(name, w, max(args.repeat, 10)), flush=True)


if __name__ == "__main__":
    main()
