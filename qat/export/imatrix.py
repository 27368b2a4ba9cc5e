"""Importance-aware GGUF export: per-input-column activation statistics, like llama.cpp's imatrix.

`collect_importance(model, batches)` runs calibration batches and records, for every linear layer, the mean
of x^2 per input column (the diagonal of X^T X / n, what the layer's output error weighs each weight column
by). `export_gguf(..., importance=...)` hands it to the K-quant fit: sub-block scales and minimums are chosen
to minimise sum_j imp_j (x_j - x^_j)^2 instead of the unweighted error (the weights of llama.cpp's quantizers
with an imatrix: imp_j * sqrt(sigma^2 + x_j^2)). The grid and the block layout are unchanged, so any runtime
reads the file; only which grid points are chosen differs.

Example:
    >>> imp = collect_importance(model, calibration_batches)
    >>> export_gguf(model, "m.gguf", "Q4_K_M", importance=imp)
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from qat.errors import ConfigError


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or hasattr(module, "in_features") and hasattr(module, "out_features")


@torch.no_grad()
def collect_importance(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean squared input activation per column of every linear layer: {"<module>.weight": [in_features]}.

    Raises:
        ValueError: no batch given, or the model has no linear layer.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args, _output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and _is_linear(m)]
    if not handles:
        raise ConfigError("collect_importance: the model has no linear layers")
    n_batches = 0
    try:
        for batch in batches:
            model(batch)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0:
        raise ConfigError("collect_importance: no calibration batches given")
    return {f"{n}.weight": sums[n] / counts[n] for n in sums}
