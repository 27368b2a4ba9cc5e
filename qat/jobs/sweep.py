"""One job of the `qat-compare -m method=... quant=...` multirun, and the sweep's table at the end.

`run_sweep_job` runs one method on one scheme and writes its row to result.json (a failure is recorded as a
failed row, not raised); the Hydra callback `AggregateResults` then gathers every job's row (`collect_sweep`)
into the table. A QAT row trains through qat-train's run, which the CLI passes in (`run_qat`): jobs import no
Lightning.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from qat.errors import ConfigError, UserError
from qat.io import atomic_write_bytes
from qat.jobs.compare import compare_title
from qat.jobs.config import (COMPARE, QAT, QAT_METHOD, as_bool, as_count, check_keys, default_device,
                             register_resolvers)
from qat.jobs.placement import device_errors, lightning_placement, resolve_device
from qat.jobs.ptq import check_job, check_method, job_inputs, job_protocol, quant_name, run_one
from qat.jobs.results import as_row, failed_row, to_json, write_results
from qat.recipes import CONFIG_DIR

# data keys that define the corpus and the eval blocks: a QAT row takes them from the compare config, so
# it is evaluated on exactly the PTQ rows' blocks (batch sizes and training caps stay the experiment's)
PROTOCOL_DATA_KEYS = ("path", "tokenizer", "block_size", "text_field", "sample_by", "val_fraction",
                      "test_fraction", "seed", "max_eval_blocks")
# qat-train overrides that place the trainer themselves: given in qat.overrides / method.overrides, they win over
# the compare job's `device` key (`qat_placement`)
TRAINER_PLACEMENT_KEYS = ("trainer", "trainer.accelerator", "trainer.devices")

def method_label(method: dict) -> str:
    """The row's method name: `label` if given, "qat+gptq" for PTQ-initialised QAT, else the method name."""
    if method.get("label"):
        return str(method["label"])
    init = method.get("init")
    return f"{method['name']}+{init}" if method.get("name") == "qat" and init else str(method["name"])


def run_sweep_job(cfg: dict, out_dir: str | os.PathLike, run_qat: Callable[[dict, Path], dict] | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """One (method, scheme) job of `qat-compare -m`: its row (with eval protocol) written to out_dir/result.json.

    A job that raises is not re-raised: its row says status "failed" with the error, so the other jobs of
    the sweep still run and the table shows what failed (Hydra's multirun would stop at the first error). A bad
    `device` is the exception: it would fail every job alike, so it is raised before anything loads (qat-compare
    refuses it in one line, exit 2, as its methods=[...] mode and qat-ptq do).

    Args:
        cfg: the composed compare config with a `method` node (fp, a PTQ method, or qat) and a `quant` node.
        out_dir: the job's directory (the sweep subdir).
        run_qat: runs a QAT method (`qat.lit.run.run_qat_job`: composes configs/train.yaml).
    Returns:
        the row written.
    Raises:
        ConfigError: a bad `device` (`qat.jobs.placement.device_errors`); ValueError: eval.tasks given.
    Example:
        >>> run_sweep_job({**cfg, "method": {"name": "gptq"}, "quant": load_recipe("w4a16_g128").to_dict()}, "out/0")
    """
    if (cfg.get("eval") or {}).get("tasks"):
        raise ValueError("eval.tasks (lm-eval tasks per row) runs in the single-process qat-compare (no -m); in a "
                         "sweep, export or save each row and run `qat-eval tasks=[...]` on it, then merge with "
                         "qat-compare results=[...]")
    if errors := device_errors(default_device() if cfg.get("device") is None else cfg["device"]):
        raise ConfigError("; ".join(errors))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = dict(cfg.get("method") or {"name": "?"})
    quant = "fp" if method.get("name") == "fp" else quant_name(cfg.get("quant") or "none")
    try:
        row = _sweep_row(cfg, out, run_qat)
    except Exception as err:  # noqa: BLE001 - recorded in the table, the sweep goes on
        detail = str(err) if isinstance(err, UserError) else traceback.format_exc()  # a user's mistake: no stack
        log(f"[qat-compare] job {method_label(method)} / {quant} failed:\n{detail}")
        row = failed_row(method_label(method), quant, err)
    row = {**row, "model": cfg["model"]["path"]}
    atomic_write_bytes(out / "result.json", to_json(row))
    return row


def _sweep_row(cfg: dict, out: Path, run_qat) -> dict:
    check_keys(cfg, COMPARE)
    progress = as_bool(cfg.get("progress", True), "progress")
    torch.manual_seed(as_count(cfg.get("seed", 0), "seed", 0))
    opts = {k: v for k, v in cfg["method"].items() if k != "label"}
    name = opts["name"]
    if name != "fp" and not cfg.get("quant"):
        raise ConfigError(f"method {name} needs a scheme: quant=<configs/quant name>, e.g. quant=w4a16_g128")
    if name == "qat":
        if run_qat is None:
            raise ValueError("method qat runs through qat-compare (qat.lit.run.run_qat_job)")
        return {**run_qat(cfg, out), "method": method_label(cfg["method"])}
    if name != "fp":
        check_method(opts)  # validate before loading anything
    check_job(cfg, calibrate=name != "fp", method=None if name == "fp" else opts)
    load, batches, blocks = job_inputs(cfg["model"], cfg["data"], None if name == "fp" else cfg["calibration"],
                                       cfg["eval"])
    protocol, device = job_protocol(cfg, blocks), resolve_device(cfg.get("device"))
    if name == "fp" and (done := _done_fp_row(out, protocol, cfg["model"]["path"], device)):
        return done  # one float baseline per sweep: the jobs of the other schemes reuse it
    row, _ = run_one(load, name, cfg.get("quant"), batches, blocks, {k: v for k, v in opts.items() if k != "name"},
                     progress=progress,
                     batch_size=cfg["eval"].get("batch_size", 4), device=device)
    return {**row, "method": method_label(cfg["method"]), "status": "ok", "error": "", "protocol": protocol}


def _done_fp_row(out: Path, protocol: dict | None, model: str, device: torch.device) -> dict | None:
    for path in sorted(out.parent.glob("*/result.json")):
        if path.parent == out:
            continue
        row = json.loads(path.read_text())
        if (row.get("method") == "fp" and row.get("status") == "ok" and row.get("protocol") == protocol
                and row.get("model") == model and not row.get("reused")
                and str(row.get("device", "cpu")).split(":")[0] == device.type):
            return {**row, "reused": str(path)}
    return None


def collect_sweep(sweep_dir: str | os.PathLike) -> list[dict]:
    """Every job's row of a qat-compare multirun (sweep_dir/<job>/result.json), in job order.

    Float-baseline rows reused by other jobs appear once. Protocols are checked by `write_results`.
    Raises:
        ValueError: a sweep without any result.json, or a row lacking required keys (naming the file).
    """
    def job_order(path: Path):
        head = path.parent.name.split("_", 1)[0]
        return (int(head) if head.isdigit() else 1 << 30, path.parent.name)

    paths = sorted(Path(sweep_dir).glob("*/result.json"), key=job_order)
    if not paths:
        raise ValueError(f"{sweep_dir}: no job wrote a result.json (did every job crash before starting?)")
    rows, fp_seen = [], set()
    for path in paths:
        data = json.loads(path.read_text())
        if data.get("reused"):
            continue
        row = as_row(data, path)
        if row["method"] == "fp" and row["status"] == "ok":  # jobs run in parallel may each measure it
            key = json.dumps(row["protocol"], sort_keys=True)
            if key in fp_seen:
                continue
            fp_seen.add(key)
        rows.append(row)
    return rows


# -- the QAT row: qat-train's config for one job of the sweep ---------------------------------------------
def train_config(cfg: dict, out_dir: Path) -> DictConfig:
    """configs/train.yaml composed for one QAT job of the sweep, on the sweep's model, data, scheme and eval.

    Overrides, in order: `experiment=<qat.experiment>`, `init=<method.init>`, `qat.overrides`,
    `method.overrides`, trainer.accelerator / trainer.devices from `device` (`qat_placement`); then model, the
    corpus / eval-block keys of data, quant, eval split and blocks, the PTQ-init calibration size and the seed are
    set from the compare config.
    Raises:
        ValueError: unknown keys in `qat` or in the method config, or a bad `device`, naming them.
    Example:
        >>> tcfg = train_config({**cfg, "method": {"name": "qat", "init": "gptq"}}, Path("outputs/x"))
    """
    register_resolvers()  # configs/paths: ${qat_root:}
    qat_cfg, method = dict(cfg.get("qat") or {}), dict(cfg["method"])
    check_keys(qat_cfg, QAT, "qat")
    check_keys(method, QAT_METHOD, f"method {method.get('name')}")
    overrides = [f"experiment={qat_cfg['experiment']}"] if qat_cfg.get("experiment") else []
    overrides += [f"init={method['init']}"] if method.get("init") else []
    overrides += [*(qat_cfg.get("overrides") or []), *(method.get("overrides") or [])]
    if (device := qat_placement(cfg)) is not None:
        overrides += [f"trainer.{key}={value}" for key, value in lightning_placement(device).items()]
    overrides.append(f"paths.output_dir={out_dir}")
    if GlobalHydra.instance().is_initialized():  # inside the running qat-compare app
        tcfg = compose(config_name="train", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            tcfg = compose(config_name="train", overrides=overrides)
    with open_dict(tcfg):
        tcfg.seed = cfg.get("seed", 0)
        tcfg.model = cfg["model"]
        for key in PROTOCOL_DATA_KEYS:
            if key in cfg["data"]:
                tcfg.data[key] = cfg["data"][key]
        tcfg.quant = cfg["quant"]
        tcfg.eval.split, tcfg.eval.max_blocks = cfg["eval"]["split"], cfg["eval"].get("max_blocks")
        # an experiment's lm-eval columns (smollm2_w4_qat: qat_wiki_lambada) are not the sweep's: its rows have
        # none (run_sweep_job refuses eval.tasks), so the QAT job does not spend minutes on them
        tcfg.eval.tasks = []
        if tcfg.get("init"):
            _same_calibration(cfg["calibration"])
            tcfg.init.calibration = {"samples": cfg["calibration"]["samples"], "seq_len": cfg["calibration"]["seq_len"]}
    if (n := _processes(tcfg.trainer)) != 1:
        raise ConfigError(f"a qat-compare QAT row with trainer.devices={tcfg.trainer.get('devices')} "
                          f"(num_nodes={tcfg.trainer.get('num_nodes', 1)}): {'several' if n is None else n} training "
                          "processes, and Lightning starts each one by re-running the whole qat-compare command; "
                          "run qat-train trainer=ddp on its own and add its result.json with "
                          "qat-compare results=[...]")
    return tcfg


def _processes(trainer: DictConfig) -> int | None:
    """How many processes Lightning trains with under `trainer` (devices x num_nodes); None where it decides
    itself (devices=-1 / "auto" with a multi-device strategy)."""
    devices, nodes = trainer.get("devices", "auto"), int(trainer.get("num_nodes", 1) or 1)
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()]) * nodes
    try:
        count = int(devices)
    except (TypeError, ValueError):  # "auto": one process unless the strategy asks for more
        strategy = str(trainer.get("strategy") or "auto")
        return nodes if strategy in ("auto", "single_device") else None
    return None if count == -1 else count * nodes


def qat_placement(cfg: dict) -> torch.device | None:
    """The device a QAT row of the compare job `cfg` trains on: its `device` key as the fp / PTQ rows resolve it
    (`resolve_device`: auto is cuda when available), or None where the user's qat-train overrides (qat.overrides,
    method.overrides) set the trainer group, trainer.accelerator or trainer.devices: those win.

    Raises:
        ConfigError: a bad `device` (checked even when the overrides win: the key is the job's).
    Example:
        >>> qat_placement({**cfg, "device": "cpu"})
        device(type='cpu')
    """
    device = resolve_device(cfg.get("device"))
    user = [*((cfg.get("qat") or {}).get("overrides") or []), *((cfg.get("method") or {}).get("overrides") or [])]
    keys = {str(o).split("=", 1)[0].lstrip("+~").strip() for o in user}
    return None if keys & set(TRAINER_PLACEMENT_KEYS) else device


def _same_calibration(calibration: dict) -> None:
    if calibration.get("split", "train") != "train":
        raise ConfigError(f"calibration.split={calibration['split']!r}: PTQ-initialised QAT calibrates on the "
                         "training split; use calibration.split=train")


def _override_values(overrides: list[str], key: str) -> list[str] | None:
    """The values the command-line overrides give `key` (every value of a sweep), None where none sets it."""
    found = None
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.key_or_group == key:
            found = ([str(v) for v in override.sweep_string_iterator()] if override.is_sweep_override()
                     else [str(override.value())])
    return found


class AggregateResults(Callback):
    """Hydra callback (configs/compare.yaml, hydra.callbacks): the sweep's table once every job has run.

    on_multirun_start refuses a bad `device` before any job runs; on_job_end records a job that escaped `run_sweep_job`'s own error handling as a failed row;
    on_multirun_end gathers every result.json of the sweep dir into results.{md,csv,json} and pareto.png
    there (qat.jobs.results.write_results), then exits with status 1 if a job failed and fail_on_error is set.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Refuse a bad `device` before Hydra launches any job (each would fail alike): one line, exit 2. Hydra
        turns a callback's exception into a warning, so this exits itself. A swept `device=cpu,gpu` is checked
        value by value here too (the config Hydra passes holds only the default)."""
        swept = _override_values(OmegaConf.select(config, "hydra.overrides.task", default=None) or [], "device")
        if swept is None:  # no device= on the command line: the config's own (QAT_DEVICE or auto)
            device = OmegaConf.select(config, "device", default=None)
            swept = [default_device() if device is None else device]
        if errors := [e for value in swept for e in device_errors(value)]:
            print(f"qat-compare: error: {'; '.join(errors)}", file=sys.stderr, flush=True)
            sys.exit(2)  # qat.cli.boundary.USER_EXIT (jobs do not import the CLI layer)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if job_return is None or job_return.status != JobStatus.FAILED:
            return
        out = Path(config.hydra.runtime.output_dir)
        if not (out / "result.json").exists():
            method = OmegaConf.select(config, "method.name", default="?")
            quant = OmegaConf.select(config, "quant.name", default="?")
            row = failed_row(method, quant, job_return._return_value)
            atomic_write_bytes(out / "result.json", to_json(row))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_sweep(sweep_dir)
        title = compare_title({"title": config.get("title"), "model": {"path": OmegaConf.select(config, "model.path")},
                               "data": {"path": OmegaConf.select(config, "data.path")}})
        paths = write_results(rows, sweep_dir, title)
        print(paths["md"].read_text(), flush=True)
        print(f"written: {', '.join(str(p) for p in paths.values())}", flush=True)
        failed = [Path(r["source"]).parent.name if r.get("source") else f"{r['method']}/{r['quant']}"
                  for r in rows if r["status"] != "ok"]  # the job folders: jobs may share method and scheme
        if failed and as_bool(config.get("fail_on_error", True), "fail_on_error"):
            print(f"[qat-compare] {len(failed)} job(s) failed: {', '.join(failed)} (see the table)", file=sys.stderr)
            sys.exit(1)
