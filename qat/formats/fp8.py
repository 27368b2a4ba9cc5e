"""fp8 e4m3 / e5m2 codes under a float scale (grid="uniform", dtype="fp8_e4m3" or "fp8_e5m2").

    scale = amax / largest finite fp8 value;  code = fp8(clamp(x / scale));  x^ = code * scale

Storage of a converted weight: the fp8 bytes of the codes, scales in the spec's `scale_dtype`.
"""
from __future__ import annotations

import math

import torch

from qat.errors import ConfigError
from qat.formats.base import Format, qparam_count, register_format
from qat.formats.common import divide
from qat.formats.int import round_scale
from qat.spec import QuantSpec

FLOAT_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


class FP8Format(Format):
    """fp8 codes: symmetric, 8 bits, no learned scales."""

    name, grid, dtypes, is_float = "fp8", "uniform", tuple(FLOAT_DTYPES), True
    holds = frozenset({"compressed-tensors"})  # e4m3 weights per channel / tensor (float-quantized); dynamic activations

    def check(self, spec: QuantSpec) -> None:
        if spec.bits != 8:
            raise ConfigError(f"QuantSpec.bits={spec.bits} with dtype={spec.dtype!r}; fp8 needs bits=8")
        if not spec.symmetric:
            raise ConfigError(f"QuantSpec.symmetric=False with dtype={spec.dtype!r}; fp8 scales are symmetric")
        if spec.learn != "none":
            raise ConfigError(f"QuantSpec.learn={spec.learn!r} is for integer schemes, not {spec.dtype!r}")

    def default_signed(self, spec: QuantSpec) -> bool:
        return True

    def codes_dtype(self, spec: QuantSpec) -> torch.dtype:
        return FLOAT_DTYPES[spec.dtype]

    def qparams(self, lo, hi, spec):
        amax = torch.maximum(-lo, hi)
        return round_scale(divide(amax, torch.finfo(FLOAT_DTYPES[spec.dtype]).max), spec), None

    def codes(self, view, scale, zero_point, spec, need_mask=False):
        fmax = torch.finfo(FLOAT_DTYPES[spec.dtype]).max
        t = view / scale
        mask = (t.abs() <= fmax) if need_mask else None
        return t.clamp_(-fmax, fmax).to(FLOAT_DTYPES[spec.dtype]).float(), mask

    def values(self, t, scale, zero_point, spec):
        return t.mul_(scale)

    def pack(self, codes, scale, zero_point, spec):
        return {"packed": codes.reshape(-1).view(torch.uint8).clone(),
                "scale": scale.detach().to(spec.torch_scale_dtype).clone(),
                "zero_point": torch.empty(0, dtype=torch.uint8, device=scale.device)}

    def unpack(self, stored, spec, shape):
        return stored["packed"].view(FLOAT_DTYPES[spec.dtype]).reshape(shape), stored["scale"].float(), None

    def packed_nbytes(self, spec, shape):
        return math.prod(shape)

    def storage_bits(self, spec, shape):
        return 8 * math.prod(shape) + qparam_count(spec, shape) * torch.finfo(spec.torch_scale_dtype).bits


register_format(FP8Format())
