"""GGUF tensor encoders in vectorized torch: F32, F16, BF16 and every GGUF type a format in `qat.formats`
registers (the legacy Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1, the K-quants Q2_K..Q6_K, ...).

Each encoder maps a float [rows, cols] tensor to its blocks, uint8 [rows, bytes_per_row], and to the
values those blocks decode to (what a runtime computes with), float32 [rows, cols]. The quantized types go
through the one numerics: the format's grid (what `qat.primitives` dispatches to, the path a format-exact QAT
model trains with), so blocks are bit-identical to the codes a converted model holds (and, for the legacy
types, to `gguf.quants.quantize`). This module runs the formats' encoders over chunks of rows in threads;
`encode_blocks` skips the decoding (what a GGUF writer needs). See docs/export.md "Speed".

Example:
    >>> blocks, values = encode(torch.randn(4, 256), "Q4_K")
    >>> blocks.shape
    torch.Size([4, 144])
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from qat.formats import gguf_types

_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# type name -> (elements per block, bytes per block), as gguf's GGML_QUANT_SIZES
BLOCK = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), **{n: (t.block, t.nbytes) for n, t in gguf_types().items()}}
CHUNK_ELEMENTS = 1 << 18


def _encode_float(w, name, values=True):
    t = w.to(_FLOAT[name])
    return t.view(torch.uint8).reshape(w.shape[0], -1), t.float() if values else None


ENCODERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {
    **{n: (lambda w, n=n, **kw: _encode_float(w, n, **kw)) for n in _FLOAT},
    **{n: t.encode for n, t in gguf_types().items()}}  # (chunk, values=, [importance=])
WEIGHTED = {n for n, t in gguf_types().items() if t.weighted}  # the types whose fit an imatrix weighs
WHOLE = {n for n, t in gguf_types().items() if t.tensor_scale}  # a per-tensor multiplier: encoded in one piece


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
    use_imp = importance is not None and type_name in WEIGHTED
    kwargs = {"importance": importance} if use_imp else {}
    fn = ENCODERS[type_name]
    step = max(1, CHUNK_ELEMENTS // w.shape[1])
    if type_name in _FLOAT or type_name in WHOLE or w.shape[0] <= step:
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
