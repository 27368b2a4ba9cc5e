"""llama.cpp's legacy GGUF blocks Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 (grid="ggml"), as gguf-py computes them.

Blocks of 32 weights: Q8_0 stores an fp16 scale d and int8 codes (x = d*q); Q4_0 / Q5_0 an fp16 d = signed
peak / -2^(b-1) and codes + 2^(b-1) in [0, 2^b); Q4_1 / Q5_1 an fp16 d = (max - min) / (2^b - 1), an fp16
minimum m (held in `zero_point`) and codes in [0, 2^b) (x = d*q + m). Codes are computed with the unrounded
scale, values with its fp16 rounding, step for step as gguf-py, so fake quant, convert, PTQ and the GGUF
encoders give blocks bit-identical to `gguf.quants.quantize`.

Storage of a converted weight: the codes packed at `bits` bits, fp16 scales and fp16 minimums: the GGUF
block's bytes (Q4_0 4.5, Q4_1 5.0, Q5_0 5.5, Q5_1 6.0, Q8_0 8.5 bits per weight).
"""
from __future__ import annotations

import math
import threading

import torch

from qat.errors import ConfigError
from qat.formats.base import Format, GGUFType, register_format
from qat.formats.common import HALF_DOWN, block_range, divide, half_bytes, safe_inverse
from qat.packing import pack, unpack
from qat.spec import QuantSpec

GGML_BITS = (4, 5, 8)
LEGACY = {"Q8_0": (8, True), "Q4_0": (4, True), "Q4_1": (4, False), "Q5_0": (5, True), "Q5_1": (5, False)}
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}


def ggml_spec(type_name: str) -> QuantSpec:
    """The QuantSpec whose grid is GGUF `type_name` (legacy types only).

    Example:
        >>> ggml_spec("Q4_0").describe()
        'int4 sym g32 ggml'
    """
    if type_name not in LEGACY:
        raise KeyError(f"{type_name!r} has no QuantSpec grid; legacy types: {sorted(LEGACY)}")
    bits, sym = LEGACY[type_name]
    return QuantSpec(bits=bits, symmetric=sym, granularity="per_group", group_size=32, scale_dtype="fp16", grid="ggml")


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
    inv = safe_inverse(scale)
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
        >>> spec = ggml_spec("Q4_0")
        >>> ggml_stored_codes(torch.full((1, 32), -1.0), torch.tensor([[0.125]]), None, spec)[0, :2]
        tensor([0, 0], dtype=torch.int8)
    """
    lo, hi = ggml_stored_bounds(spec)
    # trunc(clamp(y)) == clamp(trunc(y)) for integer bounds; the int8 conversion truncates
    y = ggml_shifted(view, scale, zero_point, spec, scratch).clamp_(lo, hi)
    return y.to(torch.int8) if out is None else out.copy_(y)


_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F
_BIT0_OF_BYTES = 0x0101010101010101
_GATHER_BIT0 = 0x0102040810204080  # x * this >> 56: bit 0 of byte i of x -> bit i (bytes hold 0 or 1)


def pack_legacy(stored: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, type_name: str) -> torch.Tensor:
    """[nb, bytes] blocks from the stored integers (int8/uint8, see `ggml_stored_codes`) and qparams.
    The codes are packed 8 at a time as int64 words (little-endian bytes), as gguf-py packs them bytewise:
    qs byte j = element j | element j+16 << 4; Q5's qh bit j = bit 4 of element j."""
    bits, sym = LEGACY[type_name]
    u = stored.reshape(-1, 32).contiguous().view(torch.uint8)
    out = torch.empty(u.shape[0], BLOCK_BYTES[type_name], dtype=torch.uint8)
    out[:, :2] = half_bytes(scale.reshape(-1, 1))
    pos = 2 if sym else 4
    if not sym:
        out[:, 2:4] = half_bytes(zero_point.reshape(-1, 1))
    if bits == 8:
        out[:, pos:] = u
        return out
    words = u.view(torch.int64)  # [nb, 4]: elements 0-7, 8-15, 16-23, 24-31
    if bits == 5:
        hb = (words >> 4) & _BIT0_OF_BYTES
        out[:, pos:pos + 4] = ((hb * _GATHER_BIT0) >> 56).to(torch.uint8)  # wraps mod 2^64: only byte 7 is kept
        pos += 4
    qs = (words[:, :2] & _LOW_NIBBLES) | ((words[:, 2:] & _LOW_NIBBLES) << 4)
    out[:, pos:] = qs.contiguous().view(torch.uint8)
    return out


def legacy_blocks(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, type_name: str) -> torch.Tensor:
    """Blocks of a legacy type from the codes and qparams that `qat.primitives` gives for `ggml_spec(type_name)`.

    Args:
        codes: [rows, cols] int8 (symmetric) or uint8 codes.
        scale: [rows, cols/32, 1] scales (unrounded or fp16-rounded); zero_point: the float minimums of Q4_1/Q5_1.
    Returns:
        uint8 [rows, cols/32 * bytes_per_block].
    """
    off = ggml_offset(ggml_spec(type_name))
    stored = (codes.to(torch.int16) + off).to(torch.uint8) if off else codes
    return pack_legacy(stored, scale, zero_point, type_name).reshape(codes.shape[0], -1)


_LOCAL = threading.local()


def _scratch(shape, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` reused by this thread from chunk to chunk (contents undefined)."""
    n = math.prod(shape)
    bufs = _LOCAL.__dict__.setdefault("bufs", {})
    if dtype not in bufs or bufs[dtype].numel() < n:
        bufs[dtype] = torch.empty(n, dtype=dtype)
    return bufs[dtype][:n].view(shape)


def _encoder(name: str):
    def encode(w: torch.Tensor, importance=None, values: bool = True):
        """Blocks and (when `values`) decoded values of one chunk of rows, on the grid of `ggml_spec(name)`."""
        spec = ggml_spec(name)
        view = w.reshape(w.shape[0], -1, 32)
        scale, zero_point = FORMAT.qparams(*block_range(view, FORMAT.peak_range(spec)), spec)
        scratch, codes = _scratch((2, *view.shape), torch.float32), _scratch(view.shape, torch.int8)
        stored = ggml_stored_codes(view, scale, zero_point, spec, scratch, codes)
        blocks = pack_legacy(stored, scale, zero_point, name).reshape(w.shape[0], -1)
        if not values:
            return blocks, None
        t = stored.float().sub_(ggml_offset(spec))
        return blocks, FORMAT.values(t, scale, zero_point, spec).reshape(w.shape)
    encode.__name__ = f"encode_{name.lower()}"
    return encode


class GGMLFormat(Format):
    """llama.cpp's legacy blocks; see the module docstring."""

    name, grid, dtypes = "ggml", "ggml", ("int",)
    gguf = tuple(GGUFType(n, 32, BLOCK_BYTES[n], lambda n=n: ggml_spec(n), _encoder(n),
                          lambda c, s, z, n=n: legacy_blocks(c, s, z, n)) for n in LEGACY)

    def check(self, spec: QuantSpec) -> None:
        problems = []
        if spec.bits not in GGML_BITS:
            problems.append(f"dtype=int with bits in {list(GGML_BITS)}")
        if spec.bits == 8 and not spec.symmetric:
            problems.append("symmetric=True for bits=8 (Q8_0)")
        if spec.granularity != "per_group" or spec.group_size != 32:
            problems.append("granularity='per_group', group_size=32")
        if spec.scale_dtype != "fp16" or spec.learn != "none" or spec.signed != spec.symmetric:
            problems.append("scale_dtype='fp16', learn='none', signed left to its default")
        if problems:
            raise ConfigError(f"QuantSpec.grid='ggml' needs {'; '.join(problems)}")

    def gguf_type(self, spec: QuantSpec) -> str | None:
        return next(n for n, (b, s) in LEGACY.items() if b == spec.bits and s == spec.symmetric)

    def peak_range(self, spec: QuantSpec) -> bool:
        return spec.symmetric and spec.bits != 8

    def qparams(self, lo, hi, spec):
        """The scale is returned unrounded: codes are computed with it, and `values` rounds it (and Q4_1/Q5_1's
        float minimum) to fp16, which is what the block stores. Q4_0/Q5_0 take the element of largest
        magnitude with its sign (`compute_range` gives lo == hi == that element; ties |lo| == hi otherwise
        resolve to hi)."""
        if spec.bits == 8:
            return divide(torch.maximum(lo.abs(), hi.abs()), 127), None
        if spec.symmetric:
            signed_max = torch.where(hi >= -lo, hi, lo)
            return divide(signed_max, -(2 ** (spec.bits - 1))), None
        return divide(hi - lo, 2**spec.bits - 1), lo.clone()

    def codes(self, view, scale, zero_point, spec, need_mask=False):
        lo, hi = ggml_stored_bounds(spec)
        y = ggml_shifted(view, scale, zero_point, spec)
        mask = y.gt(lo - 1).logical_and_(y.lt(hi + 1)) if need_mask else None  # trunc(y) in [lo, hi]
        t = y.clamp_(lo, hi)
        t = t.to(torch.int8).float() if lo < 0 else t.floor_()  # trunc: clamped y is >= 0 below 8 bits
        off = ggml_offset(spec)
        return (t.sub_(off) if off else t), mask

    def values(self, t, scale, zero_point, spec):
        t = t.mul_(scale.to(torch.float16).float())
        return t if zero_point is None else t.add_(zero_point.to(torch.float16).float())

    def pack(self, codes, scale, zero_point, spec):
        zp = torch.empty(0, dtype=torch.float16, device=scale.device)
        return {"packed": pack((codes.to(torch.int16) - spec.qmin).to(torch.uint8), spec.bits),
                "scale": scale.detach().to(torch.float16).clone(),
                "zero_point": zp if zero_point is None else zero_point.detach().to(torch.float16).clone()}

    def unpack(self, stored, spec, shape):
        raw = unpack(stored["packed"], spec.bits, math.prod(shape)).to(torch.int16) + spec.qmin
        zp = stored["zero_point"].float() if stored["zero_point"].numel() else None
        return raw.to(self.codes_dtype(spec)).reshape(shape), stored["scale"].float(), zp

    def storage_bits(self, spec, shape):
        blocks = math.prod(shape) // 32
        return 8 * self.packed_nbytes(spec, shape) + blocks * (16 if spec.symmetric else 32)


FORMAT = register_format(GGMLFormat())
