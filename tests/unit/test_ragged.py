"""Ragged last groups (QuantSpec.ragged): a row of I columns in ceil(I / g) groups, the last one shorter.

The reference for every check is the same row cut by hand into its full groups and its short tail,
each quantized as an ordinary (dividing) per_group tensor: ragged quantization must equal it exactly.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qat
from qat.modules import FakeQuantLinear
from qat.observers import build_observer
from qat.primitives import choose_qparams, compute_range, dequantize, fake_quantize_forward, quantize
from qat.spec import QuantSpec, TensorSchemes
from qat.ste import learned_fake_quantize
from qat.testing import tiny_llama


def spec(g: int, **kw) -> QuantSpec:
    return QuantSpec(granularity="per_group", group_size=g, **{"bits": 4, **kw})


def by_pieces(w: torch.Tensor, g: int, **kw) -> torch.Tensor:
    """Fake-quantize the full groups and the tail separately, as two dividing specs."""
    full = w.shape[1] // g * g
    parts = []
    for piece, size in ((w[:, :full], g), (w[:, full:], w.shape[1] - full)):
        s = spec(size, **kw)
        parts.append(fake_quantize_forward(piece, *choose_qparams(*compute_range(piece, s), s), s)[0])
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_ragged_equals_quantizing_the_pieces(bits, symmetric):
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(bits)) * 3
    s = spec(64, bits=bits, symmetric=symmetric, ragged=True)
    scale, zp = choose_qparams(*compute_range(w, s), s)
    assert scale.shape == (16, 2, 1)
    fq, mask = fake_quantize_forward(w, scale, zp, s, need_mask=True)
    assert mask.shape == w.shape
    assert torch.equal(fq, by_pieces(w, 64, bits=bits, symmetric=symmetric))
    codes = quantize(w, scale, zp, s)
    assert torch.equal(dequantize(codes, scale, zp, s), fq)


def test_dividing_rows_are_unchanged_by_the_flag():
    w = torch.randn(4, 128)
    a, b = spec(64), spec(64, ragged=True)
    qa = fake_quantize_forward(w, *choose_qparams(*compute_range(w, a), a), a)[0]
    qb = fake_quantize_forward(w, *choose_qparams(*compute_range(w, b), b), b)[0]
    assert torch.equal(qa, qb)


def test_mse_observer_does_not_count_the_padding():
    w = torch.randn(8, 80, generator=torch.Generator().manual_seed(3))
    w[:, -1] = 40.0  # the element that pads the tail: counted twice it would change the chosen clip
    lo, hi = build_observer(spec(64, ragged=True, observer="mse")).range_of(w)
    head = build_observer(spec(64, observer="mse")).range_of(w[:, :64])
    tail = build_observer(spec(16, observer="mse")).range_of(w[:, 64:])
    assert torch.equal(lo, torch.cat([head[0], tail[0]], 1)) and torch.equal(hi, torch.cat([head[1], tail[1]], 1))


def test_lsq_gradients_equal_the_pieces():
    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(4))
    s = spec(64, ragged=True, learn="lsq")
    scale0, _ = choose_qparams(*compute_range(w, s), s)
    scale = scale0.clone().requires_grad_(True)
    x = w.clone().requires_grad_(True)
    (learned_fake_quantize(x, scale, None, s, "lsq") ** 2).sum().backward()
    grads, xgrads = [], []
    for lo, hi, g in ((0, 64, 64), (64, 96, 32)):
        sp = spec(g, learn="lsq")
        sc = scale0[:, lo // 64:lo // 64 + 1].clone().requires_grad_(True)
        xp = w[:, lo:hi].clone().requires_grad_(True)
        # LSQ's gradient scale uses the mean group length of the whole tensor: match it for the tail
        out = learned_fake_quantize(xp, sc, None, sp, "lsq")
        (out ** 2).sum().backward()
        grads.append(sc.grad * (hi - lo) ** 0.5 / 48 ** 0.5)
        xgrads.append(xp.grad)
    assert torch.equal(x.grad, torch.cat(xgrads, 1))
    torch.testing.assert_close(scale.grad, torch.cat(grads, 1), rtol=1e-5, atol=0)


def test_not_dividing_without_the_flag_names_the_way_out():
    with pytest.raises(ValueError, match=r"layer\.weight: group_size=64 does not divide .* 96.*ragged: true"):
        qat.primitives.check_tensor(torch.randn(4, 96), "layer.weight", spec(64))


@pytest.mark.parametrize("bad, message", [
    ({"granularity": "per_channel", "ragged": True}, "applies to granularity='per_group'"),
    ({"granularity": "per_group", "group_size": 64, "ragged": True, "observer": "percentile"}, "percentile"),
    ({"granularity": "per_group", "group_size": 32, "ragged": True, "grid": "ggml", "scale_dtype": "fp16"},
     "grid='uniform'"),
])
def test_ragged_spec_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(bits=4, **bad)


def test_override_to_per_channel_drops_ragged():
    model = qat.prepare(tiny_llama(vocab_size=256, hidden_size=96, intermediate_size=160), {
        "name": "r", "targets": ["Linear"], "ignore": ["lm_head"],
        "weight": {"bits": 4, "granularity": "per_group", "group_size": 64, "ragged": True},
        "overrides": [{"targets": ["re:.*down_proj"], "weight": {"granularity": "per_channel"}}],
    })
    layers = model.model.layers[0]
    assert layers.mlp.down_proj.weight_quantizer.spec.granularity == "per_channel"
    assert not layers.mlp.down_proj.weight_quantizer.spec.ragged
    assert layers.mlp.up_proj.weight_quantizer.spec.ragged


def test_tiny_model_with_ragged_groups_converts_exactly(token_ids):
    model = tiny_llama(vocab_size=256, hidden_size=96, intermediate_size=160)  # 96 = 64 + 32, 160 = 2 x 64 + 32
    recipe = {"name": "w4_g64r", "targets": ["Linear"], "weight": {"bits": 4, "granularity": "per_group", "group_size": 64, "ragged": True},
              "ignore": ["lm_head"]}
    with pytest.raises(ValueError, match="does not divide"):
        qat.prepare(copy.deepcopy(model), {**recipe, "weight": {**recipe["weight"], "ragged": False}})
    qat.prepare(model, recipe)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.weight_quantizer.qparams(layer.weight)[0].shape == (96, 3, 1)
    with torch.no_grad():
        fake = model(token_ids).logits
        qat.convert(model)
        assert torch.equal(model(token_ids).logits, fake)


def test_fake_quant_linear_trains_with_ragged_lsq():
    fq = FakeQuantLinear.from_float(nn.Linear(96, 8), TensorSchemes(weight=spec(64, ragged=True, learn="lsq")))
    fq(torch.randn(3, 96)).pow(2).sum().backward()
    assert fq.weight_quantizer.scale.grad.shape == (8, 2, 1)
    assert bool(torch.isfinite(fq.weight_quantizer.scale.grad).all())
