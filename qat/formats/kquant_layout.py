"""The GGUF bit layout of the K-quant blocks Q2_K..Q6_K (what `qat.formats.kquant` writes), as llama.cpp's
block_q*_K structs: fp16 super-block scales, packed sub-block scales / minimums, packed codes."""
from __future__ import annotations

import torch

from qat.formats.common import half_bytes


def _shift_or(parts: torch.Tensor, shifts: list[int], dim: int) -> torch.Tensor:
    """OR of parts.select(dim, i) << shifts[i] (integer parts; uint8 shifts drop the bits above 7)."""
    out = torch.zeros_like(parts.select(dim, 0))
    for i, s in enumerate(shifts):
        out |= parts.select(dim, i) << s
    return out


def _scales_k4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K 12-byte packing of eight 6-bit scales and eight 6-bit minimums."""
    sc, m = sc.int(), m.int()
    b0 = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b1 = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    b2 = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return torch.cat([b0, b1, b2], 1)


def _qs_2bit(u: torch.Tensor) -> torch.Tensor:
    """[nb, 256] 2-bit values -> [nb, 64]: element 128h + 32s + i at bits 2s of byte 32h + i."""
    return _shift_or((u & 3).reshape(-1, 2, 4, 32), [0, 2, 4, 6], 2).reshape(-1, 64)


def _qs_4bit(u: torch.Tensor) -> torch.Tensor:
    """[nb, 256] nibbles -> [nb, 128]: element 64c + i low, 64c + 32 + i high nibble of byte 32c + i."""
    return _shift_or((u & 0xF).reshape(-1, 4, 2, 32), [0, 4], 2).reshape(-1, 128)


def _bitplane(u: torch.Tensor, bit: int) -> torch.Tensor:
    """[nb, 256] -> [nb, 32]: bit `bit` of element 32k + i at bit k of byte i."""
    return _shift_or(((u >> bit) & 1).reshape(-1, 8, 32), list(range(8)), 1)


def _blocks(parts: list[torch.Tensor], rows: int) -> torch.Tensor:
    return torch.cat([p.to(torch.uint8) for p in parts], 1).reshape(rows, -1)


def layout_blocks(name: str, d, dmin, sc, m, q, rows: int) -> torch.Tensor:
    """GGUF blocks [rows, bytes] of K-quant type `name` from its parts: fp16-exact d (and dmin) [nb, 1],
    integer sub-block scales sc (and minimums m) [nb, 256 / sub], codes q [nb, 256] (int16)."""
    # bit fields are cut from uint8 codes (0..63 once offset): byte ops are the cheapest tensor ops
    q = (q + {"Q3_K": 4, "Q6_K": 32}.get(name, 0)).to(torch.uint8)
    if name == "Q2_K":
        parts = [sc.int() | (m.int() << 4), _qs_2bit(q), half_bytes(d), half_bytes(dmin)]
    elif name == "Q4_K":
        parts = [half_bytes(d), half_bytes(dmin), _scales_k4(sc, m), _qs_4bit(q)]
    elif name == "Q5_K":
        parts = [half_bytes(d), half_bytes(dmin), _scales_k4(sc, m), _bitplane(q, 4), _qs_4bit(q)]
    elif name == "Q3_K":
        u, s6 = q, (sc + 32).int()
        low = (s6[:, :8] & 0xF) | ((s6[:, 8:] & 0xF) << 4)
        high = _shift_or(((s6 >> 4) & 3).reshape(-1, 4, 4), [0, 2, 4, 6], 1)
        parts = [_bitplane(u, 2), _qs_2bit(u), low, high, half_bytes(d)]
    else:  # Q6_K
        u = q
        ql = _shift_or((u & 0xF).reshape(-1, 2, 2, 64), [0, 4], 2).reshape(-1, 128)
        qh = _shift_or(((u >> 4) & 3).reshape(-1, 2, 4, 32), [0, 2, 4, 6], 2).reshape(-1, 64)
        parts = [ql, qh, sc.to(torch.int8).view(torch.uint8), half_bytes(d)]
    return _blocks(parts, rows)
