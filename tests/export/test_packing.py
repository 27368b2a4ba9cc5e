"""qat.packing: pack/unpack is the identity for 2..8 bits, with the documented bit order."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat.packing import pack, packed_numel, unpack


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 6, 8]), n=st.integers(1, 200), seed=st.integers(0, 10_000))
def test_pack_unpack_identity(bits, n, seed):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.numel() == packed_numel(n, bits)
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_bit_order_is_lsb_first(bits):
    codes = torch.arange(8, dtype=torch.uint8) % (2**bits)
    word = int.from_bytes(bytes(pack(codes, bits).tolist()), "little")
    assert [(word >> (bits * i)) & (2**bits - 1) for i in range(8)] == codes.tolist()


def test_out_of_range_codes_and_sizes_are_refused():
    with pytest.raises(ValueError, match="codes must lie in"):
        pack(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 100)
