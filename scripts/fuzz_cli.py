"""Run every bad command line of tests/cli/bad_inputs.py (and a few more) through the real console scripts, one
subprocess each, and print a table: app, input, exit code, traceback yes/no, the message's first line; then the
counts (total, tracebacks, exit 0 on bad input, message not naming the problem, Hydra's HYDRA_FULL_ERROR advice).

    python scripts/fuzz_cli.py                 # every case (a few seconds each: torch + transformers import)
    python scripts/fuzz_cli.py -j 2 --only demo export
    python scripts/fuzz_cli.py -j 2 --every 4       # a quarter of the cases
    python scripts/fuzz_cli.py --debug         # with QAT_DEBUG=1: every case must show a traceback instead

Exit status 1 when a case printed a traceback or Hydra's advice, exited 0, or did not name its problem.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cli.bad_inputs import APPS, CASES, EV, EXP, HYDRA_CASES, argv_for, make_files  # noqa: E402

# beyond the in-process list: inputs whose handling lives in the loaders (qat/export), multiruns, odd shapes
EXTRA = [
    ("eval", EV + ["model.path={tmp}/garbage.gguf"], "garbage.gguf"),
    ("export", EXP[:1] + ["output={tmp}/x.gguf", "format=gguf", "model.path={tmp}/garbage.gguf"], "garbage.gguf"),
    ("eval", EV + ["model.path={tmp}/notes.txt"], "notes.txt"),
    ("train", ["-m", "trainer.max_steps=1", "quant=w4a16_g128,nope"], "nope"),
    ("ptq", ["-m", "method=rtn,nope"], "nope"),
    ("ptq", ["data.path={tmp}/notes dir/missing.txt"], "missing.txt"),
    ("demo", ["tiny=5"], "tiny"),
    ("demo", ["quant=null"], "quant"),
    ("export", EXP + ["calibration.samples=0", "imatrix=calibrate", "data=fixture"], "samples"),
    ("compare", ["methods=[rtn]", "quants=[]"], "quants"),
]


def _command(app: str) -> list[str]:
    script = shutil.which(APPS[app], path=str(Path(sys.executable).parent)) or shutil.which(APPS[app])
    return [script] if script else [sys.executable, "-m", f"qat.cli.{app}"]


def run_case(app: str, argv: list[str], expected: str, tmp: Path, env: dict) -> dict:
    """One case in a subprocess: its exit code, whether a traceback was printed, the message's first line."""
    start = time.perf_counter()
    proc = subprocess.run(_command(app) + argv_for(argv, tmp, app), capture_output=True, text=True, env=env,
                          timeout=600)
    out = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("[")] or out.splitlines() or [""]
    first = next((ln for ln in lines if ln.startswith(f"{APPS[app]}: error")), lines[0])
    return {"app": APPS[app], "input": " ".join(argv), "exit": proc.returncode, "traceback": "Traceback" in out,
            "boilerplate": "HYDRA_FULL_ERROR" in out,
            "named": expected.lower() in out.lower(), "message": first.strip()[:110],
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-j", "--jobs", type=int, default=1, help="cases run at once")
    parser.add_argument("--only", nargs="+", choices=sorted(APPS), help="only these apps")
    parser.add_argument("--debug", action="store_true", help="set QAT_DEBUG=1: expect a traceback every time")
    parser.add_argument("--every", type=int, default=1, help="run every n-th case only (a quicker sample)")
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("QAT_DEBUG", None)
    if args.debug:
        env["QAT_DEBUG"] = "1"
    cases = [c for c in CASES + HYDRA_CASES + EXTRA if not args.only or c[0] in args.only][::max(1, args.every)]
    start = time.perf_counter()
    print(f"{'app':12s} {'exit':>4s} {'tb':3s} {'named':5s} {'input':60s} message", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(tmp)
        (files / "notes dir").mkdir()
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # rows print as they finish: a killed run keeps them
            rows = []
            for r in pool.map(lambda c: run_case(*c, files, env), cases):
                rows.append(r)
                print(f"{r['app']:12s} {r['exit']:4d} {'yes' if r['traceback'] else 'no':3s} "
                      f"{'yes' if r['named'] else 'NO':5s} {r['input'][:60]:60s} {r['message']}", flush=True)
    tracebacks = sum(r["traceback"] for r in rows)
    exit0 = sum(r["exit"] == 0 for r in rows)
    unnamed = sum(not r["named"] for r in rows)
    boilerplate = sum(r["boilerplate"] for r in rows)
    print(f"\ntotal {len(rows)} | tracebacks {tracebacks} | exit 0 on bad input {exit0} | message not naming the "
          f"problem {unnamed} | Hydra's HYDRA_FULL_ERROR advice {boilerplate} | {time.perf_counter() - start:.0f} s")
    if args.debug:
        return 0 if tracebacks == len(rows) - sum(r["app"] == "qat-assets" for r in rows) else 1
    return 1 if tracebacks or exit0 or unnamed or boilerplate else 0


if __name__ == "__main__":
    sys.exit(main())
