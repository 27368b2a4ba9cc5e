"""Callbacks: per-layer quantizer statistics, plain-text progress for non-interactive runs, and what qat-train
does before training (float and start-point baselines, PTQ initialisation)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch

from qat.control import quantization_disabled
from qat.data import calibration_batches
from qat.jobs.harness import evaluate_tasks, flat_metrics
from qat.jobs.measure import bits_per_weight, perplexity
from qat.lit.run_files import load_init_checkpoint
from qat.primitives import fake_quantize_forward
from qat.ptq import apply
from qat.ptq.start import float_weights, ptq_start


@torch.no_grad()
def quantizer_stats(model: torch.nn.Module) -> dict[str, float]:
    """Per weight quantizer: mean scale and fraction of weights clipped (outside the code range).

    Returns:
        {"<module>/scale_mean": float, "<module>/clip_frac": float, ..., "quant/scale_mean": mean over layers,
         "quant/clip_frac": mean over layers}
    Example:
        >>> stats = quantizer_stats(qat.prepare(tiny_llama(), qat.load_recipe("w4a16_g128_lsq")))
    """
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        q = getattr(module, "weight_quantizer", None)
        if q is None or not q.initialized or q.spec.dynamic:
            continue
        w = module.weight.detach()
        scale, zero_point = q.qparams(w)
        _, mask = fake_quantize_forward(w, scale.detach(), None if zero_point is None else zero_point.detach(),
                                        q.spec, need_mask=True)
        out[f"{name}/scale_mean"] = float(scale.float().mean())
        out[f"{name}/clip_frac"] = 0.0 if mask is None else float(1 - mask.float().mean())
    for key in ("scale_mean", "clip_frac"):
        values = [v for k, v in out.items() if k.endswith("/" + key)]
        if values:
            out[f"quant/{key}"] = sum(values) / len(values)
    return out


class QuantStats(pl.Callback):
    """Log `quantizer_stats` every `every_n_steps` optimizer steps (per layer when `per_layer`)."""

    def __init__(self, every_n_steps: int = 50, per_layer: bool = True) -> None:
        self.every_n_steps, self.per_layer = every_n_steps, per_layer

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.every_n_steps <= 0 or trainer.global_step % self.every_n_steps or not trainer.loggers:
            return
        stats = quantizer_stats(pl_module.model)
        if not self.per_layer:
            stats = {k: v for k, v in stats.items() if k.startswith("quant/")}
        else:
            stats = {k if k.startswith("quant/") else f"quant_layers/{k}": v for k, v in stats.items()}
        for logger in trainer.loggers:
            logger.log_metrics(stats, step=trainer.global_step)


class TextProgress(pl.Callback):
    """One line every `every_n_steps` steps: step, loss, tokens/s, ETA (readable in logs and CI)."""

    def __init__(self, every_n_steps: int = 10) -> None:
        self.every_n_steps = every_n_steps
        self.start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start, self.start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps or trainer.global_rank != 0:
            return
        elapsed = time.perf_counter() - self.start
        done = max(step - self.start_step, 1)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        tokens = done * batch["input_ids"].numel() * trainer.world_size
        loss = trainer.callback_metrics.get("train/loss")
        eta = elapsed / done * max(total - step, 0)
        print(f"[qat-train] step {step}/{total}  loss {float(loss) if loss is not None else float('nan'):.4f}  "
              f"{tokens / elapsed:.0f} tok/s  elapsed {elapsed:.0f}s  eta {eta:.0f}s", file=sys.stderr, flush=True)


# -- what qat-train measures and solves before training: Lightning callbacks run in `setup("fit")` -------------
# `setup` runs before a resumed checkpoint is restored and before the model moves to its device, in list
# order: FloatBaseline (the float model), PTQInit (writes solved weights), StartBaseline (the QAT start).


def say(msg: str) -> None:
    """A progress line of qat-train on stderr."""
    print(f"[qat-train] {msg}", file=sys.stderr, flush=True)


@dataclass
class RunRecord:
    """What the baseline and PTQ-initialisation callbacks write into: results, the table's rows, and the
    seconds they took inside `trainer.fit` (not training time)."""

    split: str
    blocks: torch.Tensor | None = None
    batch_size: int = 8
    results: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    setup_s: float = 0.0
    tasks: list[str] = field(default_factory=list)  # lm-eval tasks run on every row's model (eval.tasks)
    harness: dict[str, Any] = field(default_factory=dict)  # evaluate_tasks' options (eval.harness)
    tokenizer: Any = None

    def task_cells(self, model: torch.nn.Module, key: str) -> dict[str, str]:
        """Run the lm-eval tasks on `model` (as it is now), keep their metrics as results[key] ("fp_tasks",
        "rtn_tasks", "tasks": qat-compare's `tasks` of the QAT row) and return the table's cells:
        {"<task>/<metric>": "value ± stderr"}. Nothing when no task is configured. The seconds go to
        results["tasks_s"]."""
        if not self.tasks:
            return {}
        t0 = time.perf_counter()
        say(f"lm-eval tasks {self.tasks} ...")
        metrics = flat_metrics(evaluate_tasks(model, self.tokenizer, self.tasks, **self.harness))
        self.results[key] = metrics
        self.results["tasks_s"] = self.results.get("tasks_s", 0.0) + time.perf_counter() - t0
        return {name: f"{m['value']:.4f} ± {m['stderr']:.4f}" for name, m in metrics.items()}


class FloatBaseline(pl.Callback):
    """The FP row: perplexity of the float model (quantizers off), before any PTQ initialisation writes solved
    weights into it. Rank 0 only."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        rec, t0 = self.record, time.perf_counter()
        say(f"evaluating the float model on {len(rec.blocks)} {rec.split} blocks ...")
        with quantization_disabled(pl_module.model):
            rec.results["fp_ppl"] = perplexity(pl_module.model, rec.blocks, rec.batch_size)
            seconds = time.perf_counter() - t0
            cells = rec.task_cells(pl_module.model, "fp_tasks")
        fp_bits = float(torch.finfo(next(pl_module.model.parameters()).dtype).bits)
        rec.rows.append({"model": "FP", "ppl": rec.results["fp_ppl"], **cells, "bits/weight (quantized layers)": fp_bits,
                         "bits/weight (all)": fp_bits, "time_s": seconds})
        rec.setup_s += time.perf_counter() - t0


class PTQInit(pl.Callback):
    """PTQ initialisation (init=gptq|awq|rtn): solve the prepared model's grids on training data and pin them
    (results["init_s"]); every rank solves the same problem. `init` is the init node: a PTQ method config plus
    `calibration` {samples, seq_len} and `start` (see qat.ptq.start)."""

    def __init__(self, init: dict[str, Any], record: RunRecord) -> None:
        self.init, self.record = dict(init), record

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        method = dict(self.init)
        calib = method.pop("calibration", None) or {}
        start = method.pop("start", "grid")
        t0 = time.perf_counter()
        say(f"PTQ initialisation: {method['name']} on {calib.get('samples', 32)} x {calib.get('seq_len', 128)} "
            f"tokens, start={start} ...")
        batches = calibration_batches(trainer.datamodule, calib.get("samples", 32), calib.get("seq_len", 128),
                                      batch_rows=8)
        floats = float_weights(pl_module.model) if start == "cell" else None
        apply(pl_module.model, method, batches)
        ptq_start(pl_module.model, start, floats)
        self.record.results["init_s"] = time.perf_counter() - t0
        self.record.setup_s += self.record.results["init_s"]


class CheckpointInit(pl.Callback):
    """init=checkpoint: the trained state of a qat-train checkpoint (latent weights, learned scales and rotations,
    held ranges) loaded into the prepared model before training, whose optimizer and schedule start afresh
    (results["init_s"]). The dynamic activation / KV schemes may differ from the checkpoint's
    (`qat.lit.run_files.load_init_checkpoint`)."""

    def __init__(self, path: str, record: RunRecord) -> None:
        self.path, self.record = str(path), record

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        t0 = time.perf_counter()
        say(f"starting from the trained state of {self.path} ...")
        fresh = load_init_checkpoint(pl_module, self.path)
        if fresh:
            say(f"{len(fresh)} dynamic quantizer(s) the checkpoint did not have (or this recipe drops) start fresh: "
                + ", ".join(fresh[:3]) + (", ..." if len(fresh) > 3 else ""))
        self.record.results["init_s"] = time.perf_counter() - t0
        self.record.setup_s += self.record.results["init_s"]


class StartBaseline(pl.Callback):
    """The QAT starting point's row (round-to-nearest, or the PTQ result with init=...): activation ranges
    initialised as training would, then perplexity and bits per weight. Rank 0 only."""

    def __init__(self, record: RunRecord, name: str, calibrate: bool = True) -> None:
        self.record, self.name, self.calibrate = record, name, calibrate

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        rec, t0 = self.record, time.perf_counter()
        if pl_module.hparams.range_init_batches > 0 and self.calibrate:
            pl_module.range_init(trainer.datamodule.train_dataloader(), pl_module.hparams.range_init_batches)
        say(f"evaluating {self.name} (the QAT starting point) ...")
        rec.results["rtn_ppl"] = perplexity(pl_module.model, rec.blocks, rec.batch_size)
        seconds = time.perf_counter() - t0
        cells = rec.task_cells(pl_module.model, "rtn_tasks")
        q_bits, whole = bits_per_weight(pl_module.model)
        rec.results["bits_per_weight"] = q_bits
        rec.rows.append({"model": self.name, "ppl": rec.results["rtn_ppl"], **cells,
                         "bits/weight (quantized layers)": q_bits, "bits/weight (all)": whole, "time_s": seconds})
        say(f"FP ppl {rec.results['fp_ppl']:.3f}, {self.name} ppl {rec.results['rtn_ppl']:.3f}; training ...")
        rec.setup_s += time.perf_counter() - t0
