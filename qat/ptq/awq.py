"""AWQ (Lin et al. 2023): activation-aware per-channel weight scaling, then a clipping search.

For each mapping (producer -> consumer linears) the scale is s = mean|x|^r normalised by
sqrt(max(s) min(s)), r on a grid of `n_grid` points in [0, 1); the r that minimises the output error of
the quantized consumers is kept and folded into the producer (so the float model is unchanged). Then,
per output row and group, the clipping ratio of the weight range (1 down to 1 - max_shrink) that
minimises the group's output error is searched, and the resulting qparams are pinned.

Output errors are computed exactly from the input Gram matrix G = sum x x^T:
||X dW^T||^2 = sum((dW G) * dW), so each grid point costs one [O, I] x [I, I] product instead of a pass
over all calibration tokens. The error is the sum over the consumer linears' outputs (the reference
measures it after the attention / MLP block; the linear outputs are what the scaling acts on).

This module holds the pure searches; the method (block driver, options) is `qat.ptq.methods.awq`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from qat.observers import build_observer
from qat.primitives import choose_qparams, compute_range, fake_quantize_forward, group_view
from qat.spec import QuantSpec


def output_error(dw: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """||X dW^T||^2 from the Gram matrix of X: sum((dW G) * dW)."""
    return (dw @ gram).mul_(dw).sum()


def rtn_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest fake quantization of `w` with the scheme's own observer."""
    scale, zp = choose_qparams(*build_observer(spec).range_of(w), spec)
    return fake_quantize_forward(w, scale, zp, spec)[0]


@torch.no_grad()
def search_scale(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], x_mean: torch.Tensor,
                 specs: Sequence[QuantSpec], n_grid: int = 20, duo_scaling: bool = False):
    """AWQ's grid search of the per-input-channel scale for linears sharing one input.

    Args:
        weights: the consumers' [O_k, I] weights.
        grams: their input Gram matrices [I, I] (all the same input, so usually the same matrix).
        x_mean: mean |x| per input channel [I].
        specs: their weight schemes.
    Returns:
        (best scale [I], its error, the error at r = 0 (plain RTN)).
    Example:
        >>> s, err, err_rtn = search_scale([fc.weight], [g], stats.mean_abs(), [spec])
    """
    x_mean = x_mean.float()
    specs = [s.replace(observer="minmax", observer_args={}) for s in specs]  # as llm-awq; clipping comes after
    w_mean = _weight_mean(weights, specs) if duo_scaling else None
    best = (None, math.inf)
    base = None
    for k in range(n_grid):
        r = k / n_grid
        s = x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4) if duo_scaling else x_mean.pow(r)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(float(output_error(rtn_weight(w.float() * s, spec) / s - w.float(), g))
                  for w, g, spec in zip(weights, grams, specs))
        base = err if base is None else base
        if err < best[1]:
            best = (s, err)
    return best[0], best[1], base


def _weight_mean(weights, specs) -> torch.Tensor:
    parts = []
    for w, spec in zip(weights, specs):
        v = w.detach().float().abs()
        v = group_view(v, spec) if spec.granularity == "per_group" else v.unsqueeze(1)
        parts.append((v / v.amax(-1, keepdim=True).clamp(min=1e-8)).flatten(1)[:, :w.shape[1]])
    return torch.cat(parts, 0).mean(0)


@torch.no_grad()
def search_clip(w: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, n_grid: int = 20, max_shrink: float = 0.5):
    """Per (row, group) clipping ratio of the min-max range minimising the group's output error.

    Returns:
        (scale, zero_point) in the qparams layout of `spec`, ready for `set_qparams`.
    Example:
        >>> scale, zp = search_clip(fc.weight, stats.gram, spec)
    """
    w = w.detach().float()
    O, I = w.shape
    g = spec.group_size if spec.granularity == "per_group" else I
    pad = -I % g  # a ragged last group: zero padding adds no error
    ng = (I + pad) // g
    gram = torch.nn.functional.pad(gram, (0, pad, 0, pad))
    blocks = torch.stack([gram[k * g:(k + 1) * g, k * g:(k + 1) * g] for k in range(ng)]).float()
    lo, hi = compute_range(w, spec)
    best_lo, best_hi, best_err = lo, hi, None
    for k in range(max(1, int(max_shrink * n_grid))):
        ratio = 1.0 - k / n_grid
        scale, zp = choose_qparams(lo * ratio, hi * ratio, spec)
        d = torch.nn.functional.pad(fake_quantize_forward(w, scale, zp, spec)[0] - w, (0, pad))
        d = d.view(O, ng, g).transpose(0, 1)
        err = (torch.bmm(d, blocks) * d).sum(-1).t()  # [O, ng]
        err = err.sum() if spec.granularity == "per_tensor" else err.reshape(lo.shape)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo * ratio, best_lo), torch.where(better, hi * ratio, best_hi)
    return choose_qparams(best_lo, best_hi, spec)
