"""GPTQ: lower output error than RTN, act-order lower still, g_idx / static groups match the stored codes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qat
from qat.primitives import choose_qparams, compute_range, dequantize, fake_quantize_forward, quantize
from qat.ptq import gptq_quantize, ptq_model
from qat.ptq.awq import rtn_weight
from qat.spec import QuantSpec

from .conftest import correlated_inputs, recipe

G32 = QuantSpec(bits=4, granularity="per_group", group_size=32)
SPECS = {
    "w4_g32": G32,
    "w3_channel": QuantSpec(bits=3, granularity="per_channel"),
    "w4_g32_asym": QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=32),
    "w8_tensor": QuantSpec(bits=8, granularity="per_tensor"),
    "w4_g32_mse": QuantSpec(bits=4, granularity="per_group", group_size=32, observer="mse"),
}


def _layer_problem(seed=0, out=64, dim=256, n=2048):
    x = correlated_inputs(n, dim, seed=seed)
    w = torch.randn(out, dim, generator=torch.Generator().manual_seed(seed + 100))
    return x, w, 2 * x.t() @ x / n


def _err(x, w, q):
    return float(((x @ (q - w).t()) ** 2).mean())


@pytest.mark.parametrize("key", list(SPECS))
def test_gptq_beats_rtn_and_actorder_beats_gptq(key):
    spec = SPECS[key]
    x, w, h = _layer_problem()
    rtn = _err(x, w, rtn_weight(w, spec))
    plain = _err(x, w, gptq_quantize(w, h, spec).weight)
    act = _err(x, w, gptq_quantize(w, h, spec, actorder=True).weight)
    assert plain < 0.85 * rtn
    assert act < plain


@pytest.mark.parametrize("static", [False, True], ids=["dynamic_groups", "static_groups"])
@pytest.mark.parametrize("key", list(SPECS))
def test_solution_is_its_own_fake_quant(key, static):
    """The solved weight is exactly representable with the returned qparams (and g_idx)."""
    spec = SPECS[key]
    x, w, h = _layer_problem(seed=1)
    res = gptq_quantize(w, h, spec, actorder=True, static_groups=static, blocksize=48)
    again, _ = fake_quantize_forward(res.weight, res.scale, res.zero_point, spec, g_idx=res.g_idx)
    assert torch.equal(again, res.weight)
    codes = quantize(res.weight, res.scale, res.zero_point, spec, res.g_idx)
    assert torch.equal(dequantize(codes, res.scale, res.zero_point, spec, g_idx=res.g_idx), res.weight)


def test_actorder_g_idx_is_a_balanced_group_assignment():
    x, w, h = _layer_problem(seed=2)
    res = gptq_quantize(w, h, G32, actorder=True)
    assert res.g_idx is not None and res.g_idx.shape == (256,)
    assert torch.equal(torch.bincount(res.g_idx), torch.full((8,), 32))
    perm = torch.argsort(torch.diag(h), descending=True)
    assert torch.equal(res.g_idx[perm], torch.arange(256) // 32)  # groups follow the act order
    assert not torch.equal(res.g_idx, torch.arange(256) // 32)


def test_static_groups_use_contiguous_groups_fitted_on_the_original_weight():
    x, w, h = _layer_problem(seed=3)
    res = gptq_quantize(w, h, G32, actorder=True, static_groups=True)
    assert res.g_idx is None
    expected, _ = choose_qparams(*compute_range(w, G32), G32)
    assert torch.equal(res.scale, expected)


def _single_layer(dim=128, out=64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, out))


def _batches(dim=128, n=4, rows=256, seed=0):
    x = correlated_inputs(n * rows, dim, seed=seed)
    return list(x.split(rows))


@pytest.mark.parametrize("opts", [{}, {"actorder": True}, {"actorder": True, "static_groups": True}],
                         ids=["plain", "actorder", "actorder_static"])
def test_model_level_gptq_g_idx_reaches_the_stored_codes(opts):
    model = ptq_model(_single_layer(), recipe(group_size=32), "gptq", _batches(), progress=False, **opts)
    fake = model[0]
    res_w = fake.weight.detach().clone()
    g_idx = fake.weight_quantizer.group_index()
    assert (g_idx is not None) == (opts == {"actorder": True})
    x = torch.randn(8, 128)
    y_fake = model(x)
    assert torch.equal(fake.quantized_weight(), res_w)  # the fake-quant forward reproduces the solution
    qat.convert(model)
    qw = model[0].qweight
    assert (qw.group_index() is None) == (g_idx is None)
    assert torch.equal(qw.dequantize(), res_w)
    torch.testing.assert_close(model(x), y_fake, atol=0, rtol=0)
