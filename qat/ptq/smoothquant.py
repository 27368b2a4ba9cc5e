"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights before W8A8.

s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) per input channel j (max over all consumers' weights),
folded into the producer (the norm before q/k/v and before gate/up), so the float model is unchanged.
Weights are then quantized round-to-nearest (per channel for the W8A8 recipes) and pinned; static
activation ranges are calibrated block by block by the runner on the smoothed inputs.

This module holds the scale; the method (block driver, options) is `qat.ptq.methods.smoothquant`.
"""
from __future__ import annotations

from typing import Sequence

import torch


def smooth_scale(act_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """s = act_max^alpha / w_max^(1 - alpha); channels never active (or with all-zero weights) keep s = 1.

    Example:
        >>> s = smooth_scale(stats.abs_max, [q.weight, k.weight, v.weight], alpha=0.5)
    """
    w_max = torch.cat([w.detach().float().abs() for w in weights], 0).amax(0)
    act_max = act_max.float()
    s = act_max.pow(alpha) / w_max.pow(1 - alpha)
    ok = (act_max > 0) & (w_max > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp(min=1e-5), torch.ones_like(s))
