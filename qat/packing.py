"""Bit packing of integer codes, 1..8 bits, shared by `QuantizedLinear` and the exporters.

Bit order (documented, property-tested): codes are taken in chunks of 8; in each chunk, code i occupies
bits [bits*i, bits*i + bits) of a little-endian word of `bits` bytes. For 4 bits this is two codes per
byte, the first in the low nibble; for 2 bits, four per byte from the least significant end; for 3, 5
and 6 bits, 8 codes fill exactly 3, 5 and 6 bytes. The input is padded with zeros to a multiple of 8.

Example:
    >>> pack(torch.tensor([1, 2], dtype=torch.uint8), 4)
    tensor([33, 0, 0, 0], dtype=torch.uint8)
"""
from __future__ import annotations

import torch

__all__ = ["pack", "unpack", "packed_numel"]


def _check_bits(bits: int) -> None:
    if bits not in range(1, 9):
        raise ValueError(f"packing bits={bits}; choose from 1..8")


def packed_numel(numel: int, bits: int) -> int:
    """Bytes that `pack` produces for `numel` codes."""
    _check_bits(bits)
    return numel if bits == 8 else -(-numel // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (each < 2**bits) into a flat uint8 tensor.

    Raises:
        ValueError: bits outside 1..8, or a code that does not fit in `bits`.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"pack: codes must lie in [0, {2**bits - 1}] for bits={bits}")
    if bits == 8:
        return flat.to(torch.uint8)
    if bits in (1, 2, 4):  # whole codes per byte: stay in uint8 (same layout as the general path)
        return _pack_bytewise(flat.to(torch.uint8), bits)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    chunks = flat.to(torch.int64).view(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=flat.device) * bits
    words = (chunks << shifts).sum(dim=1, keepdim=True)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=flat.device) * 8
    return ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack`: the first `numel` codes, as uint8."""
    _check_bits(bits)
    if packed.numel() != packed_numel(numel, bits):
        raise ValueError(
            f"unpack: {packed.numel()} bytes cannot hold {numel} codes of {bits} bits "
            f"(expected {packed_numel(numel, bits)})"
        )
    if bits == 8:
        return packed.reshape(-1)[:numel].to(torch.uint8)
    if bits in (1, 2, 4):
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
        codes = (packed.reshape(-1, 1) >> shifts) & (2**bits - 1)
        return codes.reshape(-1)[:numel]
    data = packed.reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    words = (data << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (words >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)


def _pack_bytewise(flat: torch.Tensor, bits: int) -> torch.Tensor:
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    per = 8 // bits
    chunks = flat.view(-1, per)
    out = chunks[:, 0].clone()
    for i in range(1, per):
        out |= chunks[:, i] << (bits * i)
    return out
