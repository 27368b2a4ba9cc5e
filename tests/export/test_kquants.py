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
        encode(torch.randn(2, 256), "IQ2_XXS")


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", *[pytest.param(n, marks=pytest.mark.slow) for n in ("Q2_K", "Q3_K", "Q5_K")]])
def test_format_exact_k_quant_export_has_zero_additional_error(model, ids, tmp_path, name):
    import gguf

    import qat
    from qat.export import export_gguf, load_gguf
    from tests.export.conftest import logits

    prepared = qat.prepare(model, qat.load_recipe(f"gguf_{name.lower()}"))
    ref = logits(prepared, ids)
    path = export_gguf(prepared, tmp_path / "m.gguf", "F32")  # quantized layers keep their trained type
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.1.ffn_down.weight"] == name
    assert torch.equal(logits(load_gguf(path), ids), ref)


def test_k_quant_rows_not_multiple_of_256_train_and_fall_back_at_export(tmp_path, caplog):
    import logging

    import qat
    from qat.export import export_gguf, load_gguf
    from qat.formats.kquant import kquant_spec
    from qat.testing import tiny_llama
    from tests.export.conftest import logits

    model = tiny_llama(vocab_size=64, hidden_size=128, intermediate_size=384, num_layers=1, num_heads=2,
                       max_position_embeddings=2048, seed=None)
    prepared = qat.prepare(model, qat.load_recipe("gguf_q4_k"))
    ids = torch.randint(0, 64, (1, 8))
    ref = logits(prepared, ids)  # a partial super-block per row: fake quant still defined
    with caplog.at_level(logging.WARNING):
        path = export_gguf(prepared, tmp_path / "m.gguf", "F32")
    assert "Q4_K falls back to Q5_0" in caplog.text and "not format-exact" in caplog.text
    assert torch.nn.functional.cosine_similarity(logits(load_gguf(path), ids).flatten(), ref.flatten(), dim=0) > 0.95
    with pytest.raises(ValueError, match="is Q6_K: it needs symmetric=True"):
        kquant_spec("Q6_K").replace(symmetric=False, signed=False)
