"""Uniform integer grids: int2..int8, signed or unsigned, symmetric or asymmetric (grid="uniform", dtype="int").

    q  = clamp(round(x / scale) + zero_point, qmin, qmax)
    x^ = (q - zero_point) * scale

Storage of a converted weight: codes - qmin packed at `bits` bits (`qat.packing`), scales in the spec's
`scale_dtype`, integer zero-points packed at `bits` bits.
"""
from __future__ import annotations

import math

import torch

from qat.errors import ConfigError
from qat.formats.base import Format, qparam_count, register_format
from qat.formats.common import divide
from qat.packing import pack, packed_numel, unpack
from qat.spec import QuantSpec

INT_BITS = (2, 3, 4, 5, 6, 7, 8)


def half_range(spec: QuantSpec) -> float:
    """What a symmetric scale divides the absolute maximum by: (qmax - qmin) / 2 signed, qmax unsigned."""
    return (spec.qmax - spec.qmin) / 2 if spec.signed else float(spec.qmax)


def round_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`scale` clamped to the smallest normal of the scale dtype and rounded to it, in float32."""
    tiny = torch.finfo(spec.torch_scale_dtype).tiny
    return scale.clamp(min=tiny).to(spec.torch_scale_dtype).float()


class IntFormat(Format):
    """The uniform integer grid: the default numerics of `qat.primitives`."""

    name, grid, dtypes = "int", "uniform", ("int",)
    holds = frozenset({"compressed-tensors", "gptq"})

    def check(self, spec: QuantSpec) -> None:
        if spec.bits not in INT_BITS:
            raise ConfigError(f"QuantSpec.bits={spec.bits}; choose from {list(INT_BITS)}")

    def qparams(self, lo, hi, spec):
        if spec.symmetric:
            amax = torch.maximum(-lo, hi) if spec.signed else hi.clamp(min=0.0)
            return round_scale(divide(amax, half_range(spec)), spec), None
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        scale = round_scale(divide(hi - lo, spec.qmax - spec.qmin), spec)
        zero_point = torch.clamp(torch.round(spec.qmin - lo / scale), spec.qmin, spec.qmax)
        return scale, zero_point

    def codes(self, view, scale, zero_point, spec, need_mask=False):
        t = torch.div(view, scale).round_()  # rounded in place: one weight-sized temporary less
        if zero_point is not None:
            t.add_(zero_point)
        mask = t.ge(spec.qmin).logical_and_(t.le(spec.qmax)) if need_mask else None
        return t.clamp_(spec.qmin, spec.qmax), mask

    def values(self, t, scale, zero_point, spec):
        if zero_point is not None:
            t = t.sub_(zero_point)
        return t.mul_(scale)

    def pack(self, codes, scale, zero_point, spec):
        zp = torch.empty(0, dtype=torch.uint8, device=scale.device)
        if zero_point is not None:
            zp = pack((zero_point.to(torch.int16) - spec.qmin).to(torch.uint8), spec.bits)
        return {"packed": pack((codes.to(torch.int16) - spec.qmin).to(torch.uint8), spec.bits),
                "scale": scale.detach().to(spec.torch_scale_dtype).clone(), "zero_point": zp}

    def unpack(self, stored, spec, shape):
        raw = unpack(stored["packed"], spec.bits, math.prod(shape)).to(torch.int16) + spec.qmin
        codes = raw.to(self.codes_dtype(spec)).reshape(shape)
        scale, zp = stored["scale"].float(), None
        if stored["zero_point"].numel():
            zp = (unpack(stored["zero_point"], spec.bits, scale.numel()).float() + spec.qmin).reshape(scale.shape)
        return codes, scale, zp

    def storage_bits(self, spec, shape):
        n_scales = qparam_count(spec, shape)
        bits = 8 * self.packed_nbytes(spec, shape) + n_scales * torch.finfo(spec.torch_scale_dtype).bits
        return bits + (0 if spec.symmetric else 8 * packed_numel(n_scales, spec.bits))


register_format(IntFormat())
