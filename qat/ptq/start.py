"""Where QAT starts from a PTQ solution (`qat-train init=gptq|awq|rtn`, option `init.start`).

No Lightning here: `qat.lit.run` calls `float_weights` before the PTQ solve and `ptq_start` after it.
"""
from __future__ import annotations

import torch
from torch import nn

from qat.errors import ConfigError
from qat.primitives import fake_quantize_forward, qparams_view
from qat.ptq.runner import quantized_linears

INIT_STARTS = ("cell", "grid", "track")  # see ptq_start


def float_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every quantized linear's weight by module name (what "cell" moves back towards)."""
    return {name: m.weight.detach().clone() for name, m in quantized_linears(model).items()}


@torch.no_grad()
def ptq_start(model: nn.Module, start: str, floats: dict[str, torch.Tensor] | None = None) -> int:
    """Where QAT starts from a PTQ solution (init.start); returns how many weights were changed.

    GPTQ leaves each weight ON its grid points (the dequantized solution) with pinned qparams.
    Trained from there, a weight must move half a grid step before its code changes: at QAT learning
    rates that takes hundreds of steps, so the codes barely move (measured: QAT from a GPTQ start gained
    a fraction of what the same run from an RTN start did). The starts:
        "grid":  as PTQ left it (codes frozen in practice).
        "cell":  same codes and qparams, so the same model at step 0, but each latent weight moved back
                 towards its float value, as far as its code's cell allows (0.49 step around the grid
                 point): codes then flip as readily as from an RTN start. Only weights left on grid points
                 move (RTN and AWQ keep float latent weights already); any whose code would change
                 (checked with the fake-quant forward) stay where they were.
        "track": the PTQ weights with the qparams unpinned: ranges follow the weights again (min-max), so
                 the start is not the PTQ result (the grid is recomputed from the solved weights).
    Args:
        model: a prepared model after `qat.ptq.apply`.
        floats: the float weights before PTQ by module name (needed by "cell").
    Raises:
        ValueError: an unknown start, or "cell" without float weights.
    Example:
        >>> floats = float_weights(model); qat.ptq.apply(model, "gptq", batches); ptq_start(model, "cell", floats)
    """
    if start not in INIT_STARTS:
        raise ConfigError(f"init.start={start!r}; choose from {list(INIT_STARTS)}")
    if start == "cell" and floats is None:
        raise ValueError("init.start=cell needs the float weights from before the PTQ solve")
    changed = 0
    for name, m in quantized_linears(model).items():
        q = m.weight_quantizer
        if start == "track" and q.pinned:
            empty = torch.empty(0, device=q.pinned_scale.device)
            q.pinned_scale, q.pinned_zero_point, q.g_idx = empty, empty.clone(), empty.clone()
            q.observing = True
            q.initialize(m.weight)
            changed += m.weight.numel()
        elif start == "cell" and name in floats and q.spec.grid == "uniform" and not q.spec.is_float:
            changed += _into_cell(m, floats[name])
    return changed


def _into_cell(module, w_float: torch.Tensor) -> int:
    q, w_hat = module.weight_quantizer, module.weight.detach().clone()
    scale, zero_point = q.qparams(w_hat)
    scale, zero_point = scale.detach(), None if zero_point is None else zero_point.detach()
    g_idx = q.group_index()
    target = fake_quantize_forward(w_hat, scale, zero_point, q.spec, g_idx=g_idx)[0]  # the step-0 weight
    on_grid = target == w_hat  # AWQ / RTN keep float latent weights: nothing to move there
    if not on_grid.any():
        return 0
    view_hat, s, _ = qparams_view(target, scale, zero_point, q.spec, g_idx)
    view_ref = qparams_view(w_float.to(w_hat), scale, zero_point, q.spec, g_idx)[0]
    half = 0.49 * s  # strictly inside the cell: round() keeps the code
    latent = torch.minimum(torch.maximum(view_ref, view_hat - half), view_hat + half).reshape(w_hat.shape)
    keep = on_grid & (fake_quantize_forward(latent, scale, zero_point, q.spec, g_idx=g_idx)[0] == target)
    latent = torch.where(keep, latent, w_hat)
    module.weight.copy_(latent)
    return int((latent != w_hat).sum())
