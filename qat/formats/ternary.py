"""Ternary weights (grid="ternary"): codes in {-1, 0, 1} under one fp16 scale per group; with groups of 256 the
grid is GGUF TQ2_0.

    d = fp16(amax of the block);  q = clamp(roundf(x / d), -1, 1);  x^ = q * d

A TQ2_0 block is 66 bytes (2.0625 bits per weight): 64 bytes of 2-bit fields q + 1, byte j * 32 + m holding the
weights j * 128 + n * 32 + m at bits 2n (n = 0..3), then the fp16 d. llama.cpp's quantize_row_tq2_0_ref rounds
with 1 / amax before d is rounded to fp16; this grid divides by the fp16 d it stores (so fake quant, convert and
the file agree; the two differ only for |x| / amax within fp16's rounding of 0.5). roundf: halves away from zero.

The same grid stores as GGUF TQ1_0 (54-byte blocks, 1.6875 bits per weight): the 256 digits q + 1 packed in
base 3, five per byte for weights 0..239 (byte m of the first 32 holds weights n * 32 + m, n = 0..4, of the next
16 weights 160 + n * 16 + m), four per byte for weights 240..255 (byte m holds 240 + n * 4 + m), each byte
ceil(v * 256 / 243) of the base-3 number v (first digit most significant), then the fp16 d. A model trained on
this grid exports to either type exactly (`qat-export gguf_type=TQ1_0` picks TQ1_0; TQ2_0 is the default).

Ternary QAT (recipe ternary_g64_lsq; gguf_tq2_0_lsq, `tq2_0_spec(learn="lsq")`, for GGUF-exact TQ2_0, whose
gguf_fallback trains the rows that are not multiples of 256 on Q4_0, the type GGUF stores them in): learn="lsq"
learns d per group (held in fp16, the scale the file stores), with straight-through rounding to {-1, 0, 1}
(ParetoQ's setting for ternary: learned scale, STE). Other group sizes export natively (and to GGUF
re-quantized, warned).
Storage of a converted weight: q + 1 packed at 2 bits and the fp16 scales (the block's bytes).
"""
from __future__ import annotations

import math

import torch

from qat.formats.base import Format, GGUFType, register_format
from qat.formats.common import HALF_DOWN, half_bytes
from qat.packing import pack, unpack
from qat.spec import QuantSpec

BLOCK = 256


def tq2_0_spec(**changes) -> QuantSpec:
    """The QuantSpec whose grid is GGUF TQ2_0 (`changes`: learn="lsq" for ternary QAT).

    Example:
        >>> tq2_0_spec().describe()
        'int2 sym g256 ternary'
    """
    return QuantSpec(bits=2, symmetric=True, granularity="per_group", group_size=BLOCK, scale_dtype="fp16",
                     grid="ternary", **changes)


def tq2_0_blocks(codes: torch.Tensor, scale: torch.Tensor, zero_point=None) -> torch.Tensor:
    """GGUF TQ2_0 blocks [rows, cols / 256 * 66] from codes [rows, cols] (-1..1) and scales [rows, cols / 256, 1]."""
    c = (codes.reshape(-1, 2, 4, 32).to(torch.int16) + 1).to(torch.uint8)
    qs = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    return torch.cat([qs.reshape(-1, 64), half_bytes(scale.reshape(-1, 1))], 1).reshape(codes.shape[0], -1)


def _base3(digits: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """[nb, n * width] digits 0..2 -> [nb, width] bytes: byte m holds digits k * width + m (k = 0..n-1) as the
    base-3 number d_0 d_1 ... (most significant first) in 8-bit fixed point, ceil(v * 256 / 243)."""
    weights = torch.tensor([3 ** (4 - k) for k in range(n)], dtype=torch.int32).reshape(1, n, 1)
    v = (digits.reshape(-1, n, width).to(torch.int32) * weights).sum(1)  # exact: int32
    return ((v * 256 + 242) // 243).to(torch.uint8)


def tq1_0_blocks(codes: torch.Tensor, scale: torch.Tensor, zero_point=None) -> torch.Tensor:
    """GGUF TQ1_0 blocks [rows, cols / 256 * 54] from codes [rows, cols] (-1..1) and scales [rows, cols / 256, 1]:
    five digits q + 1 per byte for weights 0..239 (32 bytes of 5 x 32, then 16 of 5 x 16), four per byte for
    240..255 (qh), then the fp16 d."""
    c = codes.reshape(-1, BLOCK).to(torch.int16) + 1
    parts = [_base3(c[:, :160], 5, 32), _base3(c[:, 160:240], 5, 16), _base3(c[:, 240:], 4, 4),
             half_bytes(scale.reshape(-1, 1))]
    return torch.cat(parts, 1).reshape(codes.shape[0], -1)


def _encoder(blocks_fn):
    def encode(w: torch.Tensor, values: bool = True):
        """Blocks and (when `values`) decoded values of float rows on the TQ2_0 grid (stored as TQ2_0 or TQ1_0)."""
        spec = tq2_0_spec()
        view = w.reshape(w.shape[0], -1, BLOCK)
        scale = FORMAT.qparams(view.amin(-1, keepdim=True), view.amax(-1, keepdim=True), spec)[0]
        codes, _ = FORMAT.codes(view, scale, None, spec)
        blocks = blocks_fn(codes.reshape(w.shape), scale)
        return blocks, FORMAT.values(codes, scale, None, spec).reshape(w.shape) if values else None
    return encode


class TernaryFormat(Format):
    """TQ2_0 ternary; see the module docstring."""

    name, grid, dtypes = "ternary", "ternary", ("int",)
    # rows that are not a multiple of 256 fall back to Q4_0, as llama.cpp's tensor_type_fallback (was F16 here)
    gguf = (GGUFType("TQ2_0", BLOCK, 66, tq2_0_spec, _encoder(tq2_0_blocks), tq2_0_blocks, fallback="Q4_0"),
            GGUFType("TQ1_0", BLOCK, 54, tq2_0_spec, _encoder(tq1_0_blocks), tq1_0_blocks, fallback="Q4_0"))

    def check(self, spec: QuantSpec) -> None:
        if (spec.bits != 2 or not spec.symmetric or spec.granularity != "per_group" or spec.scale_dtype != "fp16"
                or spec.learn not in ("none", "lsq") or not spec.signed):
            raise ValueError("QuantSpec.grid='ternary' needs bits=2, symmetric=True, granularity='per_group' "
                             "(group_size=256 is GGUF TQ2_0), scale_dtype='fp16', learn 'none' or 'lsq', "
                             "signed left to its default")

    def gguf_type(self, spec: QuantSpec) -> str | None:
        return "TQ2_0" if spec.group_size == BLOCK else None

    def qparams(self, lo, hi, spec):
        return torch.maximum(-lo, hi).to(torch.float16).float(), None

    def codes(self, view, scale, zero_point, spec, need_mask=False):
        t = torch.where(scale != 0, view / torch.where(scale != 0, scale, torch.ones_like(scale)), 0.0)
        mask = t.abs() <= 1.5 if need_mask else None
        q = t.add(torch.sign(t), alpha=HALF_DOWN).to(torch.int8).float()  # roundf, see qat.formats.common
        return q.clamp_(-1, 1), mask

    def values(self, t, scale, zero_point, spec):
        return t.mul_(scale)

    def pack(self, codes, scale, zero_point, spec):
        return {"packed": pack((codes.to(torch.int16) + 1).to(torch.uint8), 2),
                "scale": scale.detach().to(torch.float16).clone(),
                "zero_point": torch.empty(0, dtype=torch.uint8, device=scale.device)}

    def unpack(self, stored, spec, shape):
        codes = (unpack(stored["packed"], 2, math.prod(shape)).to(torch.int16) - 1).to(torch.int8).reshape(shape)
        return codes, stored["scale"].float(), None

    def storage_bits(self, spec, shape):
        return 2 * math.prod(shape) + 16 * (math.prod(shape) // spec.group_size)


FORMAT = register_format(TernaryFormat())
