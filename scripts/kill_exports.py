"""SIGKILL exports at 30 moments spread over their duration (native and GGUF, with and without overwrite) and check
that the output is always either the previous export (or nothing, for a new output) or the new complete one, and
that the next export to the same output succeeds and leaves no temporaries.

    PYTHONPATH=$PWD python scripts/kill_exports.py --kills 30

Each export runs in a forked child (torch already imported), killed with SIGKILL after its start plus t, with t
spread from 0 to 1.5x the duration of an unkilled forked export.
"""
from __future__ import annotations

import argparse
import collections
import copy
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import qat  # noqa: E402
from qat import testing  # noqa: E402
from qat.export import export, load_any  # noqa: E402
from qat.export.publish import stale_temporaries  # noqa: E402

IDS = torch.arange(32).reshape(2, 16) * 7 % 1024


def _model(seed: int, fmt: str):
    model = testing.tiny_llama(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=4,
                               max_position_embeddings=64, seed=seed)
    return model if fmt == "gguf" else qat.prepare(model, qat.load_recipe("w4a16_g128"))


def _export(model, out: Path, fmt: str, overwrite: bool) -> None:
    if fmt == "gguf":
        export(model, out, "gguf", "Q4_K", overwrite=overwrite)
    else:
        export(model, out, "native", overwrite=overwrite)


def _child(model, out, fmt, overwrite, ready) -> None:
    ready.send(time.time())
    _export(model, out, fmt, overwrite)
    os._exit(0)


def _child_duration(ctx, model, out: Path, fmt: str) -> float:
    """Seconds from a forked export child's start signal to its exit, as the killed children will run."""
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(copy.deepcopy(model), out, fmt, True, writer))
    proc.start()
    start = reader.recv()
    proc.join()
    return time.time() - start


def _signature(out: Path, fmt: str):
    """What lies at `out`: None (nothing), or logits (native; 'broken' if it does not load) / bytes (GGUF) to compare."""
    if not out.exists():
        return None
    if fmt == "gguf":  # the bytes: equal to a reference export (which loads) or not
        return out.read_bytes()
    try:
        with torch.no_grad():
            return load_any(out)(IDS).logits
    except Exception as err:  # noqa: BLE001
        return f"broken: {err}"


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    return type(a) is type(b) and a == b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=30)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    ctx = mp.get_context("fork")
    tmp = Path(tempfile.mkdtemp(prefix="qat-kill-"))
    counts = collections.Counter()
    start_all = time.time()
    for fmt in ("native", "gguf"):
        old, new = _model(0, fmt), _model(1, fmt)
        name = "m.gguf" if fmt == "gguf" else "out"
        refs = {}
        for which, model in (("old", old), ("new", new)):
            _export(model, tmp / "ref" / which / name, fmt, True)
            load_any(tmp / "ref" / which / name)  # the references load
            refs[which] = _signature(tmp / "ref" / which / name, fmt)
        duration = max(_child_duration(ctx, new, tmp / f"timing{k}" / name, fmt) for k in range(2))
        for overwrite in (False, True):
            for i in range(args.kills):
                case = tmp / f"{fmt}-{overwrite}-{i}"
                out = case / name
                case.mkdir(parents=True)
                if overwrite:
                    src = tmp / "ref" / "old" / name
                    (shutil.copytree if src.is_dir() else shutil.copy2)(src, out)
                before = refs["old"] if overwrite else None
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(copy.deepcopy(new), out, fmt, overwrite, writer))
                proc.start()
                reader.recv()
                time.sleep(1.5 * duration * i / max(args.kills - 1, 1))
                os.kill(proc.pid, signal.SIGKILL)
                proc.join()
                after = _signature(out, fmt)
                state = "previous" if _same(after, before) else "new" if _same(after, refs["new"]) else "OTHER"
                _export(new, out, fmt, True)  # the next export succeeds, and cleans what the kill left
                ok_next = _same(_signature(out, fmt), refs["new"]) and not stale_temporaries(out) \
                    and not list(case.glob(".*.qat-lock"))
                counts[(fmt, overwrite, state)] += 1
                counts[(fmt, overwrite, "next export ok" if ok_next else "NEXT EXPORT FAILED")] += 1
                shutil.rmtree(case)
        print(f"{fmt}: one export takes {duration:.2f} s; kills spread over 0..{1.5 * duration:.2f} s")
    print(f"{'format':<8}{'overwrite':<11}{'previous':>10}{'new':>6}{'OTHER':>7}{'next ok':>9}{'next FAILED':>13}")
    bad = 0
    for fmt in ("native", "gguf"):
        for overwrite in (False, True):
            c = {k[2]: v for k, v in counts.items() if k[:2] == (fmt, overwrite)}
            bad += c.get("OTHER", 0) + c.get("NEXT EXPORT FAILED", 0)
            print(f"{fmt:<8}{str(overwrite):<11}{c.get('previous', 0):>10}{c.get('new', 0):>6}{c.get('OTHER', 0):>7}"
                  f"{c.get('next export ok', 0):>9}{c.get('NEXT EXPORT FAILED', 0):>13}")
    print(f"{sum(v for k, v in counts.items() if k[2] in ('previous', 'new', 'OTHER'))} kills in "
          f"{time.time() - start_all:.0f} s ('previous' is nothing for a new output)")
    shutil.rmtree(tmp)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
