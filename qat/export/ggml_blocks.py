"""GGUF block encoders in vectorized torch: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Each encoder maps a float [rows, cols] tensor to its blocks, uint8 [rows, bytes_per_row], and to the
values those blocks decode to (what a runtime computes with), float32 [rows, cols].

The legacy types go through the one numerics: `QuantSpec(grid="ggml")` in `qat.primitives` (the same
path a format-exact QAT model trains with), so blocks are bit-identical to `gguf.quants.quantize` and
to the codes a converted model holds. The K-quants follow llama.cpp's two-level layout (fp16 super-block
scale over 6-bit (4-bit for Q2_K, int8 for Q6_K) sub-block scales, and for Q2_K/Q4_K/Q5_K a second
fp16 super-scale over sub-block minimums: x = d*sc*q - dmin*m); the sub-block scales are fitted by
min-max (with a small search for the asymmetric types), then the codes are recomputed with the
quantized scales, as llama.cpp does, so the decoded values are exactly `values`.

Example:
    >>> blocks, values = encode(torch.randn(4, 256), "Q4_K")
    >>> blocks.shape
    torch.Size([4, 144])
"""
from __future__ import annotations

from typing import Callable

import torch

from qat.primitives import choose_qparams, compute_range, dequantize, quantize
from qat.spec import QuantSpec

QK_K = 256
# type name -> (elements per block, bytes per block), as gguf's GGML_QUANT_SIZES
BLOCK = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20),
         "Q5_0": (32, 22), "Q5_1": (32, 24), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
         "Q5_K": (256, 176), "Q6_K": (256, 210)}
LEGACY = {"Q8_0": (8, True), "Q4_0": (4, True), "Q4_1": (4, False), "Q5_0": (5, True), "Q5_1": (5, False)}
CHUNK_ELEMENTS = 1 << 18
ENCODERS: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {}


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

    Raises:
        KeyError: an unknown type, listing the known ones.
        ValueError: a row length that is not a multiple of the type's block size.
    """
    if type_name not in ENCODERS:
        raise KeyError(f"GGUF type {type_name!r}; supported: {sorted(ENCODERS)}")
    block = BLOCK[type_name][0]
    w = weight.detach().float().reshape(-1, weight.shape[-1])
    if w.shape[1] % block:
        raise ValueError(f"GGUF {type_name} needs rows that are a multiple of {block}; got {w.shape[1]}")
    use_imp = importance is not None and type_name in ("Q2_K", "Q4_K", "Q5_K")
    fn = (lambda chunk: ENCODERS[type_name](chunk, importance)) if use_imp else ENCODERS[type_name]
    step = max(1, CHUNK_ELEMENTS // w.shape[1])
    if type_name in ("F32", "F16", "BF16") or w.shape[0] <= step:
        return fn(w)  # one conversion: nothing to gain from chunks
    # Rows are independent. Chunks of ~256K values keep every temporary in cache and reused by the
    # allocator (instead of fresh, page-faulting 64 MB buffers per operation), and one intra-op thread
    # avoids a thread wake-up per small operation: 3-10x faster on CPU than whole-tensor ops.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parts = [fn(w[i:i + step]) for i in range(0, w.shape[0], step)]
    finally:
        torch.set_num_threads(threads)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _register(*names):
    def deco(fn):
        for n in names:
            ENCODERS[n] = (lambda w, n=n: fn(w, n))
        return fn
    return deco


@_register("F32", "F16", "BF16")
def _encode_float(w, name):
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]
    t = w.to(dtype)
    return t.view(torch.uint8).reshape(w.shape[0], -1), t.float()


def _half_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp16 bytes of a [..., 1] float tensor: [..., 2] uint8."""
    return t.to(torch.float16).contiguous().view(torch.uint8)


def _nibbles(u: torch.Tensor) -> torch.Tensor:
    """[nb, 32] codes 0..15 (or low nibbles) -> [nb, 16] bytes: element j low, j+16 high."""
    return (u[:, :16] & 0xF) | ((u[:, 16:] & 0xF) << 4)


def _bits_to_bytes(bits: torch.Tensor) -> torch.Tensor:
    """[nb, 8k] 0/1 -> [nb, k] bytes, little bit order (as numpy packbits bitorder='little')."""
    shifts = torch.arange(8, dtype=torch.int32)
    return (bits.reshape(bits.shape[0], -1, 8).int() << shifts).sum(-1).to(torch.uint8)


def legacy_blocks(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, type_name: str) -> torch.Tensor:
    """Blocks of a legacy type from the codes and qparams that `qat.primitives` gives for `ggml_spec(type_name)`.

    Args:
        codes: [rows, cols] int8 (symmetric) or uint8 codes.
        scale: [rows, cols/32, 1] unrounded scales; zero_point: the float minimums of Q4_1/Q5_1.
    Returns:
        uint8 [rows, cols/32 * bytes_per_block].
    """
    rows = codes.shape[0]
    bits, sym = LEGACY[type_name]
    q = codes.reshape(-1, 32).to(torch.int32)
    head = [_half_bytes(scale.reshape(-1, 1))]
    if not sym:
        head.append(_half_bytes(zero_point.reshape(-1, 1)))
    if bits == 8:
        body = [q.to(torch.int8).view(torch.uint8)]
    else:
        u = q + (2 ** (bits - 1) if sym else 0)
        body = [_nibbles(u)]
        if bits == 5:
            body.insert(0, _bits_to_bytes(u >> 4))
    return torch.cat(head + body, dim=1).to(torch.uint8).reshape(rows, -1)


@_register(*LEGACY)
def _encode_legacy(w, name):
    spec = ggml_spec(name)
    scale, zero_point = choose_qparams(*compute_range(w, spec), spec)
    codes = quantize(w, scale, zero_point, spec)
    return legacy_blocks(codes, scale, zero_point, name), dequantize(codes, scale, zero_point, spec)


from qat.export import kquants as _kquants  # noqa: E402  (registers the K-quant encoders)

for _name, _fn in _kquants.ENCODERS.items():
    ENCODERS[_name] = _fn
