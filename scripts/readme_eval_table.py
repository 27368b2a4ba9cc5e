"""The README comparison table (FP, RTN, GPTQ, AWQ, QAT at W4 / W3 g128) redone with lm-evaluation-harness
tasks: word perplexity on the whole held-out wiki split (qat_wiki_ppl) and LAMBADA-style accuracy
(qat_wiki_lambada), each with its standard error, beside the 32 x 128-token perplexity of the README.

    python scripts/readme_eval_table.py                      # SmolLM2-135M: hours on a 2-core machine
    python scripts/readme_eval_table.py --tiny --out /tmp/t  # tiny random Llama, tiny tasks: a smoke test
    nohup nice -n 15 env OMP_NUM_THREADS=2 python scripts/readme_eval_table.py > run.log 2>&1 &

Protocol (README "Comparing methods"): wiki, block_size 128, 32 held-out test blocks; w4a16_g128_ragged /
w3a16_g128_ragged; PTQ calibration 128 x 128 training tokens. Steps, each one process, logged to
<out>/logs/<step>.log and skipped when its result file exists (the script resumes where it stopped):

    ptq_<method>[_<quant>]   qat-compare methods=[<method>] quants=[<quant>] eval.tasks=[...]: perplexity and the
                             tasks on the quantized model (fp once)
    qat_<w>/train            qat-train experiment=smollm2_w4_qat, its scheme replaced by the row's (g128 ragged)
    qat_<w>/export           qat-export format=native of the trained checkpoint
    qat_<w>/eval             qat-eval tasks=[...] of the export (perplexity on the same blocks too)
    table                    qat-compare results=[...] methods=[]: one table, value ± stderr, noise pairs

The QAT row given to the merge is qat-eval's row with `quant` set to the scheme (qat-eval names it by the file
format, "native") and bits per weight / size / wall time (training) taken from qat-train's result. A failed step
is reported and the steps that need it are skipped; the others still run. The script runs the code it finds
on PYTHONPATH / the installed qat, in fresh processes per step: freeze a copy of the code for long runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WIKI_TASKS = "[qat_wiki_lambada,qat_wiki_ppl]"
TINY_TASKS = "[qat_tiny_lambada,qat_tiny_ppl]"
QUANTS = {"w4": "w4a16_g128_ragged", "w3": "w3a16_g128_ragged"}
BITS = {"w4": 4, "w3": 3}


def settings(tiny: bool) -> dict:
    """Model / data / task overrides shared by every step, and the QAT run's (qat-train) own."""
    if tiny:
        return {"common": ["model=tiny", "data=fixture"], "tasks": TINY_TASKS,
                "compare": ["calibration.samples=8", "eval.harness.batch_size=4"],
                "qat": ["experiment=tiny_qat", "trainer.max_steps=4", "eval.baselines=false"],
                "eval": ["harness.batch_size=4"], "label": "tiny", "tokenizer": "tiny"}
    common = ["model=smollm2_135m", "data=wiki", "data.block_size=128", "data.max_eval_blocks=32"]
    return {"common": common, "tasks": WIKI_TASKS,
            "compare": ["calibration.samples=128", "eval.harness.batch_size=4"],
            # the main job (120 steps x 2 x 128 tokens, distilled), with the row's scheme; its baselines are
            # the PTQ rows' job here
            "qat": ["experiment=smollm2_w4_qat", "eval.baselines=false"],
            "eval": ["harness.batch_size=4"], "label": "smollm2", "tokenizer": "smollm2-135m"}


class Pipeline:
    """Runs steps as subprocesses, skipping those whose result file exists; logs one file per step."""

    def __init__(self, out: Path, python: str) -> None:
        self.out, self.python = out, python
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.failed: list[str] = []

    def step(self, name: str, done: Path, module: str, args: list[str]) -> bool:
        """True when `done` exists (now or before); a failure is recorded and returns False."""
        if done.exists():
            print(f"[readme-eval] {name}: done ({done})", flush=True)
            return True
        log = self.out / "logs" / f"{name.replace('/', '_')}.log"
        cmd = [self.python, "-m", module, *args]
        print(f"[readme-eval] {name}: {' '.join(cmd)}  (log {log})", flush=True)
        t0 = time.time()
        with open(log, "a") as fh:
            fh.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            fh.flush()
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
            fh.write(f"# exit {rc} after {time.time() - t0:.0f} s\n")
        if rc != 0 or not done.exists():
            print(f"[readme-eval] {name}: FAILED (exit {rc}, {time.time() - t0:.0f} s); see {log}", flush=True)
            self.failed.append(name)
            return False
        print(f"[readme-eval] {name}: ok ({time.time() - t0:.0f} s)", flush=True)
        return True


def ptq_rows(p: Pipeline, s: dict, widths: list[str]) -> list[Path]:
    """FP once, then RTN / GPTQ / AWQ at each width, each with the tasks on its quantized model."""
    rows = []
    jobs = [("fp", None)] + [(m, w) for w in widths for m in ("rtn", "gptq", "awq")]
    for method, width in jobs:
        name = f"ptq_{method}" + (f"_{width}" if width else "")
        run_dir = p.out / name
        quants = f"quants=[{QUANTS[width]}]" if width else "quants=[]"
        ok = p.step(name, run_dir / "results.json", "qat.cli.compare",
                    [*s["common"], f"methods=[{method}]", quants, f"eval.tasks={s['tasks']}", *s["compare"],
                     f"hydra.run.dir={run_dir}"])
        if ok:
            rows.append(run_dir / "results.json")
    return rows


def qat_row(p: Pipeline, s: dict, width: str) -> Path | None:
    """qat-train -> qat-export (native) -> qat-eval for one width; the row file for the merge, or None."""
    quant, base = QUANTS[width], p.out / f"qat_{width}"
    scheme = [f"quant={quant}", f"quant.name={quant}", "quant.weight.group_size=128",
              f"quant.weight.bits={BITS[width]}",
              f"quant.description='int{BITS[width]} weight-only, g128 with a shorter last group, symmetric'"]
    train = base / "train"
    if not p.step(f"qat_{width}/train", train / "result.json", "qat.cli.train",
                  [*s["common"], *s["qat"], *scheme, f"hydra.run.dir={train}"]):
        return None
    trained = json.loads((train / "result.json").read_text())
    if trained.get("quant") != quant:
        p.failed.append(f"qat_{width}/train: trained {trained.get('quant')!r}, not {quant!r}")
        return None
    ckpt = trained.get("ckpt") or str(train / "checkpoints" / "last.ckpt")
    native = base / "native"
    # qat_quant.json is the native export's last file written: its presence means the folder is whole
    if not p.step(f"qat_{width}/export", native / "qat_quant.json", "qat.cli.export",
                  _export_args(s, quant, ckpt, native, base)):
        return None
    eval_json = base / "eval" / "result.json"
    if not p.step(f"qat_{width}/eval", eval_json, "qat.cli.eval",
                  [*data_args(s), f"model.path={native}", f"tokenizer={s['tokenizer']}", f"tasks={s['tasks']}",
                   *s["eval"], f"output={eval_json}",
                   "label=qat", "prompt=null", f"hydra.run.dir={base / 'eval'}"]):
        return None
    row = json.loads(eval_json.read_text())
    # qat-eval names the row by file format; the table's rows are named by scheme, sized as qat-train measured
    row.update(quant=quant, bits_per_weight=trained.get("bits_per_weight"), size_mb=trained.get("size_mb"),
               wall_s=(trained.get("init_s") or 0.0) + (trained.get("train_s") or 0.0), steps_source=str(train))
    row_file = base / "row.json"
    row_file.write_text(json.dumps(row, indent=1))
    return row_file


def data_args(s: dict) -> list[str]:
    """The shared overrides without the model group (qat-eval reads the export, `model.path=`)."""
    return [a for a in s["common"] if not a.startswith("model=")]


def _export_args(s: dict, quant: str, ckpt: str, native: Path, base: Path) -> list[str]:
    model = [a for a in s["common"] if a.startswith("model=")]
    return [*model, f"quant={quant}", f"checkpoint={ckpt}", "format=native", f"output={native}", "overwrite=true",
            f"hydra.run.dir={base / 'export_run'}"]


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the pipeline; returns 0 when every step succeeded, 1 otherwise."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/work/runs/readme_eval", help="output folder (created)")
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama, fixture corpus, tiny tasks (minutes)")
    ap.add_argument("--widths", default="w4,w3", help="comma-separated: w4, w3")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    widths = [w for w in args.widths.split(",") if w]
    bad = [w for w in widths if w not in QUANTS]
    if bad:
        ap.error(f"--widths: unknown {bad}; choose from {list(QUANTS)}")
    s = settings(args.tiny)
    p = Pipeline(out, args.python)
    t0 = time.time()
    print(f"[readme-eval] {s['label']} -> {out} (pid {os.getpid()})", flush=True)
    rows = ptq_rows(p, s, widths)
    for width in widths:
        if (row := qat_row(p, s, width)) is not None:
            rows.append(row)
    if rows:
        table = out / "table"
        (table / "results.json").unlink(missing_ok=True)  # the merge is always redone from what exists
        p.step("table", table / "results.json", "qat.cli.compare",
               [*s["common"], "methods=[]", f"results=[{','.join(map(str, rows))}]",
                f"title='README table with lm-eval tasks, {s['label']}'", f"hydra.run.dir={table}"])
        if (table / "results.md").exists():
            print((table / "results.md").read_text(), flush=True)
    print(f"[readme-eval] finished in {time.time() - t0:.0f} s; failed: {p.failed or 'none'}", flush=True)
    return 1 if p.failed else 0


if __name__ == "__main__":
    sys.exit(main())
