"""The unfused straight-through estimators (plain STE, LSQ / LSQ+, PACT): each keeps what its backward needs
(a bool mask; LSQ also x^ and x). The gradients they hand out are listed in `qat.ste`'s docstring; `learned_grads`
and `masked_grad` are shared with the memory-lean estimators of `qat.ste.lean`, so both give the same gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qat.primitives import fake_quantize_forward, group_view
from qat.spec import QuantSpec


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient backward.

    Example:
        >>> round_ste(torch.tensor([0.4, 1.6], requires_grad=True)).sum().backward()
    """
    return _RoundSTE.apply(x)


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, spec, g_idx):
        out, mask = fake_quantize_forward(x, scale, zero_point, spec, ctx.needs_input_grad[0], g_idx)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return masked_grad(grad, mask), None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize with the plain straight-through estimator: gradient 1 inside the range, 0 outside.

    Scale and zero-point are treated as constants. Only a boolean mask is kept for backward.

    Example:
        >>> x = torch.randn(4, 8, requires_grad=True)
        >>> fake_quantize(x, torch.tensor(0.1), None, QuantSpec(bits=4, granularity="per_tensor")).sum().backward()
    """
    zero_point = None if zero_point is None else zero_point.detach()
    return _FakeQuantSTE.apply(x, scale.detach(), zero_point, spec, g_idx)


def lsq_grad_scale(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> float:
    """LSQ's gradient scale 1 / sqrt(N * qmax), N = number of elements sharing one scale."""
    per_scale = x.numel() / max(scale.numel(), 1)
    return 1.0 / math.sqrt(per_scale * max(spec.qmax, 1))


class _LearnedFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, spec, mode, grad_scale):
        out, mask = fake_quantize_forward(x, scale, zero_point, spec, need_mask=True)
        ctx.spec, ctx.mode, ctx.grad_scale = spec, mode, grad_scale
        ctx.has_zero_point = zero_point is not None
        ctx.save_for_backward(x if mode == "lsq" else None, out, mask, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out, mask, scale = ctx.saved_tensors
        grad_x, grad_scale, grad_zero = learned_grads(grad, x, out, mask, scale, ctx.has_zero_point, ctx.spec,
                                                      ctx.mode, ctx.grad_scale)
        return grad_x, grad_scale, grad_zero, None, None, None


def learned_grads(grad, x, out, mask, scale, has_zero_point: bool, spec: QuantSpec, mode: str, grad_scale: float):
    """(dx, dscale, dzero_point) of a learned fake quant (see the module docstring), given the incoming gradient,
    the input, the fake-quantized output and the inside mask; dzero_point is None without a zero-point."""
    g = group_view(grad, spec, pad="zero").float()  # padding of a ragged last group adds nothing
    m = group_view(mask, spec)
    outside = ~m
    if mode == "lsq":
        elem = (group_view(out, spec).float() - group_view(x, spec).float() * m) / scale
        scale_weight = grad_scale
    else:  # pact: only clipped elements move the clip
        elem = group_view(out, spec).float() * outside / scale
        scale_weight = 1.0
    d_scale = _sum_to(g * elem, scale) * scale_weight
    d_zero = _sum_to(g * outside * (-scale), scale) * grad_scale if has_zero_point else None
    return masked_grad(grad, mask), d_scale, d_zero


def masked_grad(grad: torch.Tensor, mask: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """grad where mask, else 0: the STE's gradient (in place: on `grad`, a backward's own temporary).

    torch.where runs several times faster on CPU than `grad * mask` (whose bool -> float promotion takes a slow
    path); the values are equal (a masked element is +0 where the product gave -0).
    """
    if in_place:
        return torch.where(mask, grad, grad.new_zeros(()), out=grad)
    return torch.where(mask, grad, 0.0)


def _sum_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a group-view tensor down to the qparams layout of `like` (leading ones stripped)."""
    if like.ndim == 0:
        return t.sum()
    lead = t.ndim - like.ndim
    t = t.sum(dim=tuple(range(lead))) if lead else t
    dims = tuple(d for d in range(like.ndim) if like.shape[d] == 1 and t.shape[d] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def learned_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    mode: str,
    grad_scale: float | None = None,
) -> torch.Tensor:
    """Fake-quantize with a learned scale (LSQ / LSQ+) or a learned clip (PACT, scale = clip / half-range).

    The forward value is exactly `fake_quantize_forward(x, scale, zero_point, spec)`.

    Args:
        mode: "lsq" (scale gets the LSQ gradient, scaled by 1/sqrt(N qmax)) or "pact" (scale gets
            gradient from clipped elements only). A zero_point that requires grad gets the LSQ+ gradient.
        grad_scale: LSQ's gradient scale (default `lsq_grad_scale(x, scale, spec)`: N = the elements per scale).
    Example:
        >>> s = torch.tensor(0.1, requires_grad=True)
        >>> learned_fake_quantize(torch.randn(16), s, None, QuantSpec(bits=4, granularity="per_tensor"), "lsq").sum().backward()
    """
    if grad_scale is None:
        grad_scale = lsq_grad_scale(x, scale, spec)
    return _LearnedFakeQuant.apply(x, scale, zero_point, spec, mode, grad_scale)


@dataclass
class FakeQuantArgs:
    """How one tensor is fake-quantized: qparams (differentiable when learned), scheme and estimator.

    mode: "ste" (plain STE; scale and zero_point are constants), "lsq" or "pact" (learned, see
    `learned_fake_quantize`); grad_scale is LSQ's 1/sqrt(N qmax); g_idx the act-order group index (ste only).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor | None
    spec: QuantSpec
    mode: str = "ste"
    g_idx: torch.Tensor | None = None
    grad_scale: float = 1.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x fake-quantized with this estimator (the unfused path)."""
        if self.mode == "ste":
            return fake_quantize(x, self.scale, self.zero_point, self.spec, self.g_idx)
        return learned_fake_quantize(x, self.scale, self.zero_point, self.spec, self.mode, self.grad_scale)
