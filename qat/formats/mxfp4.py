"""MXFP4 (OCP microscaling, grid="mx", dtype="fp4_e2m1"): E2M1 elements under one E8M0 power-of-two scale per
block of 32 consecutive weights along the input dimension.

    X = 2^(floor(log2 amax) - 2)     (OCP MX v1.0 sec. 6.3; the same exponent as llama.cpp's GGUF MXFP4)
    code = 2 * E2M1(x / X)           (round to nearest even, saturating at +-6: `qat.formats.minifloat`)
    x^ = code * X / 2

The scale rule: OCP and llama.cpp (quantize_row_mxfp4_ref, and gguf-py's quantize) agree on the exponent, so one
rule serves every export target. compressed-tensors' own observer (generate_mx_scales) rounds amax up to the next
power of two from 1.75 * 2^k, a choice of calibration only: every reader decodes the stored exponent, so our
exports decode to our values whatever produced the scale. Element ties differ: OCP and compressed-tensors round
ties to the even mantissa, llama.cpp's best_index_mxfp4 to the smaller magnitude; we round to even (the GGUF file
holds codes, so gguf-py and llama.cpp decode exactly what we computed).

Learned scales (learn="lsq"): the parameter is a free float32 scale; the grid uses its nearest power of two in
log2 (`nearest_pow2`), so forward, convert and export see the same E8M0 scale. The LSQ gradient passes
straight through that rounding (d 2^round(log2 s) / ds taken as 1), i.e. the scale's gradient is LSQ's, off by
the factor 2^round(log2 s) / s in [0.71, 1.41].

Storage of a converted weight: the 4-bit E2M1 patterns and one E8M0 byte per block: 4.25 bits per weight.
Exports: native, GGUF MXFP4 (type 39: 17-byte blocks, the E8M0 byte, then byte j = code[j] | code[j + 16] << 4),
compressed-tensors mxfp4-pack-quantized (`qat.export.compressed_fp`).
"""
from __future__ import annotations

import math

import torch

from qat.formats.base import Format, GGUFType, register_format
from qat.formats.common import encode_rows
from qat.formats.minifloat import (E2M1_EMAX, e2m1_codes_, e2m1_from_index, e2m1_index, e8m0_bytes,
                                   e8m0_scale, mx_scale, nearest_pow2)
from qat.packing import pack, unpack
from qat.spec import QuantSpec

BLOCK = 32


def mxfp4_spec(**changes) -> QuantSpec:
    """The QuantSpec of MXFP4 weights (`changes`: learn="lsq", or dynamic=True for activations).

    Example:
        >>> mxfp4_spec().describe()
        'fp4_e2m1 sym g32 mx'
    """
    return QuantSpec(bits=4, dtype="fp4_e2m1", symmetric=True, granularity="per_group", group_size=BLOCK, grid="mx",
                     **changes)


def mxfp4_blocks(codes: torch.Tensor, scale: torch.Tensor, zero_point=None) -> torch.Tensor:
    """GGUF MXFP4 blocks [rows, cols / 32 * 17] from codes [rows, cols] (doubled E2M1 values) and scales
    [rows, cols / 32, 1]."""
    c = e2m1_index(codes.reshape(-1, BLOCK))
    qs = c[:, :16] | (c[:, 16:] << 4)
    return torch.cat([e8m0_bytes(scale.reshape(-1, 1)), qs], 1).reshape(codes.shape[0], -1)


def _encode(w: torch.Tensor, values: bool = True):
    """Blocks and (when `values`) decoded values of float rows: the MXFP4 grid itself."""
    return encode_rows(FORMAT, mxfp4_spec(), w, BLOCK, mxfp4_blocks, values)


class MXFP4Format(Format):
    """MXFP4; see the module docstring."""

    name, grid, dtypes = "mxfp4", "mx", ("fp4_e2m1",)
    gguf = (GGUFType("MXFP4", BLOCK, 17, mxfp4_spec, _encode, mxfp4_blocks),)
    holds = frozenset({"compressed-tensors"})

    def check(self, spec: QuantSpec) -> None:
        if (spec.bits != 4 or not spec.symmetric or spec.granularity != "per_group" or spec.group_size != BLOCK
                or spec.scale_dtype != "fp32" or spec.learn not in ("none", "lsq") or not spec.signed):
            raise ValueError("QuantSpec.dtype='fp4_e2m1' with grid='mx' (MXFP4) needs bits=4, symmetric=True, "
                             "granularity='per_group', group_size=32, scale_dtype='fp32' (the scale is an E8M0 power "
                             "of two), learn 'none' or 'lsq', signed left to its default (True)")

    def default_signed(self, spec: QuantSpec) -> bool:
        return True  # the codes are the doubled E2M1 values -12..12 (int8)

    def gguf_type(self, spec: QuantSpec) -> str | None:
        return "MXFP4"

    def qparams(self, lo, hi, spec):
        return mx_scale(torch.maximum(-lo, hi), E2M1_EMAX), None

    def codes(self, view, scale, zero_point, spec, need_mask=False):
        d = view / (nearest_pow2(scale) * 0.5)  # 2 x / X: exact (X / 2 is a power of two, 2^-128 included)
        return e2m1_codes_(d, view, need_mask)

    def values(self, t, scale, zero_point, spec):
        return t.mul_(nearest_pow2(scale) * 0.5)  # doubled codes times half the scale: exact

    def pack(self, codes, scale, zero_point, spec):
        return {"packed": pack(e2m1_index(codes), 4), "scale": e8m0_bytes(scale.detach()),
                "zero_point": torch.empty(0, dtype=torch.uint8, device=scale.device)}

    def unpack(self, stored, spec, shape):
        codes = e2m1_from_index(unpack(stored["packed"], 4, math.prod(shape))).reshape(shape)
        return codes, e8m0_scale(stored["scale"]), None

    def storage_bits(self, spec, shape):
        return 4 * math.prod(shape) + 8 * (math.prod(shape) // BLOCK)


FORMAT = register_format(MXFP4Format())
