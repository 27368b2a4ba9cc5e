"""GGUF IQ4_NL, added as one format file: its blocks decode in gguf-py to exactly the values the model used;
converted and GGUF-exported-then-loaded models compute exactly what the fake-quant model computed."""
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
from qat.formats.iq4_nl import KVALUES, fit_scale, iq4_nl_spec
from qat.modules.quantizer import TensorQuantizer
from qat.primitives import choose_qparams, compute_range, dequantize, fake_quantize_forward, quantize
from qat.testing import tiny_llama


def _weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 256, generator=g) * torch.logspace(-3, 1, 24).unsqueeze(1)
    w[0, :32] = 0.0  # an all-zero block
    w[1, :32] = -0.25  # a constant block: every weight on the peak level
    w[2, 32:64] = torch.linspace(-1, 1, 32)  # |min| == max: the first one is the peak
    return w


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_fake_quant_values_are_what_gguf_py_decodes():
    spec, w = iq4_nl_spec(), _weights()
    scale, zp = choose_qparams(*compute_range(w, spec), spec)
    fake, mask = fake_quantize_forward(w, scale, zp, spec, need_mask=True)
    codes = quantize(w, scale, zp, spec)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert torch.equal(fake, dequantize(codes, scale, zp, spec))
    # the peak sits on the outermost level (-127); only the opposite extreme, past 125 / 127 of it, is clipped
    assert float(mask.float().mean()) > 0.99
    blocks = gguf_types()["IQ4_NL"].blocks(codes, scale, zp)
    assert blocks.shape == (24, 256 // 32 * 18)
    decoded = gq.dequantize(blocks.numpy(), T.IQ4_NL)
    assert np.array_equal(decoded, fake.numpy())  # atol=0


def test_levels_and_layout():
    spec = iq4_nl_spec()
    scale = torch.ones(1, 1, 1)
    w = torch.tensor(KVALUES * 2, dtype=torch.float32).reshape(1, 32)
    codes = quantize(w, scale, None, spec)
    assert codes.tolist() == [list(range(16)) * 2]
    blocks = gguf_types()["IQ4_NL"].blocks(codes, scale, None)
    # fp16 1.0, then byte j = idx[j] | idx[j + 16] << 4
    assert blocks[0, :2].tolist() == [0, 60] and blocks[0, 2:].tolist() == [i | i << 4 for i in range(16)]
    # ties go to the upper level, as llama.cpp's best_index_int8
    assert quantize(torch.full((1, 32), -115.5), scale, None, spec)[0, 0] == 1


def test_encoder_of_float_weights_decodes_exactly_and_searches_the_scale():
    w = _weights()
    blocks, values = encode(w, "IQ4_NL")
    assert np.array_equal(gq.dequantize(blocks.numpy(), T.IQ4_NL), values.numpy())
    spec = iq4_nl_spec()
    plain = fake_quantize_forward(w, *choose_qparams(*compute_range(w, spec), spec), spec)[0]
    assert float((values - w).pow(2).sum()) < float((plain - w).pow(2).sum())  # the search fits better
    imp = torch.rand(256, generator=torch.Generator().manual_seed(3))
    assert fit_scale(w.reshape(24, -1, 32), imp.reshape(1, -1, 32)).shape == (24, 8, 1)
    blocks_imp, values_imp = encode(w, "IQ4_NL", importance=imp)
    assert np.array_equal(gq.dequantize(blocks_imp.numpy(), T.IQ4_NL), values_imp.numpy())


def test_spec_checks_name_the_fields():
    assert get_format(iq4_nl_spec()).name == "iq4_nl"
    with pytest.raises(ValueError, match="grid='iq4_nl' needs bits=4"):
        qat.QuantSpec(bits=4, granularity="per_group", group_size=64, scale_dtype="fp16", grid="iq4_nl")
    assert bits_per_weight(iq4_nl_spec(), (8, 256)) == 4.5


def test_learned_scale_keeps_its_sign_and_is_the_fp16_the_block_stores():
    w = _weights()
    q = TensorQuantizer(iq4_nl_spec(learn="lsq"), "weight", w)
    assert bool((q.scale < 0).any()) and bool((q.scale > 0).any())  # positive peaks take negative scales
    with torch.no_grad():
        q.scale.mul_(1.0301)  # off the fp16 grid
    wr = w.clone().requires_grad_(True)
    out = q(wr)
    stored = q.qparams(w)[0].detach()  # what convert and the GGUF blocks hold: fp16 values of the same sign
    raw = q.scale.detach()
    assert torch.equal(stored, stored.to(torch.float16).float()) and torch.equal(stored.sign()[raw != 0], raw.sign()[raw != 0])
    assert not torch.equal(stored, raw)
    assert torch.equal(out.detach(), fake_quantize_forward(w, stored, None, iq4_nl_spec())[0])
    out.pow(2).sum().backward()
    assert bool(q.scale.grad.isfinite().all()) and bool(q.scale.grad.abs().sum() > 0)
    assert bool(wr.grad.abs().sum() > 0)


@pytest.fixture
def prepared(token_ids):
    return qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("gguf_iq4_nl"))


def test_converted_equals_fake_quant_and_native_round_trips(prepared, token_ids, tmp_path):
    ref = _logits(prepared, token_ids)
    bpw = qat.control.weight_bits(prepared)[0]
    save_native(prepared, tmp_path / "native")
    qat.convert(prepared)
    assert torch.equal(_logits(prepared, token_ids), ref)  # atol=0
    assert qat.control.weight_bits(prepared)[0] == bpw == 4.5
    assert torch.equal(_logits(qat.export.load_native(tmp_path / "native"), token_ids), ref)


def test_gguf_export_is_format_exact(prepared, token_ids, tmp_path):
    ref = _logits(prepared, token_ids)
    path = export_gguf(prepared, tmp_path / "m.gguf", "F32")  # quantized layers keep their trained type
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "IQ4_NL"
    assert torch.equal(_logits(load_gguf(path), token_ids), ref)


def test_gguf_type_iq4_nl_for_a_float_model(token_ids, tmp_path):
    model = tiny_llama(vocab_size=256)
    path = export_gguf(model, tmp_path / "m.gguf", "IQ4_NL")
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == "IQ4_NL" and types["blk.0.attn_norm.weight"] == "F32"
    loaded = load_gguf(path)
    up = loaded.model.layers[0].mlp.up_proj.weight.detach()
    assert torch.equal(up, encode(model.model.layers[0].mlp.up_proj.weight.detach(), "IQ4_NL")[1])


def test_nearest_level_table_is_bucketize():
    from qat.formats.iq4_nl import LEVELS, nearest_level

    mids = (LEVELS[1:] + LEVELS[:-1]) / 2
    x = torch.cat([torch.linspace(-300, 300, 600_001), mids, torch.nextafter(mids, torch.tensor(-1e9)),
                   torch.nextafter(mids, torch.tensor(1e9)), torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])])
    assert torch.equal(nearest_level(x), torch.bucketize(x, mids, right=True))
