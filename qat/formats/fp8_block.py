"""FP8 block scaling (grid="block", dtype="fp8_e4m3"): E4M3 weights under one float32 scale per square block of
group_size x group_size (128 x 128 as DeepSeek-V3 ships), the activations' 1 x 128 groups being the plain fp8
format's per_group scheme (`QuantSpec(bits=8, dtype="fp8_e4m3", granularity="per_group", group_size=128,
dynamic=True)`).

    scale = amax(block) / 448;  code = e4m3(clamp(x / scale, -448, 448));  x^ = code * scale

The spec is per_group along the input dimension (the group view of `qat.primitives`); `qparams` then shares one
scale over group_size consecutive rows (a shorter last band when group_size does not divide the rows), so the
qparams layout stays [..., rows, n_groups, 1] and every other path (fake quant, convert, export) is the int/fp8 one.
`qparams` must see the whole weight (as a weight quantizer does). Weights only (static).

Learned scales (learn="lsq", recipe `fp8_block_lsq`): the parameter keeps the qparams layout, and each band of rows
quantizes with its first row's value (`learned_scale`, what the export stores), so the block's LSQ gradient (the sum
over the whole block, under LSQ's 1 / sqrt(N qmax) with N = group_size^2) lands on that one parameter; the band's
other rows are unused.

Storage of a converted weight: the E4M3 bytes and one fp32 scale per block (8 + 32 / group_size^2 bits per
weight). Exports: native, compressed-tensors float-quantized with strategy block (`qat.export.compressed_fp`).
"""
from __future__ import annotations

import math

import torch

from qat.errors import ConfigError
from qat.formats.base import Format, register_format
from qat.formats.common import divide, fixed_sum
from qat.formats.minifloat import E4M3_MAX
from qat.spec import QuantSpec


def fp8_block_spec(block: int = 128) -> QuantSpec:
    """The QuantSpec of FP8 block-scaled weights (`block` x `block` blocks).

    Example:
        >>> fp8_block_spec().describe()
        'fp8_e4m3 sym g128 block'
    """
    return QuantSpec(bits=8, dtype="fp8_e4m3", symmetric=True, granularity="per_group", group_size=block, grid="block")


def band_max(amax: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-group amax [..., R, G, 1] -> the max over each band of `rows` consecutive rows, one row per band
    [..., ceil(R / rows), G, 1]."""
    r = amax.shape[-3]
    pad = -r % rows
    if pad:
        amax = torch.cat([amax, amax.new_zeros(*amax.shape[:-3], pad, *amax.shape[-2:])], -3)
    return amax.unflatten(-3, (-1, rows)).amax(-3)


def expand_bands(band: torch.Tensor, rows: int, total: int) -> torch.Tensor:
    """Inverse layout of `band_max`: [..., bands, G, 1] -> [..., total, G, 1], each band's row repeated."""
    return band.repeat_interleave(rows, dim=-3)[..., :total, :, :]


class FP8BlockFormat(Format):
    """FP8 block scaling; see the module docstring."""

    name, grid, dtypes, is_float = "fp8_block", "block", ("fp8_e4m3",), True
    holds = frozenset({"compressed-tensors"})

    def check(self, spec: QuantSpec) -> None:
        if (spec.bits != 8 or not spec.symmetric or spec.granularity != "per_group" or spec.dynamic
                or spec.scale_dtype != "fp32" or spec.learn not in ("none", "lsq")):
            raise ConfigError("QuantSpec.grid='block' (FP8 block scaling) needs bits=8, dtype='fp8_e4m3', "
                             "symmetric=True, granularity='per_group' (group_size = the square block's side), "
                             "dynamic=False (weights), scale_dtype='fp32', learn 'none' or 'lsq'; for 1 x 128 "
                             "activations use grid 'uniform', granularity 'per_group', group_size 128, dynamic true")

    def default_signed(self, spec: QuantSpec) -> bool:
        return True

    def codes_dtype(self, spec: QuantSpec) -> torch.dtype:
        return torch.float8_e4m3fn

    def qparams(self, lo, hi, spec):
        amax = torch.maximum(-lo, hi)
        if amax.ndim < 3:
            raise ConfigError(f"FP8 block scaling: qparams of a 2-D weight's groups [rows, groups, 1] are needed, got "
                             f"shape {tuple(amax.shape)}")
        band = band_max(amax, spec.group_size)
        scale = torch.where(band > 0, divide(band, E4M3_MAX), torch.ones_like(band))
        return expand_bands(scale, spec.group_size, amax.shape[-3]), None

    def learned_scale(self, scale, spec):
        return expand_bands(scale[..., ::spec.group_size, :, :], spec.group_size, scale.shape[-3])

    def learned_scale_rows(self, spec):
        return spec.group_size

    def shared_error(self, err, spec):
        rows = err.shape[-3]
        pad = -rows % spec.group_size  # a shorter last band: zero error rows
        if pad:
            err = torch.cat([err, err.new_zeros(*err.shape[:-3], pad, *err.shape[-2:])], -3)
        bands = err.unflatten(-3, (-1, spec.group_size)).movedim(-3, -1)  # [..., bands, groups, 1, rows of a band]
        return expand_bands(fixed_sum(bands).squeeze(-1), spec.group_size, rows)

    def codes(self, view, scale, zero_point, spec, need_mask=False):
        t = view / scale
        mask = t.abs() <= E4M3_MAX if need_mask else None
        return t.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float(), mask

    def values(self, t, scale, zero_point, spec):
        return t.mul_(scale)

    def pack(self, codes, scale, zero_point, spec):
        return {"packed": codes.reshape(-1).to(torch.float8_e4m3fn).view(torch.uint8).clone(),
                "scale": scale.detach()[..., ::spec.group_size, :, :].float().clone(),
                "zero_point": torch.empty(0, dtype=torch.uint8, device=scale.device)}

    def unpack(self, stored, spec, shape):
        codes = stored["packed"].view(torch.float8_e4m3fn).reshape(shape)
        return codes, expand_bands(stored["scale"].float(), spec.group_size, shape[-2]), None

    def packed_nbytes(self, spec, shape):
        return math.prod(shape)

    def storage_bits(self, spec, shape):
        g = spec.group_size
        return 8 * math.prod(shape) + 32 * math.prod(shape[:-2]) * -(-shape[-2] // g) * -(-shape[-1] // g)


register_format(FP8BlockFormat())
