"""K-quant encoders: gguf-py's reference decoder reads our blocks as exactly the values we report."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from qat.export.ggml_blocks import BLOCK, encode
from qat.primitives import quant_error_db

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
MIN_DB = {"Q2_K": 9.0, "Q3_K": 14.0, "Q4_K": 20.0, "Q5_K": 26.0, "Q6_K": 32.0}  # gaussian weights


@pytest.mark.parametrize("name", K_TYPES)
def test_gguf_py_decodes_our_values_exactly(name):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 1024, generator=g) * torch.logspace(-4, 1, 16).unsqueeze(1)
    w[0, :256] = 0.0
    w[1, :256] = 3.0
    w[2, :16] = 1e-6
    blocks, values = encode(w, name)
    assert blocks.shape == (16, 1024 // 256 * BLOCK[name][1])
    assert np.array_equal(gq.dequantize(blocks.numpy(), T[name]), values.numpy())
    assert torch.equal(values[0, :256], torch.zeros(256))


@pytest.mark.parametrize("name", K_TYPES)
def test_quality_is_that_of_the_format(name):
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(3))
    assert quant_error_db(w, encode(w, name)[1]) > MIN_DB[name]


def test_row_not_multiple_of_block_is_refused_by_the_encoder():
    with pytest.raises(ValueError, match="multiple of 256"):
        encode(torch.randn(2, 576), "Q4_K")
    with pytest.raises(KeyError, match="supported"):
        encode(torch.randn(2, 256), "IQ4_NL")
