"""Block grids of other formats, registered by name: what `QuantSpec.grid` selects besides "uniform".

`qat.primitives` dispatches here for a non-uniform grid, so fake quant, convert, PTQ and the GGUF encoders
still share one implementation per grid:

    ggml     llama.cpp's legacy blocks Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 (as gguf-py computes them)
    ggml_k   the K-quants Q2_K..Q6_K: sub-block scales (and minimums) quantized under fp16 super-block scales

A grid gives `qparams(lo, hi, spec)`, `codes(view, scale, zp, spec, need_mask) -> (codes, mask)` and
`values(codes, scale, zp)`, and says whether its range is the signed peak element (`peak_range`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qat.spec import GGML_K, QuantSpec


@dataclass(frozen=True)
class Grid:
    qparams: Callable
    codes: Callable
    values: Callable
    peak_range: Callable[[QuantSpec], bool]


def _ggml_qparams(lo, hi, spec):
    """llama.cpp's legacy blocks (as gguf-py computes them, in float32). The scale is returned unrounded:
    codes are computed with it, and `dequantize` rounds it (and Q4_1/Q5_1's float minimum) to fp16,
    which is what the block stores. Q4_0/Q5_0 take the element of largest magnitude with its sign
    (`compute_range` gives lo == hi == that element for these grids; ties |lo| == hi otherwise resolve to hi)."""
    if spec.bits == 8:
        return torch.maximum(lo.abs(), hi.abs()) / 127, None
    if spec.symmetric:
        signed_max = torch.where(hi >= -lo, hi, lo)
        return signed_max / -(2 ** (spec.bits - 1)), None
    return (hi - lo) / (2**spec.bits - 1), lo.clone()


HALF_DOWN = 0.5 - 2.0**-25  # the float32 just below 0.5
"""trunc(t + HALF_DOWN * sign(t)) is roundf(t) (half away from zero) for every float32 t, checked exhaustively
(t + 0.5 would round up at t = 0.49999997). torch's trunc, where and argmax are slow scalar loops on CPU;
float -> int8 conversion truncates and is vectorised, so the grids below are written with it."""


def signed_peak(view: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude with its sign, per block of `view` [..., n] -> [..., 1]: the first
    one when +m and -m tie (and the first zero of an all-zero block, keeping its sign), as
    `view.gather(-1, view.abs().argmax(-1, keepdim=True))` (numpy's and llama.cpp's choice), ~10x faster.

    Example:
        >>> signed_peak(torch.tensor([[1.0, -3.0, 3.0]]))
        tensor([[-3.]])
    """
    hi, lo = view.amax(-1, keepdim=True), view.amin(-1, keepdim=True)
    peak = torch.where(hi > -lo, hi, lo)
    tie = hi == -lo
    if bool(tie.any()):  # only these blocks need the first index
        rows = view[tie.squeeze(-1)]
        peak[tie] = rows.gather(-1, rows.abs().argmax(-1, keepdim=True)).squeeze(-1)
    return peak


def block_range(view: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) per block of `view` [..., n_blocks, group] for a ggml / ggml_k grid: equal to
    `qat.primitives.compute_range` on that view (the signed peak twice for peak-range grids, else min and max)."""
    if GRIDS[spec.grid].peak_range(spec):
        peak = signed_peak(view)
        return peak, peak.clone()
    return view.amin(-1, keepdim=True), view.amax(-1, keepdim=True)


def _safe_inverse(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)


def ggml_stored_bounds(spec: QuantSpec) -> tuple[int, int]:
    """The range of the integer a legacy block stores: Q8_0's signed code, else code + offset in [0, 2^bits)."""
    return (spec.qmin, spec.qmax) if spec.bits == 8 else (0, 2**spec.bits - 1)


def ggml_offset(spec: QuantSpec) -> int:
    """stored = code + offset (Q4_0 / Q5_0 store code + 2^(bits-1); Q8_0, Q4_1, Q5_1 store the code)."""
    return 2 ** (spec.bits - 1) if spec.symmetric and spec.bits != 8 else 0


def ggml_shifted(view, scale, zero_point, spec, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Float y whose truncation toward zero is the stored integer before clamping, gguf-py's arithmetic
    step for step: Q8_0 roundf(x/d) (via HALF_DOWN), Q4_0/Q5_0 trunc(x/d + 2^(b-1) + 0.5), Q4_1/Q5_1
    trunc((x - min)/d + 0.5); the inverse scale is 0 where the scale is 0, as in gguf-py.
    `scratch` (float32 [2, *view.shape]), when given, holds y and Q8_0's sign: reused across chunks, it
    spares the page faults of fresh temporaries (glibc returns freed megabytes to the OS)."""
    y, sgn = (None, None) if scratch is None else (scratch[0], scratch[1])
    inv = _safe_inverse(scale)
    if spec.bits == 8:
        # a float32-denormal scale has an infinite inverse: gguf-py's roundf gives NaN there, which its int8
        # cast stores as 0 (x86); a zero inverse gives that code 0 (the fp16 scale is 0: it decodes to 0)
        t = torch.mul(view, inv.nan_to_num_(posinf=0.0), out=y)
        return t.add_(torch.sign(t, out=sgn), alpha=HALF_DOWN)  # alpha * sign is exact: one rounding
    if spec.symmetric:
        return torch.mul(view, inv, out=y).add_(2 ** (spec.bits - 1) + 0.5)
    return torch.sub(view, zero_point, out=y).mul_(inv).add_(0.5)


def ggml_stored_codes(view, scale, zero_point, spec, scratch: torch.Tensor | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 tensor of the integers the legacy blocks store (see `ggml_offset`), the export's fast path;
    `scratch` as for `ggml_shifted`, `out`: an int8 tensor of `view`'s shape to write the codes into.

    Example:
        >>> spec = QuantSpec(bits=4, granularity="per_group", group_size=32, scale_dtype="fp16", grid="ggml")
        >>> ggml_stored_codes(torch.full((1, 32), -1.0), torch.tensor([[0.125]]), None, spec)[0, :2]
        tensor([0, 0], dtype=torch.int8)
    """
    lo, hi = ggml_stored_bounds(spec)
    # trunc(clamp(y)) == clamp(trunc(y)) for integer bounds; the int8 conversion truncates
    y = ggml_shifted(view, scale, zero_point, spec, scratch).clamp_(lo, hi)
    return y.to(torch.int8) if out is None else out.copy_(y)


def _ggml_codes(view, scale, zero_point, spec, need_mask=False):
    """Codes (in float32) of the ggml grid; mask: the unclamped code lies in [qmin, qmax]."""
    lo, hi = ggml_stored_bounds(spec)
    y = ggml_shifted(view, scale, zero_point, spec)
    mask = y.gt(lo - 1).logical_and_(y.lt(hi + 1)) if need_mask else None  # trunc(y) in [lo, hi]
    t = y.clamp_(lo, hi)
    t = t.to(torch.int8).float() if lo < 0 else t.floor_()  # trunc: clamped y is >= 0 below 8 bits
    off = ggml_offset(spec)
    return (t.sub_(off) if off else t), mask


def _ggml_values(t, scale, zero_point):
    t = t * scale.to(torch.float16).float()
    return t if zero_point is None else t + zero_point.to(torch.float16).float()


def _super_view(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Sub-block values [..., n_sub, 1] -> [..., n_super, subs per super-block of 256]. A row that is not a
    multiple of 256 ends in a partial super-block (zero-padded here; GGUF cannot store it, and the GGUF
    writer falls back to another type for such tensors, as llama.cpp does)."""
    per = 256 // spec.group_size
    flat = t.reshape(*t.shape[:-2], -1)
    pad = (-flat.shape[-1]) % per
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(*flat.shape[:-1], -1, per)


def _from_super(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t.reshape(*t.shape[:-2], -1)[..., : shape[-2]].reshape(shape)


def _second_level_codes(values: torch.Tensor, smax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative sub-block values -> (fp16-exact super-scale, integer codes 0..smax), as llama.cpp."""
    vmax = values.amax(-1, keepdim=True)
    inv = torch.where(vmax > 0, smax / vmax, torch.zeros_like(vmax))
    return (vmax / smax).to(torch.float16).float(), torch.round(inv * values).clamp_(0, smax)


def _kquant_qparams(lo, hi, spec):
    """K-quant qparams: the effective sub-block scale d*sc (and minimum dmin*m, held in zero_point and
    subtracted: x^ = scale*q - zero_point), with d, dmin fp16 super-block scales and sc, m integer codes.
    Asymmetric (Q2_K/Q4_K/Q5_K): scale = (hi - min(lo, 0)) / qmax, minimum = -min(lo, 0), then both
    quantized. Symmetric (Q3_K/Q6_K): lo == hi == the signed peak (see compute_range), scale = peak /
    qmin, then signed sub-scales sc = round(-smax / peak_scale * scale) under d = fp16(peak_scale / -smax)."""
    smax = GGML_K[spec.bits][3]
    shape = lo.shape
    if not spec.symmetric:
        lo = lo.clamp(max=0)
        d, sc = _second_level_codes(_super_view((hi - lo) / spec.qmax, spec), smax)
        dmin, m = _second_level_codes(_super_view(-lo, spec), smax)
        return _from_super(d * sc, shape), _from_super(dmin * m, shape)
    scale = _super_view(lo / spec.qmin, spec)
    peak = signed_peak(scale)
    nz = peak != 0
    iscale = torch.where(nz, -smax / torch.where(nz, peak, torch.ones_like(peak)), torch.zeros_like(peak))
    sc = torch.round(iscale * scale).clamp_(-smax, smax - 1)
    d = torch.where(nz, (1 / torch.where(nz, iscale, torch.ones_like(iscale))).to(torch.float16).float(), torch.zeros_like(peak))
    return _from_super(d * sc, shape), None


def _kquant_codes(view, scale, zero_point, spec, need_mask=False):
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    t = torch.round((view if zero_point is None else view + zero_point) / safe)
    t = torch.where(scale != 0, t, torch.zeros_like(t))
    mask = t.ge(spec.qmin).logical_and_(t.le(spec.qmax)) if need_mask else None
    return t.clamp_(spec.qmin, spec.qmax), mask


def _kquant_values(t, scale, zero_point):
    t = t * scale
    return t if zero_point is None else t - zero_point


def _symmetric_sub8(spec: QuantSpec) -> bool:
    return spec.symmetric and spec.bits != 8


GRIDS: dict[str, Grid] = {
    "ggml": Grid(_ggml_qparams, _ggml_codes, _ggml_values, _symmetric_sub8),
    "ggml_k": Grid(_kquant_qparams, _kquant_codes, _kquant_values, _symmetric_sub8),
}
