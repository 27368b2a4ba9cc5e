"""Ternary weights and GGUF TQ2_0 / TQ1_0: blocks bit-identical to gguf-py's quantizer, decoded exactly; a ternary
g256 model exports to GGUF exactly in either type; ternary LSQ QAT trains the scale and converts exactly."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

import qat
from qat.export import export_gguf, load_gguf, save_native
from qat.export.common import weight_of
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


def test_tq1_0_blocks_match_gguf_py_and_decode_exactly():
    spec, w = tq2_0_spec(), _weights()
    scale, _ = choose_qparams(*compute_range(w, spec), spec)
    fake = fake_quantize_forward(w, scale, None, spec)[0]
    codes = quantize(w, scale, None, spec)
    blocks = gguf_types()["TQ1_0"].blocks(codes, scale, None)
    assert blocks.shape == (8, 512 // 256 * 54)
    assert np.array_equal(gq.dequantize(blocks.numpy(), T.TQ1_0), fake.numpy())  # atol=0
    assert np.array_equal(blocks.numpy(), gq.quantize(w.numpy(), T.TQ1_0))  # gguf-py's own quantizer agrees here
    # every digit pattern of a byte: 3^5 base-3 numbers through the fixed point decode to their digits
    digits = torch.cartesian_prod(*[torch.tensor([-1.0, 0.0, 1.0])] * 5)  # [243, 5]
    c = torch.zeros(243, 256)
    c[:, 0:160:32], c[:, 160:240:16], c[:, 240:244] = digits, digits, digits[:, :4]
    b = gguf_types()["TQ1_0"].blocks(c, torch.ones(243, 1, 1), None)
    assert np.array_equal(gq.dequantize(b.numpy(), T.TQ1_0), c.numpy())
    enc_blocks, values = encode(w, "TQ1_0")
    assert torch.equal(enc_blocks, blocks) and torch.equal(values, fake)
    assert bits_per_weight(spec, (8, 512)) == 2.0625  # converted weights keep TQ2_0's 2-bit storage


@pytest.mark.parametrize("gguf_type", ["TQ2_0", "TQ1_0"])
def test_tq2_0_model_exports_exactly(token_ids, tmp_path, gguf_type):
    recipe = {**qat.recipes.read_recipe("ternary_g64_lsq"), "name": "tq2_0", "weight": tq2_0_spec(learn="lsq").to_dict()}
    model = tiny_llama(vocab_size=256, hidden_size=256, intermediate_size=512)
    model = qat.prepare(model, recipe)
    ref = _logits(model, token_ids)
    # F32: the trained layers keep their type (TQ2_0), the float ones stay F32; TQ1_0: asked for, so every
    # tensor is TQ1_0 (the float embeddings too): the trained layers' weights are compared
    path = export_gguf(model, tmp_path / "m.gguf", "F32" if gguf_type == "TQ2_0" else gguf_type)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == gguf_type
    loaded = load_gguf(path)
    if gguf_type == "TQ2_0":
        assert torch.equal(_logits(loaded, token_ids), ref)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(loaded.get_parameter(name).detach(), weight_of(model, name).dequantize())


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
