"""Format-exact QAT on llama.cpp's legacy grids: our blocks are gguf-py's blocks, bit for bit, and a model
prepared with a gguf_* recipe exports to a GGUF file that computes exactly what it computed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

import qat
from qat.export import export_gguf, load_gguf
from qat.export.ggml_blocks import encode
from qat.formats.ggml import LEGACY, ggml_spec
from qat.primitives import choose_qparams, compute_range, dequantize, fake_quantize_forward, quantize
from qat.spec import QuantSpec
from tests.export.conftest import logits

TYPES = sorted(LEGACY) + ["BF16"]


def _weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 512, generator=g) * torch.logspace(-3, 1, 48).unsqueeze(1)
    w[0, :32] = 0.0                       # an all-zero block
    w[1, :32] = 0.25                      # a constant block
    w[2, 32:64] = torch.linspace(-1, 1, 32)  # |min| == max: a tie
    w[3] = torch.randn(512, generator=g).round()  # many exact halves after scaling
    return w


@pytest.mark.parametrize("name", TYPES)
def test_blocks_bit_identical_to_gguf_py(name):
    w = _weights()
    blocks, values = encode(w, name)
    ref = gq.quantize(w.numpy(), T[name])
    assert np.array_equal(blocks.numpy(), ref)
    assert np.array_equal(values.numpy(), gq.dequantize(ref, T[name]))


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_fake_quant_equals_quantize_dequantize(name):
    spec, w = ggml_spec(name), _weights()
    scale, zp = choose_qparams(*compute_range(w, spec), spec)
    fake, mask = fake_quantize_forward(w, scale, zp, spec, need_mask=True)
    assert torch.equal(fake, dequantize(quantize(w, scale, zp, spec), scale, zp, spec))
    # min-max ranges clip nothing, except Q4_0/Q5_0's one-sided grid (the peak's opposite extreme)
    assert bool(mask.all()) if not spec.symmetric or spec.bits == 8 else float(mask.float().mean()) > 0.99


@pytest.mark.parametrize("recipe,name", [("gguf_q4_0", "Q4_0"), ("gguf_q4_1", "Q4_1"),
                                         *[pytest.param(r, n, marks=pytest.mark.slow) for r, n in
                                           (("gguf_q8_0", "Q8_0"), ("gguf_q5_0", "Q5_0"), ("gguf_q5_1", "Q5_1"))]])
def test_format_exact_export_has_zero_additional_error(model, ids, tmp_path, recipe, name):
    prepared = qat.prepare(model, qat.load_recipe(recipe))
    ref = logits(prepared, ids)
    path = export_gguf(prepared, tmp_path / "m.gguf", "F32")  # quantized layers keep their trained type
    reader_types = {t.name: t.tensor_type.name for t in __import__("gguf").GGUFReader(str(path)).tensors}
    assert reader_types["blk.0.attn_q.weight"] == name
    assert torch.equal(logits(load_gguf(path), ids), ref)
    assert torch.equal(logits(prepared, ids), ref)  # exported tensor by tensor, the model is left as it was


def test_ggml_spec_validation_names_the_problem():
    with pytest.raises(ValueError, match="grid='ggml' needs"):
        QuantSpec(bits=4, granularity="per_group", group_size=64, scale_dtype="fp16", grid="ggml")
    with pytest.raises(ValueError, match="grid"):
        QuantSpec(grid="nf4")
    assert "ggml" in ggml_spec("Q4_1").describe()
