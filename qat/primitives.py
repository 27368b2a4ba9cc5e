"""The one quantization numerics: ranges, qparams, quantize, dequantize, fake_quantize.

Fake-quant modules, PTQ algorithms, `convert` and the exporters all call these functions, so a
converted or exported model computes exactly what the fake-quant model computed.

Layout conventions (the "group view"): a per_group tensor is viewed as [..., n_groups, group_size];
every other granularity uses the tensor as is. Ranges, scales and zero-points have the shape of a
keepdim reduction over that view, with leading singleton dims stripped, so that a per-tensor scale
is a 0-d tensor and a per-channel activation scale of a [B, T, C] input is [C]:

    per_tensor   weight [O, I]    scale []
    per_channel  weight [O, I]    scale [O, 1]      (axis=0)
    per_group    weight [O, I]    scale [O, I/g, 1]   (ragged: [O, ceil(I/g), 1], see below)
    per_token    input  [B, T, C] scale [B, T, 1]   (dynamic)

A ragged per_group spec (`QuantSpec.ragged`) lets the last group of a row be shorter. Ranges are taken
on a view whose last group is padded with copies of the row's last element (min, max and the signed peak
are unchanged by them); quantize and dequantize expand each group's qparams to the columns it covers,
so no padded element is ever quantized.

Math (integers are held in float32 while computing, so every step is exact):
    q  = clamp(round(x / scale) + zero_point, qmin, qmax)
    x^ = (q - zero_point) * scale
"""
from __future__ import annotations

import torch

from qat.formats import get_format
from qat.formats.common import signed_peak
from qat.spec import QuantSpec

__all__ = [
    "group_view",
    "is_ragged",
    "qparams_view",
    "compute_range",
    "choose_qparams",
    "held_global_scale",
    "quantize",
    "dequantize",
    "fake_quantize_forward",
    "quant_error_db",
    "check_tensor",
]


def check_tensor(x: torch.Tensor, name: str, spec: QuantSpec | None = None) -> None:
    """Refuse tensors that cannot be quantized: empty, non-finite, or of a shape the spec cannot take.

    Args:
        x: the tensor about to be quantized.
        name: how to call it in the message (a module path and role, say).
        spec: when given, also check that per_group's group size divides the last dimension and that
            per_channel's axis exists.
    Raises:
        ValueError: naming `name` and the problem.

    Example:
        >>> check_tensor(torch.ones(4, 8), "layer.weight")
    """
    if x.numel() == 0:
        raise ValueError(f"{name}: cannot quantize an empty tensor (shape {tuple(x.shape)})")
    if x.is_floating_point() and not x.is_meta and not bool(torch.isfinite(x).all()):  # meta: checked once loaded
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: {n_bad} NaN/inf value(s) in a tensor being quantized (shape {tuple(x.shape)})")
    if spec is not None and spec.granularity == "per_channel" and not -x.ndim <= spec.axis < x.ndim:
        raise ValueError(f"{name}: QuantSpec.axis={spec.axis} is out of range for a {x.ndim}-D tensor "
                         f"(shape {tuple(x.shape)}); choose from {list(range(-x.ndim, x.ndim))}")
    if spec is not None and spec.granularity == "per_group" and not spec.ragged and x.shape[-1] % spec.group_size:
        raise ValueError(
            f"{name}: group_size={spec.group_size} does not divide the last dimension {x.shape[-1]}; "
            f"choose a group size that divides it, or set ragged: true for a shorter last group"
        )


def group_view(x: torch.Tensor, spec: QuantSpec, pad: str = "edge") -> torch.Tensor:
    """View `x` so that one scale covers each reduction: [..., n_groups, group_size] for per_group.

    A ragged spec whose group size does not divide the last dimension pads the last group first:
    with copies of the last element (`pad="edge"`, for ranges) or zeros (`pad="zero"`, for sums).
    """
    if spec.granularity != "per_group":
        return x
    short = -x.shape[-1] % spec.group_size
    if short and spec.ragged:
        tail = x[..., -1:].expand(*x.shape[:-1], short) if pad == "edge" else x.new_zeros(*x.shape[:-1], short)
        x = torch.cat([x, tail], dim=-1)
    return x.unflatten(-1, (-1, spec.group_size))


def is_ragged(x: torch.Tensor, spec: QuantSpec) -> bool:
    """True when `spec` is per_group with a last group shorter than group_size for `x`."""
    return spec.granularity == "per_group" and spec.ragged and x.shape[-1] % spec.group_size != 0


def _per_column(qparam: torch.Tensor, spec: QuantSpec, columns: int) -> torch.Tensor:
    """Group qparams [..., n_groups, 1] expanded to the `columns` they cover: [..., columns]."""
    return qparam[..., 0].repeat_interleave(spec.group_size, dim=-1)[..., :columns]


def reduce_dims(ndim: int, spec: QuantSpec) -> tuple[int, ...]:
    if spec.granularity == "per_tensor":
        return tuple(range(ndim))
    if spec.granularity == "per_channel":
        axis = spec.axis % ndim
        return tuple(d for d in range(ndim) if d != axis)
    return (ndim - 1,)  # per_group (on the group view) and per_token


def strip_leading_ones(t: torch.Tensor) -> torch.Tensor:
    while t.ndim and t.shape[0] == 1:
        t = t.squeeze(0)
    return t


def compute_range(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of `x` over each quantization block, in float32, in the qparams layout.

    Example:
        >>> lo, hi = compute_range(torch.randn(8, 256), QuantSpec(bits=4, granularity="per_group", group_size=128))
        >>> lo.shape
        torch.Size([8, 2, 1])
    """
    view = group_view(x.detach(), spec).float()
    if get_format(spec).peak_range(spec):
        # Q4_0 / Q5_0 / Q3_K / Q6_K scale from the signed element of largest magnitude (the first one on
        # ties, as llama.cpp): both bounds hold it, so choose_qparams sees the sign the format uses.
        peak = signed_peak(view)
        return strip_leading_ones(peak), strip_leading_ones(peak.clone())
    dims = reduce_dims(view.ndim, spec)
    if view.ndim == 0 or len(dims) == view.ndim:
        lo, hi = torch.aminmax(view)
    else:
        lo, hi = view.amin(dim=dims, keepdim=True), view.amax(dim=dims, keepdim=True)
    return strip_leading_ones(lo), strip_leading_ones(hi)


def clip_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A dynamic scheme's range clipped by its `clip_ratio`: both bounds times the ratio (the asymmetric range is
    widened to include 0 after, in `choose_qparams`, as QuaRot's quantizers do); the range as given at 1.

    Example:
        >>> clip_range(torch.tensor(-2.0), torch.tensor(4.0), QuantSpec(bits=4, granularity="per_token", clip_ratio=0.5))
        (tensor(-1.), tensor(2.))
    """
    if spec.clip_ratio == 1.0:
        return lo, hi
    return lo * spec.clip_ratio, hi * spec.clip_ratio


def choose_qparams(
    lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero-point that map [lo, hi] onto the code range of `spec`.

    Symmetric: scale = max(|lo|, |hi|) / ((qmax - qmin) / 2), zero-point None (0), the convention of
    compressed-tensors, GPTQ and torch.ao (unsigned symmetric, for non-negative inputs: hi / qmax). Asymmetric: the range is widened to include 0 so that 0 is
    exact, scale = (hi - lo) / (qmax - qmin), zero-point = clamp(round(qmin - lo / scale)).
    fp8: scale = amax / largest finite value of the fp8 type.
    The scale is rounded to `spec.scale_dtype` and returned in float32.
    `global_scale`: a `static_global` scheme's held global (`held_global_scale`); the block scales go under it.

    Returns:
        (scale, zero_point); zero_point is None for symmetric schemes.
    Example:
        >>> s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(1.0), QuantSpec(bits=8, granularity="per_tensor"))
        >>> float(s), z
        (0.007843137718737125, None)
    """
    if global_scale is not None:
        return get_format(spec).qparams_under(lo.float(), hi.float(), global_scale, spec)
    return get_format(spec).qparams(lo.float(), hi.float(), spec)


def held_global_scale(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The global scale a `static_global` scheme holds, from its calibrated per-tensor range (NVFP4: 448 * 6 / amax,
    compressed-tensors' input_global_scale)."""
    return get_format(spec).static_global(lo.float(), hi.float(), spec)


def qparams_view(x, scale, zero_point, spec, g_idx=None):
    """(view of `x`, scale, zero-point) that broadcast together element by element: the group view, or
    `x` itself with per-column qparams (act-order `g_idx`, or a ragged last group)."""
    if g_idx is None:
        if is_ragged(x, spec):
            zero_point = None if zero_point is None else _per_column(zero_point, spec, x.shape[-1])
            return x, _per_column(scale, spec, x.shape[-1]), zero_point
        return group_view(x, spec), scale, zero_point
    if spec.granularity != "per_group" or x.ndim != 2:
        raise ValueError("g_idx (act-order group index) applies to per_group 2-D weights only")
    scale = scale[..., 0].index_select(1, g_idx)
    zero_point = None if zero_point is None else zero_point[..., 0].index_select(1, g_idx)
    return x, scale, zero_point


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer (or fp8) codes of `x`, in `x`'s shape: int8 for signed, uint8 for unsigned schemes.

    `g_idx` (act-order, GPTQ's desc_act): column i of a per_group weight uses group g_idx[i]'s qparams
    instead of group i // group_size.

    Example:
        >>> spec = QuantSpec(bits=4, granularity="per_tensor")
        >>> quantize(torch.tensor([0.5, -1.0]), torch.tensor(0.125), None, spec)
        tensor([ 4, -8], dtype=torch.int8)
    """
    view, scale, zero_point = qparams_view(x, scale, zero_point, spec, g_idx)
    fmt = get_format(spec)
    codes = fmt.codes(view.float(), scale, zero_point, spec)[0]
    return codes.to(fmt.codes_dtype(spec)).reshape(x.shape)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Real values of `codes`: (codes - zero_point) * scale, computed in float32, returned in `dtype`.

    Example:
        >>> spec = QuantSpec(bits=4, granularity="per_tensor")
        >>> dequantize(torch.tensor([4, -8], dtype=torch.int8), torch.tensor(0.125), None, spec)
        tensor([ 0.5000, -1.0000])
    """
    view, scale, zero_point = qparams_view(codes, scale, zero_point, spec, g_idx)
    t = view.to(torch.float32, copy=True)  # the format computes in place
    return get_format(spec).values(t, scale, zero_point, spec).reshape(codes.shape).to(dtype)


def fake_quantize_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    need_mask: bool = False,
    g_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dequantize(quantize(x)) in one pass, plus the boolean mask of elements inside the code range.

    The arithmetic is the same as `quantize` followed by `dequantize`, operation for operation, so the
    result is bit-identical to them in float32. Autograd wrappers live in `qat.ste`.
    """
    view, scale, zero_point = qparams_view(x, scale, zero_point, spec, g_idx)
    fmt = get_format(spec)
    t, mask = fmt.codes(view.float(), scale, zero_point, spec, need_mask)
    return fmt.values(t, scale, zero_point, spec).reshape(x.shape).to(x.dtype), _flat_mask(mask, x)


def _flat_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if mask is None else mask.reshape(x.shape)


def quant_error_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|x|^2 / |x - x^|^2); inf when exact."""
    x, x_hat = x.detach().double(), x_hat.detach().double()
    noise = (x - x_hat).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(x.pow(2).sum() / noise))
