"""The training run behind `qat-train`: check the composed config, instantiate, fit, compare FP / RTN / QAT.

Everything here takes a composed Hydra config (DictConfig), so tests call it with `hydra.compose` directly.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import qat
from qat.errors import ConfigError
from qat.io import atomic_write_bytes
from qat.jobs.config import (TRAIN, as_bool, as_count, import_target, instantiation_error, register_resolvers,
                             unknown_keys)
from qat.jobs.harness import INSTALL_HINT, check_harness_args, check_tasks, require_lm_eval
from qat.jobs.measure import PeakMemory, bits_per_weight, perplexity, weight_bits
from qat.jobs.ptq import enough_tokens, model_context
from qat.jobs.results import to_json
from qat.jobs.sweep import qat_placement, train_config
from qat.lit.callbacks import CheckpointInit, FloatBaseline, PTQInit, RunRecord, StartBaseline, say
from qat.lit.module import ROTATION_KEYS, learned_rotation_errors
from qat.lit.parallel import is_sharded, sharding_strategy
from qat.lit.run_files import check_data_path, check_init_checkpoint, check_resume, check_writable
from qat.models import check_tokenizer_source, load_model, load_tokenizer, tokenizer_location
from qat.ptq.api import method_config
from qat.ptq.start import INIT_STARTS

register_resolvers()  # configs/paths uses ${qat_root:}; tests compose without the CLI
RANGE_INIT_BATCHES = 4  # configs/train.yaml's module.range_init_batches


def context_length_of(model_cfg: DictConfig) -> int | None:
    """max_position_embeddings of the configured model, read without loading the weights."""
    return model_context(model_cfg)


def check_config(cfg: DictConfig, make_output: bool = True) -> None:
    """Fail before any long work, naming every offender: misspelt keys, missing files, impossible sizes.

    `make_output=False` leaves out the output folder's check, which makes it (a `qat-train -m` sweep checks every
    job's config before the first one runs, and Hydra makes each job's folder when it starts).

    Raises:
        ConfigError: one message listing every problem found.
        FileNotFoundError: the model or data path does not exist (raised on its own, with the path).
    """
    errors = unknown_keys(cfg, TRAIN) + _check_values(cfg)
    if cfg.eval.split not in ("validation", "test"):
        errors.append(f"eval.split={cfg.eval.split!r}; choose from ['validation', 'test']")
    recipe = None
    if cfg.get("quant") is not None:
        try:
            recipe = qat.QuantRecipe.from_dict(cfg.quant)
        except ValueError as err:
            errors.append(str(err))
    if cfg.get("init") and cfg.get("quant") is None:
        errors.append(f"init={cfg.init.get('name')} needs a quant recipe to initialise; drop init or set quant=...")
    from_checkpoint = _from_checkpoint(cfg)
    if cfg.get("init") and cfg.module.get("learned_rotations") and not cfg.get("ckpt_path") and not from_checkpoint:
        errors.append(f"init={cfg.init.get('name')} with module.learned_rotations: the PTQ initialisation solves the "
                      "weights the rotations parametrize (W @ R, taken at every step), so its solution would be "
                      "dropped; drop init (QAT learns the grid from round-to-nearest) or module.learned_rotations")
    if from_checkpoint:
        errors += _check_init_checkpoint_keys(cfg.init)
    elif cfg.get("init"):
        init = OmegaConf.to_container(cfg.init, resolve=True)
        calib = init.pop("calibration", None) or {}
        if init.pop("start", "grid") not in INIT_STARTS:
            errors.append(f"init.start={cfg.init.start!r}; choose from {list(INIT_STARTS)}")
        try:
            method_config(init)
            errors += [f"init: {e}" for e in enough_tokens(init, {"samples": 32, "seq_len": 128, **calib})]
        except (KeyError, ValueError) as err:
            errors.append(f"init: {err.args[0] if err.args else err}")
    errors += _check_optim(cfg.module)
    errors += _check_tasks(cfg)
    if errors:
        raise ConfigError("bad config:\n" + "\n".join(f"  - {e}" for e in errors))
    _ensure_range_init(cfg, recipe)
    check_data_path(str(cfg.data.path))
    check_tokenizer_source(tokenizer_location(cfg.data, cfg.model.path))
    if cfg.get("ckpt_path"):
        check_resume(cfg)
    elif from_checkpoint:  # a resumed run holds the state it started from and trained
        check_init_checkpoint(cfg)
    if make_output:
        check_writable(Path(str(cfg.paths.output_dir)))
    context = context_length_of(cfg.model)
    if context is not None and cfg.data.block_size > context:
        raise ConfigError(f"data.block_size={cfg.data.block_size} is larger than the context of model.path="
                         f"{cfg.model.path!r} (max_position_embeddings={context}); use data.block_size<={context}")


def _from_checkpoint(cfg: DictConfig) -> bool:
    """init=checkpoint: the run starts from a trained run's state, not from a PTQ solution."""
    return bool(cfg.get("init")) and cfg.init.get("name") == "checkpoint"


def _check_init_checkpoint_keys(init: DictConfig) -> list[str]:
    """init=checkpoint takes `path` (and the `calibration` qat-compare gives every init, unused): a PTQ init's keys
    there (start, the method's options) would do nothing, so they are refused."""
    extra = sorted(set(init) - {"name", "path", "calibration"})
    errors = [f"init=checkpoint: unknown key(s) {extra}; it takes init.path (the checkpoint to start from)"] if extra else []
    if OmegaConf.is_missing(init, "path") or init.get("path") in (None, ""):
        errors.append("init=checkpoint needs init.path=<a qat-train checkpoint> (<run dir>/checkpoints/last.ckpt)")
    return errors


def _ensure_range_init(cfg: DictConfig, recipe: qat.QuantRecipe | None) -> None:
    """A recipe with held (static) activation / KV ranges is calibrated on training batches before anything is
    evaluated: with module.range_init_batches=0 (a weight-only experiment's setting, smollm2_w4_qat) and no init=
    (which calibrates them itself), it is raised to RANGE_INIT_BATCHES, with a line saying so. Evaluation never
    calibrates (`qat.control.frozen_ranges`): without this the start-point row would have no ranges."""
    if recipe is None or cfg.get("init") or int(cfg.module.get("range_init_batches", 0)) > 0:
        return
    roles = recipe.static_activation_roles()
    if roles:
        cfg.module.range_init_batches = RANGE_INIT_BATCHES
        say(f"quant={recipe.name} holds static {' and '.join(roles)} ranges: module.range_init_batches=0 raised to "
            f"{RANGE_INIT_BATCHES} (they are calibrated on training batches; evaluation data never sets them); "
            "set module.range_init_batches=<N> to choose how many")


def _check_values(cfg: DictConfig) -> list[str]:
    """Plain values checked strictly (one line per offender); the flags are rewritten as real booleans, so
    `eval.after=no` means false rather than a non-empty (true) string."""
    errors = []
    counts = [("seed", cfg.get("seed", 0), 0, False), ("eval.max_blocks", cfg.eval.get("max_blocks"), 1, True),
              ("trainer.max_steps", cfg.trainer.get("max_steps", -1), -1, False),
              ("data.block_size", cfg.data.get("block_size"), 2, False),
              ("data.batch_size", cfg.data.get("batch_size", 1), 1, False),
              ("module.range_init_batches", cfg.module.get("range_init_batches", 0), 0, False)]
    for key, value, least, allow_none in counts:
        try:
            as_count(value, key, least, allow_none=allow_none)
        except ConfigError as err:
            errors.append(str(err))
    for node, key in (("eval", "after"), ("eval", "baselines"), ("module", "gradient_checkpointing"),
                      ("module", "freeze_embeddings"), ("module", "lean_ste")):
        try:
            if key in cfg[node]:
                cfg[node][key] = as_bool(cfg[node][key], f"{node}.{key}")
        except ConfigError as err:
            errors.append(str(err))
    rot = cfg.module.get("learned_rotations")
    keys = list(ROTATION_KEYS)
    if rot is not None and not OmegaConf.is_dict(rot):  # unknown keys: named by learned_rotation_errors below
        errors.append(f"module.learned_rotations={OmegaConf.to_container(rot) if OmegaConf.is_config(rot) else rot!r}; "
                      f"give null or a mapping of {keys}, e.g. module.learned_rotations='{{lr: 0.02}}'")
    elif rot is not None:
        plain = OmegaConf.to_container(rot, resolve=True)
        for flag in ("r1", "r2"):  # r1=no from the command line is the string "no"
            try:
                if flag in rot:
                    rot[flag] = plain[flag] = as_bool(rot[flag], f"module.learned_rotations.{flag}")
            except ConfigError as err:
                errors.append(str(err))
                plain.pop(flag)
        errors += learned_rotation_errors(plain, "module.learned_rotations")
        alone, steps = plain.get("alone", 0), cfg.trainer.get("max_steps") or -1
        if isinstance(alone, int) and alone > 0 and 0 < steps <= alone:
            errors.append(f"module.learned_rotations.alone={alone} with trainer.max_steps={steps}: the weights would "
                          f"never train; give alone < max_steps (the first `alone` steps train the rotations only)")
        errors += _check_rotations_unsharded(cfg)
    return errors


def _check_rotations_unsharded(cfg: DictConfig) -> list[str]:
    """Learned rotations are parametrizations shared by every block: a strategy that shards the blocks (trainer=fsdp)
    cannot hold them. Refused here, before any model loads (`QATModule.configure_model` would, after the baselines)."""
    strategy = cfg.trainer.get("strategy")
    if not cfg.module.learned_rotations or strategy is None:
        return []
    shown = strategy
    if OmegaConf.is_dict(strategy):
        shown = strategy.get("_target_")
        try:
            strategy = import_target(str(shown))
        except ConfigError:
            return []  # a _target_ that does not import is reported when the trainer is built
    if sharding_strategy(strategy) is None:
        return []
    return [f"module.learned_rotations with trainer.strategy={shown}: a sharded strategy cannot train them (the "
            "rotations are parametrizations shared across the sharded blocks); use trainer=ddp or one device, or "
            "drop module.learned_rotations"]


def eval_tasks(cfg: DictConfig) -> tuple[list[str], dict[str, Any]]:
    """(eval.tasks as a list of names, eval.harness without its null values)."""
    tasks = cfg.eval.get("tasks") or []
    tasks = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    harness = OmegaConf.to_container(cfg.eval.harness, resolve=True) if cfg.eval.get("harness") else {}
    return [str(t).strip() for t in tasks if str(t).strip()], {k: v for k, v in harness.items() if v is not None}


def lm_eval_missing() -> str | None:
    """Why the lm-eval columns are left out (lm-eval not installed), or None when it is installed."""
    try:
        require_lm_eval()
    except ImportError:
        return INSTALL_HINT
    return None


def _check_tasks(cfg: DictConfig) -> list[str]:
    """eval.harness values, and eval.tasks names where lm-eval is installed (without it the tasks are left out
    of the table with one line saying why, not refused)."""
    tasks, harness = eval_tasks(cfg)
    if not tasks:
        return []
    try:
        check_harness_args(**harness)
        if lm_eval_missing() is None:
            check_tasks(tasks)
    except ConfigError as err:
        return [f"eval.tasks / eval.harness: {err}"]
    return []


def _check_optim(module_cfg: DictConfig) -> list[str]:
    """Build the optimizer and scheduler on a dummy parameter: a bad value (lr=abc) fails now, not after
    the model is loaded, baselines evaluated and a PTQ initialisation solved (configure_optimizers runs last)."""
    if module_cfg.get("optimizer") is None:
        return []  # QATModule's default AdamW
    try:
        optimizer = instantiate(module_cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    except Exception as err:  # noqa: BLE001 - reported with the node it came from
        return [f"optim.optimizer: {type(err).__name__}: {instantiation_error(err)}; values "
                f"{_args(module_cfg.optimizer)}"]
    if module_cfg.get("scheduler"):
        try:
            instantiate(module_cfg.scheduler)(optimizer)
        except Exception as err:  # noqa: BLE001
            return [f"optim.scheduler: {type(err).__name__}: {instantiation_error(err)}; values "
                    f"{_args(module_cfg.scheduler)}"]
    return []


def _args(node: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in ("_partial_",)}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Check, instantiate, fit, evaluate; returns the results and prints the table.

    The FP / start-point baselines and the PTQ initialisation are callbacks (qat.lit.callbacks) that run in
    `trainer.fit`'s setup, before a resumed checkpoint is restored; their time is not counted as training.
    Returns:
        {"fp_ppl", "rtn_ppl", "qat_ppl", "gap_recovered", "loss_gap_recovered", "bits_per_weight", "train_s", "wall_s", "ckpt", "device"}
        (keys present when computed; "device": where Lightning trained, "cpu" or "cuda:N").
    Raises:
        ValueError / FileNotFoundError: from check_config, before anything is loaded.
    """
    start = time.perf_counter()
    check_config(cfg)
    os.environ.setdefault("WANDB_MODE", "offline")
    pl.seed_everything(cfg.seed, workers=True)
    say(f"model {cfg.model.path}, data {cfg.data.path}, quant {cfg.quant.name if cfg.get('quant') else 'none'}")
    record = RunRecord(split=str(cfg.eval.split))
    tasks, record.harness = eval_tasks(cfg)
    if tasks and (why := lm_eval_missing()):
        record.results["tasks_omitted"] = f"eval.tasks {tasks} left out of the table: {why}"
    elif tasks:
        record.tasks, record.tokenizer = tasks, load_tokenizer(tokenizer_location(cfg.data, cfg.model.path))
    callbacks = _before_training(cfg, record) + [instantiate(c) for c in (cfg.callbacks or {}).values()]
    loggers = [instantiate(c) for c in (cfg.logger or {}).values()] or False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)  # bad trainer values fail here, cheaply
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, _recursive_=False)  # loads the model; optimizer nodes stay configs (hparams)
    results, rows = record.results, record.rows
    datamodule.setup("fit")
    blocks = record.blocks = datamodule.blocks[cfg.eval.split][: cfg.eval.max_blocks]
    eval_bs = record.batch_size = datamodule.eval_batch_size
    results["eval_protocol"] = {"data": str(cfg.data.path), "split": cfg.eval.split, "blocks": int(len(blocks)),
                                "block_size": int(blocks.shape[-1])}  # qat-compare refuses rows measured otherwise
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        if cfg.ckpt_path and hasattr(datamodule, "seek_train"):
            # Lightning calls a mid-epoch resume with a plain DataLoader unreliable; TextDataModule's stream is
            # sought to the resumed step's first sample (QATModule.on_train_start), so the resumed run reads the
            # batches the straight run read (tests/train/test_lit.py::test_resume_is_bit_identical)
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    results["train_s"] = time.perf_counter() - t0 - record.setup_s
    results["ckpt"] = getattr(trainer.checkpoint_callback, "last_model_path", None) if trainer.checkpoint_callback else None
    results["device"] = str(trainer.strategy.root_device)  # "cpu", "cuda:1": as a PTQ row records it
    # a sharded (FSDP) model's forward all-gathers its weights: every rank takes part in the evaluation
    if cfg.eval.after and (trainer.is_global_zero or is_sharded(module.model)):
        t0 = time.perf_counter()
        say(f"evaluating the trained model on {len(blocks)} {cfg.eval.split} blocks ...")
        results["qat_ppl"] = perplexity(module.model, blocks, eval_bs)
        seconds = time.perf_counter() - t0
        cells = record.task_cells(module.model, "tasks")  # "tasks": the key qat-compare reads from result.json
        q_bits, whole = bits_per_weight(module.model)
        name = "QAT" if cfg.get("quant") else "fine-tuned FP"
        rows.append({"model": name, "ppl": results["qat_ppl"], **cells, "bits/weight (quantized layers)": q_bits,
                     "bits/weight (all)": whole, "time_s": results["train_s"] + seconds})
        _log(trainer, {f"{cfg.eval.split}/qat_ppl": results["qat_ppl"]})
        # qat-compare's conventions, so a merged row lands on the plot
        results["bits_per_weight"], results["size_mb"] = weight_bits(module.model)
    if {"fp_ppl", "rtn_ppl", "qat_ppl"} <= set(results):
        results["gap_recovered"], results["loss_gap_recovered"] = gap_recovered(
            results["fp_ppl"], results["rtn_ppl"], results["qat_ppl"])
    results["wall_s"] = time.perf_counter() - start
    if rows and trainer.is_global_zero:
        print(_table(cfg, rows, results, len(blocks) * blocks.shape[1] if len(blocks) else 0), flush=True)
    if trainer.is_global_zero:
        _write_result(cfg, results)
        last = results.get("ckpt")
        print(f"written: {Path(cfg.paths.output_dir) / 'result.json'}" + (f"; checkpoint: {last}" if last else ""),
              flush=True)
    return results


def _before_training(cfg: DictConfig, record: RunRecord) -> list:
    """The callbacks that run before training, in order: FP baseline, PTQ initialisation, start-point baseline.

    A resumed run with init=... skips the PTQ initialisation and its baseline row: the checkpoint holds the
    solved, trained state, and solving again would be thrown away.
    """
    resume_skips_init = bool(cfg.get("init") and cfg.ckpt_path)
    if resume_skips_init:
        say(f"resuming from {cfg.ckpt_path}: PTQ initialisation ({cfg.init.name}) and its baseline row skipped")
    callbacks = [FloatBaseline(record)] if cfg.eval.baselines else []
    from_checkpoint = _from_checkpoint(cfg)
    if from_checkpoint and not resume_skips_init:
        callbacks.append(CheckpointInit(cfg.init.path, record))
    elif cfg.get("init") and not resume_skips_init:
        callbacks.append(PTQInit(OmegaConf.to_container(cfg.init, resolve=True), record))
    if cfg.eval.baselines and cfg.get("quant") is not None and not resume_skips_init:
        # a checkpoint's held ranges are trained ones: the start row evaluates them, not a recalibration
        callbacks.append(StartBaseline(record, _start_label(cfg), calibrate=not from_checkpoint))
    return callbacks


def _start_label(cfg: DictConfig) -> str:
    """The start row's name in the table: the PTQ initialisation's (GPTQ, AWQ) or RTN."""
    return cfg.init.name.upper() if cfg.get("init") else "RTN"


def _method_label(cfg: DictConfig) -> str:
    if cfg.get("label"):
        return str(cfg.label)
    if not cfg.get("quant"):
        return "fp-finetune"
    return f"qat+{cfg.init.name}" if cfg.get("init") else "qat"


def gap_recovered(fp_ppl: float, start_ppl: float, qat_ppl: float) -> tuple[float, float]:
    """The share of the start -> FP gap that QAT closed, in perplexity and in loss (log perplexity); NaN when the
    start is not above FP. The loss share is the one to read when the start is far off (ternary RTN at 1e7 and QAT
    at 5e3 close 99.95% of the perplexity gap but 60% of the loss gap).

    Example:
        >>> [round(x, 3) for x in gap_recovered(20.0, 40.0, 25.0)]
        [0.75, 0.678]
    """
    if not start_ppl > fp_ppl > 0:
        return math.nan, math.nan
    return ((start_ppl - qat_ppl) / (start_ppl - fp_ppl),
            (math.log(start_ppl) - math.log(qat_ppl)) / (math.log(start_ppl) - math.log(fp_ppl)))


def gap_line(start: str, results: dict[str, Any]) -> str | None:
    """The table's summary line of `gap_recovered` (None when it is not computed or NaN: the start is not above
    FP). QAT ending below FP is said so, with both perplexities, not as a share above 100%.

    Example:
        >>> gap_line("GPTQ", {"fp_ppl": 20.0, "rtn_ppl": 40.0, "qat_ppl": 25.0, "gap_recovered": 0.75,
        ...                   "loss_gap_recovered": 0.678})
        'QAT recovered 75.0% of the GPTQ -> FP perplexity gap (67.8% of the loss gap, log perplexity)'
    """
    if math.isnan(results.get("gap_recovered", math.nan)):
        return None
    if results["qat_ppl"] < results["fp_ppl"]:
        return (f"QAT ended below FP ({results['qat_ppl']:.3f} vs {results['fp_ppl']:.3f} perplexity; "
                f"{start} started at {results['rtn_ppl']:.3f}): the whole {start} -> FP gap is closed")
    return (f"QAT recovered {100 * results['gap_recovered']:.1f}% of the {start} -> FP perplexity gap "
            f"({100 * results['loss_gap_recovered']:.1f}% of the loss gap, log perplexity)")


def _write_result(cfg: DictConfig, results: dict[str, Any]) -> None:
    """result.json in the run directory: the row `qat-compare results=...` reads."""
    row = {"method": _method_label(cfg), "quant": cfg.quant.name if cfg.get("quant") else "none", **results}
    atomic_write_bytes(Path(cfg.paths.output_dir) / "result.json", to_json(row))  # strict: NaN -> null


def _log(trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()


def _table(cfg, rows, results, n_tokens: int) -> str:
    head = (f"\n{cfg.task_name}: {cfg.model.path}, quant {cfg.quant.name if cfg.get('quant') else 'none'}, "
            f"{cfg.trainer.max_steps} steps x {cfg.data.batch_size} x {cfg.data.block_size} tokens; "
            f"perplexity on {n_tokens} held-out {cfg.eval.split} tokens")
    lines = [head, qat.format_table(rows)]
    if line := gap_line(_start_label(cfg), results):
        lines.append(line)
    if results.get("tasks_s"):
        lines.append(f"lm-eval task columns: value ± standard error; {results['tasks_s']:.0f} s of the wall time")
    if results.get("tasks_omitted"):
        lines.append(results["tasks_omitted"])
    lines.append(f"wall time {results['wall_s']:.0f} s")
    return "\n".join(lines)


def run_qat_job(cfg: dict, out_dir: Path) -> dict:
    """The QAT row: qat-train's training function on `train_config(cfg, out_dir)`, measured like a PTQ row.

    Bits per weight and size come from `qat.jobs.measure.weight_bits` on the prepared model (they depend on the
    scheme and shapes only); wall time is PTQ initialisation + training (evaluation excluded, as for PTQ).
    Returns:
        the row (COLUMNS, status, protocol) plus the training results (start_ppl: perplexity at step 0).
    """
    tcfg = train_config(cfg, out_dir)
    with PeakMemory(device=qat_placement(cfg)) as mem:  # None: the user's trainer overrides place it
        results = train(tcfg)
    if not math.isfinite(results.get("qat_ppl", math.nan)):
        raise ValueError(f"QAT finished without a finite perplexity (qat_ppl={results.get('qat_ppl')})")
    model_cfg = cfg["model"]
    bpw, size = weight_bits(qat.prepare(load_model(model_cfg["path"], model_cfg.get("dtype", "float32"),
                                                   **dict(model_cfg.get("tiny") or {})), cfg["quant"]))
    protocol = results.get("eval_protocol")
    if protocol:
        protocol = {**protocol, "data": str(cfg["data"]["path"])}
    return {"method": "qat", "quant": cfg["quant"].get("name", "custom"), "ppl": results["qat_ppl"],
            "bits_per_weight": bpw, "size_mb": size, "wall_s": results.get("init_s", 0.0) + results["train_s"],
            "peak_mem_mb": mem.peak_mb, "device": results["device"], "status": "ok", "error": "",
            "protocol": protocol, "start_ppl": results.get("rtn_ppl"), "steps": int(tcfg.trainer.max_steps),
            "experiment": (cfg.get("qat") or {}).get("experiment"), "ckpt": results.get("ckpt")}
