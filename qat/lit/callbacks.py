"""Callbacks: per-layer quantizer statistics and plain-text progress for non-interactive runs."""
from __future__ import annotations

import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch

from qat.primitives import fake_quantize_forward


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
