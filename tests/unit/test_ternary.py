"""Ternary weights and GGUF TQ2_0: blocks bit-identical to gguf-py's quantizer, decoded exactly; a TQ2_0 model
exports to GGUF exactly; ternary LSQ QAT trains the scale and converts exactly."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

import qat
from qat.export import export_gguf, load_gguf, save_native
from qat.export.ggml_blocks import encode
from qat.formats import bits_per_weight, gguf_types
from qat.formats.ternary import tq2_0_spec
from qat.primitives import choose_qparams, compute_range, fake_quantize_forward, quantize
from qat.testing import tiny_llama


def _weights() -> torch.Tensor:
    w = torch.randn(8, 512, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 8).unsqueeze(1)
    w[0, :256] = 0.0
    w[1, :256] = torch.linspace(-1, 1, 256)
    w[1, 7] = 0.5  # a tie: roundf goes away from zero
    return w


def test_blocks_match_gguf_py_and_decode_exactly():
    spec, w = tq2_0_spec(), _weights()
    scale, _ = choose_qparams(*compute_range(w, spec), spec)
    fake = fake_quantize_forward(w, scale, None, spec)[0]
    codes = quantize(w, scale, None, spec)
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) == {-1, 0, 1} and int(codes[1, 7]) == 1
    blocks = gguf_types()["TQ2_0"].blocks(codes, scale, None)
    assert np.array_equal(gq.dequantize(blocks.numpy(), T.TQ2_0), fake.numpy())
    assert np.array_equal(blocks.numpy(), gq.quantize(w.numpy(), T.TQ2_0))  # gguf-py's own quantizer agrees here
    enc_blocks, values = encode(w, "TQ2_0")
    assert torch.equal(enc_blocks, blocks) and torch.equal(values, fake)
    assert bits_per_weight(spec, (8, 512)) == 2.0625
    with pytest.raises(ValueError, match="grid='ternary' needs bits=2"):
        qat.QuantSpec(bits=3, granularity="per_group", group_size=256, scale_dtype="fp16", grid="ternary")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_tq2_0_model_exports_exactly(token_ids, tmp_path):
    recipe = {**qat.recipes.read_recipe("ternary_g64_lsq"), "name": "tq2_0", "weight": tq2_0_spec(learn="lsq").to_dict()}
    model = tiny_llama(vocab_size=256, hidden_size=256, intermediate_size=512)
    model = qat.prepare(model, recipe)
    ref = _logits(model, token_ids)
    path = export_gguf(model, tmp_path / "m.gguf", "F32")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "TQ2_0"
    assert torch.equal(_logits(load_gguf(path), token_ids), ref)


def test_ternary_lsq_trains_the_scale_and_converts_exactly(token_ids, tmp_path):
    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("ternary_g64_lsq"))
    q = model.model.layers[0].mlp.down_proj.weight_quantizer
    before = q.scale.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(token_ids, labels=token_ids).loss.backward()
    assert bool(q.scale.grad.abs().sum() > 0)
    opt.step()
    assert not torch.equal(q.scale.detach(), before)
    ref = _logits(model, token_ids)
    save_native(model, tmp_path / "native")
    qat.convert(model)
    assert torch.equal(_logits(model, token_ids), ref)
    assert torch.equal(_logits(qat.export.load_native(tmp_path / "native"), token_ids), ref)
    assert qat.control.weight_bits(model)[0] == 2.25
