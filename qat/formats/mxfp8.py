"""MXFP8 (OCP microscaling, grid="mx", dtype="fp8_e4m3"): E4M3 elements under one E8M0 power-of-two scale per
block of 32 along the last dimension, for weights and (dynamic) activations.

    X = 2^(floor(log2 amax) - 8)     (OCP MX v1.0 sec. 6.3: 8 is E4M3's largest exponent, 448 = 1.75 * 2^8)
    code = e4m3(clamp(x / X, -448, 448))   (round to nearest even, saturating: torch's float8_e4m3fn cast)
    x^ = code * X

Learned scales (learn="lsq") work as for MXFP4: the grid uses the nearest power of two of the free scale.
Storage of a converted weight: the E4M3 bytes and one E8M0 byte per block: 8.25 bits per weight.
Exports: native, compressed-tensors mxfp8-quantized (`qat.export.compressed_fp`: weight float8_e4m3fn,
weight_scale uint8 E8M0 exponents). GGUF has no MXFP8 type.
"""
from __future__ import annotations

import math

import torch

from qat.formats.base import Format, register_format
from qat.formats.minifloat import E4M3_MAX, e8m0_bytes, e8m0_scale, mx_scale, nearest_pow2
from qat.spec import QuantSpec

BLOCK = 32
E4M3_EMAX = 8
_INSIDE = E4M3_MAX + 16  # half the top step (448 -> 480): what rounds to 448 without clipping (STE mask)


def mxfp8_spec(**changes) -> QuantSpec:
    """The QuantSpec of MXFP8 (`changes`: dynamic=True for activations, learn="lsq").

    Example:
        >>> mxfp8_spec().describe()
        'fp8_e4m3 sym g32 mx'
    """
    return QuantSpec(bits=8, dtype="fp8_e4m3", symmetric=True, granularity="per_group", group_size=BLOCK, grid="mx",
                     **changes)


class MXFP8Format(Format):
    """MXFP8; see the module docstring."""

    name, grid, dtypes, is_float = "mxfp8", "mx", ("fp8_e4m3",), True
    holds = frozenset({"compressed-tensors"})

    def check(self, spec: QuantSpec) -> None:
        if (spec.bits != 8 or not spec.symmetric or spec.granularity != "per_group" or spec.group_size != BLOCK
                or spec.scale_dtype != "fp32" or spec.learn not in ("none", "lsq")):
            raise ValueError("QuantSpec.dtype='fp8_e4m3' with grid='mx' (MXFP8) needs bits=8, symmetric=True, "
                             "granularity='per_group', group_size=32, scale_dtype='fp32' (the scale is an E8M0 power "
                             "of two), learn 'none' or 'lsq'")

    def default_signed(self, spec: QuantSpec) -> bool:
        return True

    def codes_dtype(self, spec: QuantSpec) -> torch.dtype:
        return torch.float8_e4m3fn

    def qparams(self, lo, hi, spec):
        return mx_scale(torch.maximum(-lo, hi), E4M3_EMAX), None

    def codes(self, view, scale, zero_point, spec, need_mask=False):
        t = view / nearest_pow2(scale)  # exact: a power of two
        mask = t.abs() <= _INSIDE if need_mask else None
        return t.clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float(), mask

    def values(self, t, scale, zero_point, spec):
        return t.mul_(nearest_pow2(scale))

    def pack(self, codes, scale, zero_point, spec):
        return {"packed": codes.reshape(-1).to(torch.float8_e4m3fn).view(torch.uint8).clone(),
                "scale": e8m0_bytes(scale.detach()),
                "zero_point": torch.empty(0, dtype=torch.uint8, device=scale.device)}

    def unpack(self, stored, spec, shape):
        return stored["packed"].view(torch.float8_e4m3fn).reshape(shape), e8m0_scale(stored["scale"]), None

    def packed_nbytes(self, spec, shape):
        return math.prod(shape)

    def storage_bits(self, spec, shape):
        return 8 * math.prod(shape) + 8 * (math.prod(shape) // BLOCK)


FORMAT = register_format(MXFP8Format())
