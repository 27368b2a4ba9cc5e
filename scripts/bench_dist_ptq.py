"""Distributed PTQ (`qat.ptq.distributed`, GPTQ or AWQ): 1 process vs N processes on the same calibration data,
back to back.

Prints each run's PTQ wall time (from a barrier after loading to the end of `qat.ptq.apply`, the slowest rank's),
the CPU seconds of all its processes together, the wall ratio and whether every tensor of the state dict is
equal (atol=0) to the one-process run's. Every process runs single-threaded (torch.set_num_threads(1)).

    .venv/bin/python scripts/bench_dist_ptq.py --model smollm2-135m --blocks 4 --processes 2 [--method awq]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from qat.data import calibration_batches
from qat.models import load_model
from qat.ptq import ptq_model
from qat.ptq.distributed import launch, process_rank


def quantize(model_name: str, blocks: int, quant: str, batches: list, distributed: bool, out: str,
             method: str = "gptq") -> dict:
    """One rank: load, truncate to `blocks`, run `method`; rank r writes its timings (and rank 0 the state) under `out`."""
    torch.set_num_threads(1)
    model = load_model(model_name)
    if blocks:
        model.model.layers = model.model.layers[:blocks]
    if distributed:
        dist.barrier()  # every rank loaded: time the PTQ only
    wall, cpu = time.perf_counter(), time.process_time()
    ptq_model(model, quant, {"name": method}, batches, progress=False, distributed=distributed)
    times = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    rank = process_rank()
    Path(out, f"times-{int(distributed)}-{rank}.json").write_text(json.dumps(times))
    if rank == 0:
        torch.save({k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
                   Path(out, f"state-{int(distributed)}.pt"))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quant", default="w4a16_g128_ragged")
    parser.add_argument("--blocks", type=int, default=4, help="only the first N decoder blocks (0: all)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--method", default="gptq", choices=["gptq", "awq"])
    parser.add_argument("--out", default="/tmp/bench_dist_ptq")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    data = {"path": "wiki", "tokenizer": args.model, "text_field": "extract", "sample_by": None,
            "val_fraction": 0.02, "test_fraction": 0.02}
    batches = calibration_batches(data, args.samples, args.seqlen, "train", 8)
    rows = {}
    for n in (1, args.processes):
        start = time.perf_counter()
        launch(quantize, n, args.model, args.blocks, args.quant, batches, n > 1, args.out, args.method)
        total = time.perf_counter() - start
        ranks = [json.loads(Path(args.out, f"times-{int(n > 1)}-{r}.json").read_text()) for r in range(n)]
        rows[n] = (max(t["wall"] for t in ranks), sum(t["cpu"] for t in ranks), total)
    one, many = (torch.load(Path(args.out, f"state-{i}.pt"), weights_only=True) for i in (0, 1))
    equal = one.keys() == many.keys() and all(torch.equal(v, many[k]) for k, v in one.items())
    print(f"{args.method}, {args.model} {args.quant}, {args.blocks or 'all'} blocks, {args.samples}x{args.seqlen} tokens "
          f"({len(batches)} batches), 1 thread per process")
    for n, (wall, cpu, total) in rows.items():
        print(f"{n} process(es): PTQ wall {wall:7.1f} s   cpu (all processes) {cpu:7.1f} s   "
              f"with loading and spawning {total:7.1f} s")
    print(f"wall ratio 1 / {args.processes} processes: {rows[1][0] / rows[args.processes][0]:.2f}x; "
          f"state dicts equal (atol=0): {equal} ({len(one)} tensors)")


if __name__ == "__main__":
    main()
