"""GPTQ under a memory cap: out-of-core (`qat.ptq.stream`) vs in memory, and whether their results are equal.

The calibration batches are built first; then the process's private writable memory (RLIMIT_DATA: heap and
anonymous mappings, what torch allocates tensors in; file mappings and shared libraries are not counted, unlike
RLIMIT_AS, which torch's large virtual reservations make useless) is capped at what it holds now plus --cap-mb.
A cap below the model's float size cannot hold its weights: the in-memory run fails, the streamed one must not.
glibc's malloc is told to map every allocation of 64 KiB or more on its own (M_MMAP_THRESHOLD, fixed): freed
tensors then leave the private memory at once, instead of staying in a heap that only grows (with the default,
dynamic threshold the heap kept freed blocks' memory, and a run under +480 MiB failed at block 6 of 30).

    .venv/bin/python scripts/ptq_memory_cap.py --mode stream --cap-mb 400 --out /tmp/cap
    .venv/bin/python scripts/ptq_memory_cap.py --mode memory --cap-mb 400 --out /tmp/cap   # fails: cannot allocate
    .venv/bin/python scripts/ptq_memory_cap.py --compare /tmp/cap/model_parts outputs/ptq/run/model.pt
"""
from __future__ import annotations

import argparse
import ctypes
import resource
import time
from pathlib import Path

import torch

from qat.data import calibration_batches
from qat.models import check_model_source, load_model
from qat.ptq import ptq_model
from qat.ptq.stream import load_parts, stream_ptq


def status_mb(key: str) -> float:
    """A /proc/self/status field (VmRSS, VmData, VmHWM) in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def compare(parts: str, reference: str) -> None:
    """Every tensor of a streamed state equal (atol=0) to a qat-ptq model.pt; the parts written so far when the
    run has no index.json yet."""
    folder = Path(parts)
    if (folder / "index.json").is_file():
        a = load_parts(folder)
    else:
        a = {}
        for part in sorted(folder.glob("part-*.pt")):
            a.update(torch.load(part, weights_only=True))
    b = torch.load(reference, weights_only=True)
    tensors = [k for k, v in b.items() if isinstance(v, torch.Tensor) and k in a]
    bad = [k for k in tensors if not torch.equal(a[k], b[k])]
    print(f"{len(tensors)} tensors compared ({len(b) - len(tensors)} of the reference not streamed yet or not "
          f"tensors); different: {len(bad)} {bad[:5]}")


def map_large_allocations(threshold: int = 64 * 1024) -> None:
    """glibc mallopt(M_MMAP_THRESHOLD, threshold): allocations from `threshold` bytes up are mmapped and returned
    to the system when freed (a fixed threshold; the default one rises after a large free)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except OSError:  # not glibc: the cap still works, with more slack needed
        pass


def main() -> None:
    map_large_allocations()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["stream", "memory"], default="stream")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quant", default="w4a16_g128_ragged")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--cap-mb", type=float, default=400.0, help="memory the PTQ may add (RLIMIT_DATA)")
    parser.add_argument("--stage-cache-mb", type=float, default=0.0, help="method.stage_cache_mb")
    parser.add_argument("--out", default="/tmp/ptq_cap")
    parser.add_argument("--compare", nargs=2, metavar=("PARTS", "MODEL_PT"), help="only compare two results")
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    data = {"path": "wiki", "tokenizer": args.model, "text_field": "extract", "sample_by": None,
            "val_fraction": 0.02, "test_fraction": 0.02}
    batches = calibration_batches(data, args.samples, args.seqlen, "train", 8)
    source = check_model_source(args.model)
    float_mb = sum(f.stat().st_size for f in Path(source).glob("*.safetensors")) / 2 ** 20
    base_data, base_rss = status_mb("VmData"), status_mb("VmRSS")
    limit = int((base_data + args.cap_mb) * 2 ** 20)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    with open("/proc/self/clear_refs", "w") as f:  # restart the peak RSS (VmHWM): tokenizing is not PTQ
        f.write("5")
    print(f"{args.mode}: float weights {float_mb:.0f} MiB; cap: private memory {base_data:.0f} + {args.cap_mb:.0f} MiB "
          f"(RLIMIT_DATA); RSS before {base_rss:.0f} MiB", flush=True)
    method = {"name": "gptq", "stage_cache_mb": args.stage_cache_mb}
    start, cpu = time.perf_counter(), time.process_time()
    out = Path(args.out)
    try:
        if args.mode == "stream":
            stream_ptq(source, args.quant, method, batches, out / "model_parts", progress=False)
        else:
            model = ptq_model(load_model(source), args.quant, method, batches, progress=False)
            out.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), out / "model.pt")
        outcome = "done"
    except (RuntimeError, MemoryError) as err:
        outcome = f"failed: {type(err).__name__} {(str(err).splitlines() or [''])[0][:120]}"
    peak = status_mb("VmHWM")
    print(f"{args.mode}: {outcome}; wall {time.perf_counter() - start:.0f} s, cpu {time.process_time() - cpu:.0f} s; "
          f"peak RSS {peak:.0f} MiB (+{peak - base_rss:.0f} over the {base_rss:.0f} before PTQ; float weights "
          f"{float_mb:.0f} MiB)")


if __name__ == "__main__":
    main()
