"""GGUF block encoders in vectorized torch: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Each encoder maps a float [rows, cols] tensor to its blocks, uint8 [rows, bytes_per_row], and to the
values those blocks decode to (what a runtime computes with), float32 [rows, cols].

The legacy types go through the one numerics: the grid of `QuantSpec(grid="ggml")` in `qat.grids`
(what `qat.primitives` dispatches to, the path a format-exact QAT model trains with), so blocks are bit-identical to `gguf.quants.quantize` and
to the codes a converted model holds. The K-quants follow llama.cpp's two-level layout (fp16 super-block
scale over 6-bit (4-bit for Q2_K, int8 for Q6_K) sub-block scales, and for Q2_K/Q4_K/Q5_K a second
fp16 super-scale over sub-block minimums: x = d*sc*q - dmin*m); the sub-block scales are fitted by
min-max (with a small search for the asymmetric types), then the codes are recomputed with the
quantized scales, as llama.cpp does, so the decoded values are exactly `values`. `encode_blocks` skips
the decoding (what a GGUF writer needs). See docs/export.md "Speed" for how the encoders stay fast.

Example:
    >>> blocks, values = encode(torch.randn(4, 256), "Q4_K")
    >>> blocks.shape
    torch.Size([4, 144])
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from qat.grids import GRIDS, block_range, ggml_offset, ggml_stored_codes
from qat.spec import QuantSpec

QK_K = 256
# type name -> (elements per block, bytes per block), as gguf's GGML_QUANT_SIZES
BLOCK = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20),
         "Q5_0": (32, 22), "Q5_1": (32, 24), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
         "Q5_K": (256, 176), "Q6_K": (256, 210)}
LEGACY = {"Q8_0": (8, True), "Q4_0": (4, True), "Q4_1": (4, False), "Q5_0": (5, True), "Q5_1": (5, False)}
CHUNK_ELEMENTS = 1 << 18
ENCODERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {}  # (chunk, values=, [importance=])


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


def encode(weight: torch.Tensor, type_name: str, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks and decoded values of a 2-D float tensor in GGUF type `type_name`.

    `importance` [cols] (see `qat.export.imatrix`) weighs the K-quant fits (Q2_K, Q4_K, Q5_K); other types
    ignore it (their blocks stay bit-identical to gguf-py's).

    Returns:
        (uint8 blocks [rows, bytes_per_row], float32 decoded values [rows, cols]).
    Raises:
        KeyError: an unknown type, listing the known ones.
        ValueError: a row length that is not a multiple of the type's block size.
    """
    return _run(weight, type_name, importance, True)


def encode_blocks(weight: torch.Tensor, type_name: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Only the blocks of `encode` (what a GGUF writer stores), without decoding them: faster.

    Example:
        >>> encode_blocks(torch.randn(4, 64), "Q8_0").shape
        torch.Size([4, 68])
    Raises:
        as `encode`.
    """
    return _run(weight, type_name, importance, False)[0]


def _run(weight, type_name, importance, values):
    if type_name not in ENCODERS:
        raise KeyError(f"GGUF type {type_name!r}; supported: {sorted(ENCODERS)}")
    block = BLOCK[type_name][0]
    w = weight.detach().float().reshape(-1, weight.shape[-1])
    if w.shape[1] % block:
        raise ValueError(f"GGUF {type_name} needs rows that are a multiple of {block}; got {w.shape[1]}")
    use_imp = importance is not None and type_name in ("Q2_K", "Q4_K", "Q5_K")
    kwargs = {"importance": importance} if use_imp else {}
    fn = ENCODERS[type_name]
    step = max(1, CHUNK_ELEMENTS // w.shape[1])
    if type_name in ("F32", "F16", "BF16") or w.shape[0] <= step:
        return fn(w, values=values, **kwargs)  # one conversion: nothing to gain from chunks
    blocks = torch.empty(w.shape[0], w.shape[1] // block * BLOCK[type_name][1], dtype=torch.uint8)
    decoded = torch.empty_like(w) if values else None

    def work(i: int) -> None:  # each chunk lands in its rows of the outputs while still in cache
        b, v = fn(w[i:i + step], values=values, **kwargs)
        blocks[i:i + step] = b
        if values:
            decoded[i:i + step] = v

    _chunked(work, range(0, w.shape[0], step))
    return blocks, decoded


def _chunked(work, starts) -> None:
    """Rows are independent. Chunks of ~256K values keep every temporary in cache and reused by the
    allocator (instead of fresh, page-faulting 64 MB buffers per operation); each chunk runs with one
    intra-op thread (a thread wake-up per small operation costs more than the operation) and the chunks
    are spread over `torch.get_num_threads()` Python threads (torch releases the GIL inside operations)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(work, starts))
        else:
            for i in starts:
                work(i)
    finally:
        torch.set_num_threads(threads)


def _register(*names):
    def deco(fn):
        for n in names:
            ENCODERS[n] = (lambda w, n=n, **kw: fn(w, n, **kw))
        return fn
    return deco


@_register("F32", "F16", "BF16")
def _encode_float(w, name, values=True):
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]
    t = w.to(dtype)
    return t.view(torch.uint8).reshape(w.shape[0], -1), t.float() if values else None


def _half_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp16 bytes of a [..., 1] float tensor: [..., 2] uint8."""
    return t.to(torch.float16).contiguous().view(torch.uint8)


_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F
_BIT0_OF_BYTES = 0x0101010101010101
_GATHER_BIT0 = 0x0102040810204080  # x * this >> 56: bit 0 of byte i of x -> bit i (bytes hold 0 or 1)


def _pack_legacy(stored: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, type_name: str) -> torch.Tensor:
    """[nb, bytes] blocks from the stored integers (int8/uint8, see `qat.grids.ggml_stored_codes`) and qparams.
    The codes are packed 8 at a time as int64 words (little-endian bytes), as gguf-py packs them bytewise:
    qs byte j = element j | element j+16 << 4; Q5's qh bit j = bit 4 of element j."""
    bits, sym = LEGACY[type_name]
    u = stored.reshape(-1, 32).contiguous().view(torch.uint8)
    out = torch.empty(u.shape[0], BLOCK[type_name][1], dtype=torch.uint8)
    out[:, :2] = _half_bytes(scale.reshape(-1, 1))
    pos = 2 if sym else 4
    if not sym:
        out[:, 2:4] = _half_bytes(zero_point.reshape(-1, 1))
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
        scale: [rows, cols/32, 1] unrounded scales; zero_point: the float minimums of Q4_1/Q5_1.
    Returns:
        uint8 [rows, cols/32 * bytes_per_block].
    """
    off = ggml_offset(ggml_spec(type_name))
    stored = (codes.to(torch.int16) + off).to(torch.uint8) if off else codes
    return _pack_legacy(stored, scale, zero_point, type_name).reshape(codes.shape[0], -1)


_LOCAL = threading.local()


def _scratch(shape, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` reused by this thread from chunk to chunk (contents undefined)."""
    n = math.prod(shape)
    bufs = _LOCAL.__dict__.setdefault("bufs", {})
    if dtype not in bufs or bufs[dtype].numel() < n:
        bufs[dtype] = torch.empty(n, dtype=dtype)
    return bufs[dtype][:n].view(shape)


@_register(*LEGACY)
def _encode_legacy(w, name, values=True):
    """The grid of `ggml_spec(name)` (`qat.grids`, what `qat.primitives` computes) on one chunk of rows."""
    spec = ggml_spec(name)
    view = w.reshape(w.shape[0], -1, 32)
    scale, zero_point = GRIDS["ggml"].qparams(*block_range(view, spec), spec)
    scratch, codes = _scratch((2, *view.shape), torch.float32), _scratch(view.shape, torch.int8)
    stored = ggml_stored_codes(view, scale, zero_point, spec, scratch, codes)
    blocks = _pack_legacy(stored, scale, zero_point, name).reshape(w.shape[0], -1)
    if not values:
        return blocks, None
    codes = stored.float().sub_(ggml_offset(spec))
    return blocks, GRIDS["ggml"].values(codes, scale, zero_point).reshape(w.shape)


from qat.export import kquants as _kquants  # noqa: E402  (registers the K-quant encoders)

for _name, _fn in _kquants.ENCODERS.items():
    ENCODERS[_name] = _fn
