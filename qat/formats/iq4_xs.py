"""GGUF IQ4_XS (grid="iq4_xs"): IQ4_NL's 16 non-uniform levels under two-level scales, super-blocks of 256
weights holding 8 sub-blocks of 32.

    x^ = d * (ls - 32) * KVALUES[idx],  d fp16 per super-block,  ls 6-bit per sub-block,  idx 0..15 (the code)

A block is 136 bytes (4.25 bits per weight): the fp16 d, scales_h (uint16: bits 2*ib of sub-block ib hold
ls >> 4), scales_l (4 bytes: byte ib / 2 holds ls & 15 of sub-block ib in its low nibble for even ib, high for
odd), then 8 x 16 bytes where byte j of sub-block ib holds idx[j] in its low nibble and idx[j + 16] in its high
one (llama.cpp's block_iq4_xs). `gguf.quants.dequantize` decodes float32(d) * (ls - 32) * KVALUES[idx], which
is exactly what `values` computes (every factor and product is exact in float32).

The grid (`qparams`): each sub-block starts from IQ4_NL's scale s = peak / KVALUES[0] (the peak lands on -127);
then, as llama.cpp's quantize_row_iq4_nl_impl, d = -s_max / 32 with s_max the signed sub-block scale of largest
magnitude, l = clamp(round(s / d), -32, 31) (rounded with the fp32 d) and the effective sub-block scale is
fp16(d) * l (`scale_grid`). Codes are the nearest levels of x / (fp16(d) * l) (llama.cpp divides by its
unrounded d * l: the two differ only where fp16's rounding of d moves a weight across a level midpoint). Float
weights exported to IQ4_XS (`encode`) first search each sub-block's scale as IQ4_NL does (ntry = 7, weighted by
x^2 or by an imatrix with sigma^2 over the super-block), then take the same grid.

Learned scales (learn="lsq"): the parameter is the effective sub-block scale in float32 (signed: a positive peak
takes a negative scale); the grid uses `scale_grid` of it, so forward, convert and export see the same two-level
scales, and the LSQ gradient passes straight through that rounding (as NVFP4's E4M3 block scales).

Rows that are not a multiple of 256 end in a partial super-block (zero-padded here); GGUF cannot store it and the
writer falls back to IQ4_NL, as llama.cpp does (recipe key gguf_fallback: such modules train on IQ4_NL instead). Storage of a converted weight: the indices at 4 bits, per
super-block the fp16 d and the eight 6-bit ls (the block's bytes).
"""
from __future__ import annotations

import math

import torch

from qat.errors import ConfigError
from qat.formats.base import Format, GGUFType, register_format
from qat.formats.common import divide, fixed_sum, half_bytes, run_sums, signed_peak
from qat.formats.iq4_nl import HIGH, KVALUES, LEVELS, LOW, fit_scale, nearest_level
from qat.packing import pack, packed_numel, unpack
from qat.spec import QuantSpec

QK_K, SUB, LMAX = 256, 32, 32
PER = QK_K // SUB  # sub-blocks per super-block


def iq4_xs_spec(**changes) -> QuantSpec:
    """The QuantSpec whose grid is GGUF IQ4_XS (`changes`: learn="lsq" for learned sub-block scales).

    Example:
        >>> iq4_xs_spec().describe()
        'int4 sym g32 iq4_xs'
    """
    return QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=SUB, grid="iq4_xs", **changes)


def _super(t: torch.Tensor) -> torch.Tensor:
    """Sub-block values [..., n_sub, 1] -> [..., n_super, 8], a partial last super-block zero-padded."""
    flat = t.reshape(*t.shape[:-2], -1)
    pad = -flat.shape[-1] % PER
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(*flat.shape[:-1], -1, PER)


def _from_super(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t.reshape(*t.shape[:-2], -1)[..., : shape[-2]].reshape(shape)


def scale_levels(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16-exact d [..., n_super, 1], integer ls - 32 in -32..31 [..., n_super, 8]) of sub-block scales
    [..., n_sub, 1], as llama.cpp's second level: d = -s_max / 32, l = clamp(round(s / d), -32, 31)."""
    s = _super(scale.float())
    d = divide(-signed_peak(s), LMAX)
    inv = torch.where(d != 0, 1 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    return d.to(torch.float16).float(), torch.round(s * inv).clamp_(-LMAX, LMAX - 1)


def scale_grid(scale: torch.Tensor) -> torch.Tensor:
    """The effective sub-block scales fp16(d) * l of `scale` [..., n_sub, 1] (idempotent: on-grid scales
    map to themselves).

    Example:
        >>> scale_grid(torch.tensor([[[1.0], [0.3]]]))  # d = -1/32: l = -32 and round(-9.6) = -10
        tensor([[[1.0000],
                 [0.3125]]])
    """
    d, lv = scale_levels(scale)
    return _from_super(d * lv, scale.shape)


def iq4_xs_blocks(codes: torch.Tensor, scale: torch.Tensor, zero_point=None) -> torch.Tensor:
    """GGUF IQ4_XS blocks [rows, cols / 256 * 136] from indices [rows, cols] (uint8) and sub-block scales
    [rows, cols / 32, 1] (put on the grid first)."""
    rows = codes.shape[0]
    d, lv = scale_levels(scale.reshape(rows, -1, 1))
    ls = (lv.reshape(-1, PER) + LMAX).to(torch.int32)
    scales_h = torch.zeros(ls.shape[0], dtype=torch.int32)
    for ib in range(PER):
        scales_h |= (ls[:, ib] >> 4) << (2 * ib)
    scales_h = torch.stack([scales_h & 0xFF, scales_h >> 8], 1)
    scales_l = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
    c = codes.reshape(-1, PER, SUB).to(torch.uint8)
    qs = (c[..., :16] | (c[..., 16:] << 4)).reshape(-1, QK_K // 2)
    parts = [half_bytes(d.reshape(-1, 1)), scales_h.to(torch.uint8), scales_l.to(torch.uint8), qs]
    return torch.cat(parts, 1).reshape(rows, -1)


def fitted_scale(w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """The searched sub-block scales of float rows `w` [rows, cols] put on the two-level grid [rows, cols / 32, 1]:
    IQ4_NL's search per sub-block (weighted by `importance` [cols], an imatrix or GPTQ's diag(H), when given, with
    sigma^2 = 2 mean(x^2) over the super-block, or over the columns there are of a partial one)."""
    view = w.reshape(w.shape[0], -1, SUB)
    imp = sigma2 = None
    if importance is not None:
        imp = importance.float().reshape(1, -1, SUB)
        sq = fixed_sum(view * view)
        total = fixed_sum(_super(sq))
        count = _super(torch.full_like(sq, SUB)).sum(-1, keepdim=True)  # exact: small integers
        sigma2 = (2 * total / count).repeat_interleave(PER, -2)[:, : view.shape[1]]
    return scale_grid(fit_scale(view, imp, sigma2))


def _encode(w: torch.Tensor, importance: torch.Tensor | None = None, values: bool = True):
    """Blocks and (when `values`) decoded values of one chunk of rows: the IQ4_XS grid on the searched scales."""
    spec = iq4_xs_spec()
    view = w.reshape(w.shape[0], -1, SUB)
    scale = fitted_scale(w, importance)
    codes, _ = FORMAT.codes(view, scale, None, spec)
    blocks = iq4_xs_blocks(codes.reshape(w.shape), scale)
    return blocks, FORMAT.values(codes, scale, None, spec).reshape(w.shape) if values else None


class IQ4XSFormat(Format):
    """GGUF IQ4_XS; see the module docstring."""

    name, grid, dtypes = "iq4_xs", "iq4_xs", ("int",)
    signed_scales = True
    gguf = (GGUFType("IQ4_XS", QK_K, 136, iq4_xs_spec, _encode, iq4_xs_blocks, weighted=True, fallback="IQ4_NL"),)

    def check(self, spec: QuantSpec) -> None:
        if (spec.bits != 4 or not spec.symmetric or spec.granularity != "per_group" or spec.group_size != SUB
                or spec.scale_dtype != "fp32" or spec.learn not in ("none", "lsq") or spec.signed):
            raise ConfigError("QuantSpec.grid='iq4_xs' needs bits=4, symmetric=True, granularity='per_group', "
                             "group_size=32, scale_dtype='fp32' (the format rounds its fp16 super-block scale and "
                             "6-bit sub-block scales), learn 'none' or 'lsq', signed left to its default")

    def default_signed(self, spec: QuantSpec) -> bool:
        return False  # the codes are level indices 0..15

    def gguf_type(self, spec: QuantSpec) -> str | None:
        return "IQ4_XS"

    def peak_range(self, spec: QuantSpec) -> bool:
        return True

    def qparams(self, lo, hi, spec):
        return scale_grid(divide(lo, KVALUES[0])), None

    def _on_grid(self, scale, spec):
        # a learned scale is a free float: put it on the grid; held ones already are (a per-column view of
        # them, as GPTQ's, could not be regrouped into super-blocks)
        return scale_grid(scale) if spec.learn != "none" else scale

    def shared_error(self, err, spec):
        return run_sums(err, PER)  # the fp16 d is per super-block of 256

    def codes(self, view, scale, zero_point, spec, need_mask=False):
        s = self._on_grid(scale, spec)
        t = torch.where(s != 0, view / torch.where(s != 0, s, torch.ones_like(s)), 0.0)
        mask = t.ge(LOW).logical_and_(t.le(HIGH)) if need_mask else None
        return nearest_level(t).float(), mask

    def values(self, t, scale, zero_point, spec):
        return LEVELS.to(t.device)[t.long()] * self._on_grid(scale, spec)

    def pack(self, codes, scale, zero_point, spec):
        rows = math.prod(codes.shape[:-1])
        d, lv = scale_levels(scale.detach().reshape(rows, -1, 1))
        stored = torch.cat([d.to(torch.float16).reshape(-1).view(torch.uint8),
                            pack((lv.reshape(-1) + LMAX).to(torch.uint8), 6)])
        return {"packed": pack(codes.to(torch.uint8), 4), "scale": stored,
                "zero_point": torch.empty(0, dtype=torch.uint8, device=scale.device)}

    def unpack(self, stored, spec, shape):
        codes = unpack(stored["packed"], 4, math.prod(shape)).reshape(shape)
        rows, n_sub = math.prod(shape[:-1]), shape[-1] // SUB
        n_super = -(-n_sub // PER)
        raw = stored["scale"]
        d = raw[: 2 * rows * n_super].view(torch.float16).float().reshape(rows, n_super, 1)
        lv = unpack(raw[2 * rows * n_super:], 6, rows * n_super * PER).float().reshape(rows, n_super, PER) - LMAX
        qshape = [*shape[:-1], n_sub, 1]
        while qshape and qshape[0] == 1:  # the qparams layout strips leading singleton dims
            qshape.pop(0)
        return codes, _from_super(d * lv, torch.Size(qshape)), None

    def storage_bits(self, spec, shape):
        rows, n_sub = math.prod(shape[:-1]), shape[-1] // SUB
        n_super = -(-n_sub // PER)
        return 8 * self.packed_nbytes(spec, shape) + 16 * rows * n_super + 8 * packed_numel(rows * n_super * PER, 6)


FORMAT = register_format(IQ4XSFormat())
