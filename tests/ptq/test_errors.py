"""Bad input: a clear error or a documented fallback, never NaN."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qat.ptq import gptq_quantize, method_config, ptq_model
from qat import load_recipe
from qat.spec import QuantSpec

from .conftest import correlated_inputs, recipe


def _layer(dim=64, out=32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, out))


def test_too_few_calibration_samples():
    with pytest.raises(ValueError, match=r"got 8 calibration tokens .* min_tokens=128"):
        ptq_model(_layer(), recipe(), "gptq", [torch.randn(8, 64)], progress=False)
    with pytest.raises(ValueError, match="min_tokens"):
        ptq_model(_layer(), recipe(), "awq", [], progress=False)


def test_group_size_that_does_not_divide():
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        ptq_model(_layer(), recipe(group_size=48), "gptq", [torch.randn(256, 64)], progress=False)


def test_unknown_method_and_option():
    with pytest.raises(KeyError, match="registered"):
        method_config("gptqq")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['act_order'\]"):
        method_config({"name": "gptq", "act_order": True})
    with pytest.raises(ValueError, match="percdamp"):
        method_config("gptq", percdamp=2.0)
    with pytest.raises(ValueError, match="alpha"):
        method_config("smoothquant", alpha=1.5)


def test_unsupported_scheme_is_refused_before_work():
    rec = recipe(bits=4, granularity="per_group", group_size=32) | {"weight": {"bits": 4, "granularity": "per_group",
                                                                           "group_size": 32, "grid": "ggml",
                                                                           "scale_dtype": "fp16"}}
    with pytest.raises(ValueError, match="not supported by this PTQ method"):
        ptq_model(_layer(), rec, "awq", [torch.randn(256, 64)], progress=False)


def test_unsupported_scheme_is_one_line_for_all_its_modules():
    """GGUF Q4_0 under AWQ on a whole model: one line naming the count and the first modules, not one per linear."""
    from qat.testing import tiny_llama
    with pytest.raises(ValueError) as caught:
        ptq_model(tiny_llama(vocab_size=256), load_recipe("gguf_q4_0"), "awq", [torch.randint(0, 256, (4, 64))],
                  progress=False)
    lines = str(caught.value).splitlines()
    assert len(lines) == 2 and lines[1].startswith("  - 14 modules (model.layers.0.self_attn.q_proj, "), lines
    assert lines[1].endswith(", ...): weight scheme int4 sym g32 ggml is not supported by this PTQ method; use a "
                             "static per_tensor / per_channel (axis 0) / per_group scheme on grid uniform or iq4_nl "
                             "or iq4_xs or mx or nvfp4 or ternary or block"), lines


def test_all_zero_inputs_fall_back_to_rtn():
    model = _layer()
    with pytest.warns(RuntimeWarning, match="round-to-nearest"):
        ptq_model(model, recipe(), "gptq", [torch.zeros(256, 64)], progress=False)
    fake = model[0]
    assert torch.isfinite(fake.weight).all() and fake.weight_quantizer.pinned
    assert torch.isfinite(model(torch.randn(4, 64))).all()


def test_singular_hessian_increases_damping():
    v = torch.arange(1.0, 5.0).repeat(16)  # rank-1 Hessian: the second Cholesky pivot is exactly 0
    h = torch.outer(v, v)
    w = torch.randn(32, 64)
    spec = QuantSpec(bits=4, granularity="per_group", group_size=16)
    with pytest.warns(RuntimeWarning, match="singular"):
        res = gptq_quantize(w, h, spec, percdamp=0.0)
    assert res.damp > 0 and torch.isfinite(res.weight).all()


def test_dead_input_channels_are_kept_not_zeroed():
    x = correlated_inputs(512, 64, seed=1)
    x[:, :8] = 0
    w = torch.randn(32, 64)
    res = gptq_quantize(w, 2 * x.t() @ x / 512, QuantSpec(bits=8, granularity="per_channel"))
    assert torch.isfinite(res.weight).all()
    torch.testing.assert_close(res.weight[:, :8], w[:, :8], atol=0.05, rtol=0)


def test_non_finite_hessian_is_an_error():
    h = torch.eye(64)
    h[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        gptq_quantize(torch.randn(8, 64), h, QuantSpec(bits=4, granularity="per_channel"))
