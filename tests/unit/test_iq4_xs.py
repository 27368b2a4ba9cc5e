"""GGUF IQ4_XS, one format file: its blocks decode in gguf-py to exactly the values the model used; the two-level
scales are llama.cpp's; LSQ learns the sub-block scale on the grid; converted and GGUF-exported-then-loaded models
compute exactly what the fake-quant model computed."""
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
from qat.formats import bits_per_weight, get_format, gguf_types
from qat.formats.iq4_nl import KVALUES
from qat.formats.iq4_xs import iq4_xs_spec, scale_grid, scale_levels
from qat.modules.quantizer import TensorQuantizer
from qat.primitives import choose_qparams, compute_range, dequantize, fake_quantize_forward, quantize
from qat.testing import tiny_llama


def _weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 512, generator=g) * torch.logspace(-3, 1, 24).unsqueeze(1)
    w[0, :32] = 0.0  # an all-zero sub-block
    w[1, :256] = 0.0  # an all-zero super-block
    w[2, :32] = -0.25  # a constant sub-block
    w[3, 32:64] = torch.linspace(-1, 1, 32)  # |min| == max: the first one is the peak
    w[4, :32] *= 1e-3  # a sub-block far below its super-block's peak: l = 0
    return w


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_fake_quant_values_are_what_gguf_py_decodes():
    spec, w = iq4_xs_spec(), _weights()
    scale, zp = choose_qparams(*compute_range(w, spec), spec)
    assert scale.shape == (24, 16, 1) and torch.equal(scale_grid(scale), scale)  # on the grid, idempotent
    fake, mask = fake_quantize_forward(w, scale, zp, spec, need_mask=True)
    codes = quantize(w, scale, zp, spec)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert torch.equal(fake, dequantize(codes, scale, zp, spec))
    assert float(mask.float().mean()) > 0.99
    assert bool((fake[1, :256] == 0).all()) and bool((fake[4, :32] == 0).all())
    blocks = gguf_types()["IQ4_XS"].blocks(codes, scale, zp)
    assert blocks.shape == (24, 512 // 256 * 136)
    assert np.array_equal(gq.dequantize(blocks.numpy(), T.IQ4_XS), fake.numpy())  # atol=0


def test_two_level_scales_and_layout():
    # sub-block scales 1, -0.5, 0.3, ...: d = -1/32, l = round(s / d) clamped to -32..31
    s = torch.tensor([1.0, -0.5, 0.3, -1.0, 0.0, 2e-3, 0.5, 0.25]).reshape(1, 8, 1)
    d, lv = scale_levels(s)
    assert float(d) == -1 / 32 and lv.flatten().tolist() == [-32, 16, -10, 31, 0, 0, -16, -8]
    codes = torch.arange(256, dtype=torch.uint8).reshape(1, 256) % 16
    b = gguf_types()["IQ4_XS"].blocks(codes, s, None)[0]
    ls = [x + 32 for x in lv.flatten().int().tolist()]
    assert b[:2].view(torch.float16).item() == -1 / 32
    assert int(b[2]) | int(b[3]) << 8 == sum((v >> 4) << (2 * i) for i, v in enumerate(ls))  # scales_h
    assert b[4:8].tolist() == [(ls[2 * i] & 15) | (ls[2 * i + 1] & 15) << 4 for i in range(4)]  # scales_l
    assert b[8:24].tolist() == [i | i << 4 for i in range(16)]  # byte j: idx[j] | idx[j + 16] << 4
    vals = gq.dequantize(b.numpy()[None], T.IQ4_XS).reshape(8, 32)
    assert vals[0, :16].tolist() == [-1 / 32 * -32 * k for k in KVALUES]


def test_encoder_of_float_weights_decodes_exactly_and_searches_the_scale():
    w = _weights()
    blocks, values = encode(w, "IQ4_XS")
    assert np.array_equal(gq.dequantize(blocks.numpy(), T.IQ4_XS), values.numpy())
    spec = iq4_xs_spec()
    plain = fake_quantize_forward(w, *choose_qparams(*compute_range(w, spec), spec), spec)[0]
    assert float((values - w).pow(2).sum()) < float((plain - w).pow(2).sum())  # the search fits better
    imp = torch.rand(512, generator=torch.Generator().manual_seed(3))
    blocks_imp, values_imp = encode(w, "IQ4_XS", importance=imp)
    assert np.array_equal(gq.dequantize(blocks_imp.numpy(), T.IQ4_XS), values_imp.numpy())
    assert not torch.equal(values_imp, values)


def test_spec_checks_and_bits_per_weight():
    assert get_format(iq4_xs_spec()).name == "iq4_xs"
    with pytest.raises(ValueError, match="grid='iq4_xs' needs bits=4"):
        qat.QuantSpec(bits=4, granularity="per_group", group_size=64, grid="iq4_xs")
    assert bits_per_weight(iq4_xs_spec(), (8, 256)) == 4.25
    assert bits_per_weight(iq4_xs_spec(), (8, 576)) == (576 * 4 + 3 * 64) / 576  # a padded partial super-block


def test_learned_scale_keeps_its_sign_and_stays_on_the_grid():
    w = _weights()
    q = TensorQuantizer(iq4_xs_spec(learn="lsq"), "weight", w)
    assert bool((q.scale < 0).any()) and bool((q.scale > 0).any())  # positive peaks take negative scales
    with torch.no_grad():
        q.scale.mul_(1.03)  # off the grid
    wr = w.clone().requires_grad_(True)
    out = q(wr)
    on_grid = scale_grid(q.scale.detach())
    assert torch.equal(out.detach(), fake_quantize_forward(w, on_grid, None, iq4_xs_spec())[0])
    out.pow(2).sum().backward()
    assert bool(q.scale.grad.isfinite().all()) and bool(q.scale.grad.abs().sum() > 0)


@pytest.mark.parametrize("recipe", ["gguf_iq4_xs", "gguf_iq4_xs_lsq"])
def test_model_converts_and_exports_to_gguf_exactly(token_ids, tmp_path, recipe):
    model = qat.prepare(tiny_llama(vocab_size=256, hidden_size=256, intermediate_size=512), qat.load_recipe(recipe))
    if recipe.endswith("lsq"):  # one step, so the learned scales are off the grid
        opt = torch.optim.SGD([p for n, p in model.named_parameters() if "quantizer" in n], lr=1e-3)
        model(token_ids, labels=token_ids).loss.backward()
        opt.step()
    ref = _logits(model, token_ids)
    path = export_gguf(model, tmp_path / "m.gguf", "F32")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "IQ4_XS"
    assert torch.equal(_logits(load_gguf(path), token_ids), ref)  # atol=0
    save_native(model, tmp_path / "native")
    qat.convert(model)
    assert torch.equal(_logits(model, token_ids), ref)
    assert qat.control.weight_bits(model)[0] == 4.25
    assert torch.equal(_logits(qat.export.load_native(tmp_path / "native"), token_ids), ref)


def test_float_model_to_iq4_xs_falls_back_to_iq4_nl_on_short_rows(tmp_path, caplog):
    model = tiny_llama(vocab_size=256)  # hidden 128: not a multiple of 256
    path = export_gguf(model, tmp_path / "m.gguf", "IQ4_XS")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_down.weight"] == "IQ4_XS" and types["blk.0.ffn_up.weight"] == "IQ4_NL"
    assert "IQ4_XS falls back to IQ4_NL" in caplog.text
    down = load_gguf(path).model.layers[0].mlp.down_proj.weight.detach()
    assert torch.equal(down, encode(model.model.layers[0].mlp.down_proj.weight.detach(), "IQ4_XS")[1])
