"""The single-process qat-compare job: every method x scheme of the `methods` x `quants` lists, plus rows from
`results` files, into one table (markdown, CSV, JSON) and a Pareto chart (PNG) by `qat.jobs.results.write_results`.
The multirun form (`qat-compare -m`, QAT included) is `qat.jobs.sweep`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import qat
from qat.errors import ConfigError
from qat.jobs import ptq
from qat.jobs.config import COMPARE, as_bool, check_keys
from qat.jobs.harness import evaluate_tasks, flat_metrics, require_lm_eval
from qat.jobs.placement import resolve_device
from qat.jobs.ptq import check_job, check_method, check_values, job_inputs, job_protocol
from qat.jobs.results import check_protocols, load_results, write_results
from qat.models import load_tokenizer, model_skeleton, tokenizer_location
from qat.ptq import METHODS, preflight
from qat.recipes import CONFIG_DIR
from qat.transform.recipe import load_recipe

def run_compare_job(cfg: dict, out_dir: str | os.PathLike, log: Callable[[str], None] = print) -> dict[str, Path]:
    """The qat-compare run: every method x scheme, plus rows from `results` files, into one table and plot."""
    check_keys(cfg, COMPARE)
    if errors := check_values(cfg):  # also when every row comes from `results` files
        raise ConfigError("bad config:\n" + "\n".join(f"  - {e}" for e in errors))
    progress = as_bool(cfg.get("progress", True), "progress")
    torch.manual_seed(int(cfg.get("seed", 0)))
    device = resolve_device(cfg.get("device"))  # checked by check_values
    methods = [_method_entry(m) for m in cfg["methods"]]
    tasks = list(cfg["eval"].get("tasks") or [])
    if tasks and methods:
        require_lm_eval()  # before any row is computed
    extra = load_results(cfg.get("results") or [])
    if not methods and not extra:
        raise ConfigError("nothing to compare: methods=[] and no results= files")
    if methods:
        _check_method_names([opts["name"] for _, opts in methods])
        quantized = [(label, opts) for label, opts in methods if opts["name"] != "fp"]
        bad = _quant_errors(cfg["quants"]) if quantized else {}
        for _, opts in methods:
            check_job(cfg, calibrate=opts["name"] != "fp", method=None if opts["name"] == "fp" else opts)
        _check_pairs(cfg["model"], quantized, cfg["quants"], bad)
        load, batches, blocks = job_inputs(cfg["model"], cfg["data"], cfg["calibration"], cfg["eval"])
        if extra:  # merged rows measured otherwise are refused now, not after every method has run
            check_protocols([{"method": "", "quant": "", "protocol": job_protocol(cfg, blocks),
                              "source": "this run's data / eval settings"}, *extra])
    rows = []
    quant_rows = ptq.quant_labels(cfg["quants"], log) if any(o["name"] != "fp" for _, o in methods) else []
    for label, opts in methods:
        if opts["name"] != "fp":
            check_method(opts, f"methods entry {label!r}")
        for i, quant in enumerate([None] if opts["name"] == "fp" else cfg["quants"]):
            args = {k: v for k, v in opts.items() if k != "name"}
            row, model = ptq.run_one(load, opts["name"], quant, batches, blocks, args, progress=progress,
                                     batch_size=cfg["eval"].get("batch_size", 4), device=device)
            row.update(method=label, protocol=job_protocol(cfg, blocks))
            if quant is not None:  # a recipe file whose name clashes is labelled apart (`ptq.quant_labels`)
                row["quant"] = quant_rows[i]
            if tasks:  # lm-eval on the quantized model itself (eval.tasks, eval.harness)
                harness = {k: v for k, v in (cfg["eval"].get("harness") or {}).items() if v is not None}
                tok = load_tokenizer(tokenizer_location(cfg["data"], cfg["model"]["path"]))
                row["tasks"] = flat_metrics(evaluate_tasks(model, tok, tasks, **harness))
            log(f"{label:12s} {row['quant']:16s} ppl {row['ppl']:.3f}  {row['bits_per_weight']:.2f} bpw  "
                f"{row['wall_s']:.1f} s")
            rows.append(row)
            del model  # before the next row loads its own: one model in memory at a time
            if device.type == "cuda":
                torch.cuda.empty_cache()  # its blocks back to the device, not held by the allocator for the next
    return write_results(rows + extra, out_dir, compare_title(cfg))


def _check_method_names(names: Sequence[Any]) -> None:
    """Every name of `methods` is fp or a PTQ method; the QAT ones (configs/method: qat, qat_gptq...) run one job
    each under -m (`qat.jobs.sweep`): say so, with every valid name."""
    plain = ["fp", *sorted(METHODS)]
    swept = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml") if p.stem not in plain)
    for name in names:
        if name in plain:
            continue
        where = (f"methods entry {name!r}: a QAT method runs one job per method x scheme" if name in swept else
                 f"methods entry {name!r}: no such method")
        raise ConfigError(f"{where}; methods=[...] takes {', '.join(plain)}; {', '.join(swept)} run with -m: "
                          f"qat-compare -m method={','.join(['fp', 'rtn', *swept])} quant=w4a16_g128")


def _quant_errors(quants: Sequence[Any]) -> dict[int, str]:
    """{index: problem} of the schemes of a single-process comparison that do not load (-1: no scheme at all)."""
    if not quants:
        return {-1: "quants=[]: a quantized method needs at least one scheme (e.g. quants=[w4a16_g128])"}
    errors = {}
    for i, quant in enumerate(quants):
        try:
            load_recipe(quant) if isinstance(quant, str) else qat.QuantRecipe.from_dict(quant)
        except (FileNotFoundError, ValueError, TypeError) as err:
            errors[i] = f"quants entry {quant!r}: {err}"
    return errors


def _check_pairs(model_cfg: dict, methods: list[tuple[str, dict]], quants: Sequence[Any], bad: dict[int, str]) -> None:
    """Every scheme, then every method x scheme row, on the model's skeleton (`qat.ptq.preflight`: config only, no
    weights), so that a scheme that does not fit the model's shapes, or one a method cannot solve, is refused before
    the first row runs, not hours in; with the schemes that did not load (`bad`), all in one message. A model
    transformers cannot build from its config alone is checked row by row as it loads."""
    errors = list(bad.values())
    for i, quant in enumerate(quants if methods else []):
        if i in bad:
            continue
        model = model_skeleton(model_cfg["path"], model_cfg.get("dtype", "float32"),
                               **dict(model_cfg.get("tiny") or {}))
        if model is None:
            break
        try:
            preflight(model, quant)
        except ConfigError as err:
            errors.append(f"quants entry {ptq.quant_name(quant)!r}: {err}")
            continue
        for label, opts in methods:
            try:
                preflight(model, quant, {k: v for k, v in opts.items() if k != "label"})
            except ConfigError as err:
                errors.append(f"methods entry {label!r} x quants entry {ptq.quant_name(quant)!r}: {err}")
    if errors:
        raise ConfigError("bad config (nothing has run):\n"
                          + "\n".join("  - " + e.strip().replace("\n", "\n    ") for e in errors))


def compare_title(cfg: dict) -> str:
    """The table's title: `title`, else "<model> on <corpus file name>"."""
    return cfg.get("title") or f"{cfg['model']['path']} on {Path(str(cfg['data']['path'])).name}"


def _method_entry(entry: Any) -> tuple[str, dict]:
    opts = {"name": entry} if isinstance(entry, str) else dict(entry)
    if "name" not in opts:
        raise ConfigError(f"methods entry {entry!r}: give a name (fp, rtn, gptq, awq, smoothquant)")
    label = opts.pop("label", opts["name"])
    return label, opts


