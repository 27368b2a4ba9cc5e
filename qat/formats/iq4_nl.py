"""GGUF IQ4_NL (grid="iq4_nl"): 16 non-uniform levels under one fp16 scale per block of 32 weights.

    x^ = d * KVALUES[idx],  KVALUES = llama.cpp's kvalues_iq4nl,  idx in 0..15 (the code, unsigned)

A block is 18 bytes (4.5 bits per weight): the fp16 d, then 16 bytes where byte j holds idx[j] in its low
nibble and idx[j + 16] in its high nibble; `gguf.quants.dequantize` decodes it as float32(d) * KVALUES[idx],
which is exactly what `values` computes, so fake quant, convert and the GGUF file agree bit for bit.

The grid a model trains on (`qparams`): d = fp16(peak / KVALUES[0]) with the peak the signed element of
largest magnitude (llama.cpp's starting scale: the peak lands on -127), and each weight takes the nearest
level of x / d (ties to the upper level, as llama.cpp's best_index_int8). Float weights exported to IQ4_NL
(`encode`) first search the scale as llama.cpp's quantize_row_iq4_nl_impl does (ntry = 7: the least-squares
scale of 16 candidate level assignments, weighted by x^2 or by an imatrix), then take the same grid.

Learned scales (learn="lsq", what a recipe with `gguf_fallback: true` trains IQ4_XS's short rows on when the
recipe learns IQ4_XS's scales): the parameter is the signed scale in float32 (a positive peak takes a negative
scale), rounded to fp16 (the d the block stores) in every forward; the LSQ gradient passes straight through.

Storage of a converted weight: the indices packed at 4 bits and the fp16 scales (the block's bytes).
"""
from __future__ import annotations

import math

import torch

from qat.errors import ConfigError
from qat.formats.base import Format, GGUFType, register_format
from qat.formats.common import divide, fixed_sum, half_bytes, mean_square, signed_peak
from qat.packing import pack, unpack
from qat.spec import QuantSpec

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
LEVELS = torch.tensor(KVALUES, dtype=torch.float32)
_MIDS = (LEVELS[1:] + LEVELS[:-1]) / 2  # exact halves of integers
# x / d inside [first level - half its step, last level + half its step] is not clipped (the STE mask)
LOW, HIGH = KVALUES[0] - (KVALUES[1] - KVALUES[0]) / 2, KVALUES[-1] + (KVALUES[-1] - KVALUES[-2]) / 2
NTRY = 7


def iq4_nl_spec(**changes) -> QuantSpec:
    """The QuantSpec whose grid is GGUF IQ4_NL (`changes`: learn="lsq" for a learned block scale).

    Example:
        >>> iq4_nl_spec().describe()
        'int4 sym g32 iq4_nl'
    """
    return QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=32, scale_dtype="fp16", grid="iq4_nl",
                     **changes)


# The midpoints are multiples of 1/2, so the nearest level (ties up) of t depends on floor(2 t) alone: a table over
# floor(2 t) in [_U0, _U1] (clamped beyond) replaces bucketize's binary search, which is ~1.3x slower on CPU.
_U0, _U1 = int(2 * _MIDS[0]) - 1, int(2 * _MIDS[-1])
_TABLE = torch.bucketize(torch.arange(_U0, _U1 + 1, dtype=torch.float32) / 2, _MIDS, right=True)  # exact: CPU, / 2


def nearest_level(t: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of t (float32), ties to the upper one (`torch.bucketize(t, mids, right=True)`)."""
    return _TABLE.to(t.device)[t.mul(2).floor_().clamp_(_U0, _U1).sub_(_U0).long()]


def _ls_scale(x, w, idx):
    """(sum w q x, sum w q^2) of the levels `idx` per block: the least-squares scale is their ratio."""
    q = LEVELS.to(x.device)[idx]
    wq = w * q
    return fixed_sum(wq * x), fixed_sum(wq * q)


def fit_scale(x: torch.Tensor, importance: torch.Tensor | None = None, sigma2: torch.Tensor | None = None) -> torch.Tensor:
    """llama.cpp's scale search per block of `x` [..., 32] (quantize_row_iq4_nl_impl with ntry = 7): start from
    d = peak / 127 and try the levels of 1 / id = peak / (KVALUES[0] + k), k = -7..7, keeping the least-squares
    scale of the assignment with the smallest weighted error. Weights: x^2, or with an `importance` (imatrix
    column statistic, broadcastable to x) imp * sqrt(sigma^2 + x^2), sigma^2 = 2 mean(x^2) over the block unless
    `sigma2` (broadcastable to x) gives it (IQ4_XS takes it over the super-block). Returns the unrounded d [..., 1],
    computed in float32 with block sums in one order on every device (`fixed_sum`)."""
    x = x.float()
    if importance is None:
        w = x * x
    else:
        sigma2 = 2 * mean_square(x) if sigma2 is None else sigma2
        w = importance * (sigma2 + x * x).sqrt()
    peak = signed_peak(x)
    live = peak.abs() >= 1e-15  # GROUP_MAX_EPS: such a block stores d = 0
    safe = torch.where(live, peak, torch.ones_like(peak))
    sqx, sq2 = _ls_scale(x, w, nearest_level(x * (KVALUES[0] / -safe)))  # id = 1 / d, d = -peak / KVALUES[0]
    d = torch.where(sq2 > 0, sqx / sq2.clamp(min=1e-30), torch.zeros_like(sqx))
    best = d * sqx
    for k in range(-NTRY, NTRY + 1):
        sqx, sq2 = _ls_scale(x, w, nearest_level(x * ((k + KVALUES[0]) / safe)))
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = torch.where(better, sqx / sq2.clamp(min=1e-30), d)
        best = torch.where(better, d * sqx, best)
    return torch.where(live, d, torch.zeros_like(d))


def iq4_nl_blocks(codes: torch.Tensor, scale: torch.Tensor, zero_point=None) -> torch.Tensor:
    """GGUF IQ4_NL blocks [rows, cols / 32 * 18] from indices [rows, cols] (uint8) and scales [rows, cols / 32, 1]."""
    c = codes.reshape(-1, 32).to(torch.uint8)
    qs = c[:, :16] | (c[:, 16:] << 4)
    return torch.cat([half_bytes(scale.reshape(-1, 1)), qs], 1).reshape(codes.shape[0], -1)


def fitted_scale(w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """The searched, fp16-rounded scales [rows, cols / 32, 1] of float rows `w` (weighted by `importance` [cols],
    an imatrix or GPTQ's diag(H), when given): what the GGUF encoder stores, on this format's grid."""
    imp = None if importance is None else importance.float().reshape(1, -1, 32)
    return fit_scale(w.reshape(w.shape[0], -1, 32), imp).to(torch.float16).float()


def _encode(w: torch.Tensor, importance: torch.Tensor | None = None, values: bool = True):
    """Blocks and (when `values`) decoded values of one chunk of rows: the IQ4_NL grid on the searched scales."""
    spec = iq4_nl_spec()
    view = w.reshape(w.shape[0], -1, 32)
    scale = fitted_scale(w, importance)
    codes, _ = FORMAT.codes(view, scale, None, spec)
    blocks = iq4_nl_blocks(codes.reshape(w.shape), scale)
    return blocks, FORMAT.values(codes, scale, None, spec).reshape(w.shape) if values else None


class IQ4NLFormat(Format):
    """GGUF IQ4_NL; see the module docstring."""

    name, grid, dtypes = "iq4_nl", "iq4_nl", ("int",)
    signed_scales = True
    gguf = (GGUFType("IQ4_NL", 32, 18, iq4_nl_spec, _encode, iq4_nl_blocks, weighted=True),)

    def check(self, spec: QuantSpec) -> None:
        if (spec.bits != 4 or not spec.symmetric or spec.granularity != "per_group" or spec.group_size != 32
                or spec.scale_dtype != "fp16" or spec.learn not in ("none", "lsq") or spec.signed):
            raise ConfigError("QuantSpec.grid='iq4_nl' needs bits=4, symmetric=True, granularity='per_group', "
                             "group_size=32, scale_dtype='fp16', learn 'none' or 'lsq', signed left to its default")

    def default_signed(self, spec: QuantSpec) -> bool:
        return False  # the codes are level indices 0..15

    def gguf_type(self, spec: QuantSpec) -> str | None:
        return "IQ4_NL"

    def peak_range(self, spec: QuantSpec) -> bool:
        return True

    def qparams(self, lo, hi, spec):
        return divide(lo, KVALUES[0]).to(torch.float16).float(), None

    def codes(self, view, scale, zero_point, spec, need_mask=False):
        t = torch.where(scale != 0, view / torch.where(scale != 0, scale, torch.ones_like(scale)), 0.0)
        mask = t.ge(LOW).logical_and_(t.le(HIGH)) if need_mask else None
        return nearest_level(t).float(), mask

    def values(self, t, scale, zero_point, spec):
        return LEVELS.to(t.device)[t.long()] * scale

    def pack(self, codes, scale, zero_point, spec):
        return {"packed": pack(codes.to(torch.uint8), 4), "scale": scale.detach().to(torch.float16).clone(),
                "zero_point": torch.empty(0, dtype=torch.uint8, device=scale.device)}

    def unpack(self, stored, spec, shape):
        codes = unpack(stored["packed"], 4, math.prod(shape)).reshape(shape)
        return codes, stored["scale"].float(), None

    def storage_bits(self, spec, shape):
        return 8 * self.packed_nbytes(spec, shape) + 16 * (math.prod(shape) // 32)


FORMAT = register_format(IQ4NLFormat())
