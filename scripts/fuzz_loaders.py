"""Fuzz every loader: >= 2,000 corrupted exports (GGUF, native, compressed-tensors, GPTQ) of a tiny model, each
loaded in a worker subprocess under a memory cap (RLIMIT_AS) and a timeout. Counts hangs, crashes, silent wrong
loads (loads, logits differ, no error) and unexpected exception types; the target is 0 of each.

    PYTHONPATH=$PWD python scripts/fuzz_loaders.py --cases 2000 --mem-gb 4 --timeout 60

Two workers, each reused for many files (importing torch per file is slow); a worker that hangs or dies is
replaced. The mutations are tests/export/fuzz.py's.
"""
from __future__ import annotations

import argparse
import collections
import logging
import multiprocessing as mp
import queue
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _worker(conn, mem_gb: float, reference_file: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (int(mem_gb * (1 << 30)),) * 2)
    logging.disable(logging.WARNING)
    import torch

    from tests.export import fuzz
    torch.set_num_threads(1)
    reference = torch.load(reference_file, weights_only=True)  # our own dict of tensors; never unpickle
    while True:
        task = conn.recv()
        if task is None:
            return
        fmt, path = task
        try:
            conn.send(fuzz.outcome(Path(path), reference[fmt]))
        except MemoryError:
            conn.send("crash MemoryError")


class Worker:
    def __init__(self, ctx, mem_gb, reference_file):
        self.ctx, self.args = ctx, (mem_gb, reference_file)
        self.start()

    def start(self):
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, *self.args), daemon=True)
        self.proc.start()

    def run(self, task, timeout):
        self.conn.send(task)
        if not self.conn.poll(timeout):
            self.proc.kill()
            self.proc.join()
            self.start()
            return "hang"
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join()
            code = self.proc.exitcode
            self.start()
            return f"crash exit {code}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=2000, help="corrupted files in all (split over the formats)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mem-gb", type=float, default=4.0)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the corrupted files (else only the offending ones)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    import torch

    from tests.export import fuzz
    start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="qat-fuzz-"))
    paths = fuzz.make_exports(tmp / "src")
    torch.save(fuzz.reference_logits(paths), tmp / "reference.pt")
    rng = fuzz.seeded(args.seed)
    tasks = queue.Queue()
    for i in range(args.cases):
        fmt = fuzz.FORMATS[i % len(fuzz.FORMATS)]
        kinds = fuzz.kinds(fmt)
        kind = kinds[(i // len(fuzz.FORMATS)) % len(kinds)]
        dst = tmp / "cases" / str(i) / ("m.gguf" if fmt == "gguf" else "x")
        dst.parent.mkdir(parents=True)
        fuzz.mutate(fmt, kind, paths[fmt], dst, rng)
        tasks.put((fmt, kind, str(dst)))
    made = time.time() - start
    ctx = mp.get_context("spawn")
    counts, examples, lock = collections.Counter(), {}, threading.Lock()

    def drain():
        worker = Worker(ctx, args.mem_gb, str(tmp / "reference.pt"))
        while True:
            try:
                fmt, kind, path = tasks.get_nowait()
            except queue.Empty:
                break
            result = worker.run((fmt, path), args.timeout)
            head = result.split(":")[0]
            cls = head if head in ("refused", "identical", "SILENT", "hang") else head.split()[0]
            with lock:
                counts[(fmt, kind, cls)] += 1
                examples.setdefault((fmt, kind, cls), f"{path}: {result[:300]}")
        worker.conn.send(None)
        worker.proc.join(5)

    threads = [threading.Thread(target=drain) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    classes = ["refused", "identical", "SILENT", "unexpected", "hang", "crash"]
    print(f"{'format':<20}{'mutation':<15}" + "".join(f"{c:>11}" for c in classes))
    totals = collections.Counter()
    for fmt in fuzz.FORMATS:
        for kind in fuzz.kinds(fmt):
            row = [counts[(fmt, kind, c)] for c in classes]
            totals.update(dict(zip(classes, row)))
            print(f"{fmt:<20}{kind:<15}" + "".join(f"{n:>11}" for n in row))
    print(f"{'total':<35}" + "".join(f"{totals[c]:>11}" for c in classes))
    bad = {k: v for k, v in examples.items() if k[2] not in ("refused", "identical")}
    for k, v in list(bad.items())[:20]:
        print("example", k, v)
    if not args.keep:  # keep the source exports and the offending cases only
        kept = {Path(v.split(": ")[0]).parent for v in bad.values()}
        for case in (tmp / "cases").iterdir():
            if case not in kept:
                shutil.rmtree(case)
    print(f"{args.cases} files, made in {made:.0f} s, loaded in {time.time() - start - made:.0f} s "
          f"({args.workers} workers, RLIMIT_AS {args.mem_gb} GiB, timeout {args.timeout} s); kept under {tmp}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
