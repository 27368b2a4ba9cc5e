"""AWQ beats RTN when a few input channels dominate; SmoothQuant lowers W8A8 per-tensor error."""
from __future__ import annotations

import copy

import pytest
import torch

from qat.ptq import ptq_model, search_clip, smooth_scale
from qat.ptq.awq import output_error, rtn_weight
from qat.primitives import fake_quantize_forward
from qat.spec import QuantSpec

from .conftest import MAPPING, Stack, correlated_inputs, recipe


def _outlier_batches(dim=128, outliers=4, seed=0, n=4, rows=256):
    return list(correlated_inputs(n * rows, dim, seed=seed, outliers=outliers, heavy=False).split(rows))


def _output_mse(model, ref_model, batches):
    with torch.no_grad():
        return sum(float((model(b) - ref_model(b)).pow(2).mean()) for b in batches) / len(batches)


@pytest.mark.parametrize("seed", [0, 1])
def test_awq_beats_rtn_with_dominant_channels(seed):
    ref = Stack(seed=seed).eval()
    data = _outlier_batches(seed=seed, n=8)  # same channels dominate in calibration and test data
    batches, test = data[:4], data[4:]
    rec = recipe(bits=3, group_size=32)
    rtn = ptq_model(copy.deepcopy(ref), rec, "rtn", None, progress=False)
    awq = ptq_model(copy.deepcopy(ref), rec, "awq", batches, progress=False, mappings=MAPPING)
    noclip = ptq_model(copy.deepcopy(ref), rec, "awq", batches, progress=False, mappings=MAPPING, clip=False)
    e_rtn, e_awq, e_noclip = (_output_mse(m, ref, test) for m in (rtn, awq, noclip))
    assert e_noclip < 0.8 * e_rtn  # the scaling alone helps
    assert e_awq <= e_noclip  # and the clip search on top
    assert awq.layers[0].norm.weight.ne(ref.layers[0].norm.weight).any()  # folded into the norm


def test_awq_refuses_a_producer_that_is_not_a_plain_scale():
    ref = Stack(plus_one=True).eval()
    with pytest.raises(ValueError, match="give method.mappings"):
        ptq_model(ref, recipe(), "awq", _outlier_batches(), progress=False, mappings=MAPPING)


def test_awq_folds_through_a_plus_one_norm_given_its_offset():
    """Gemma's (1 + weight) norm: with offset 1 the fold keeps the float function (check_fold passes) and the
    scaling beats RTN as for a plain norm."""
    ref = Stack(plus_one=True).eval()
    data = _outlier_batches(n=8)
    mapping = [{**MAPPING[0], "offset": 1.0}]
    rtn = ptq_model(copy.deepcopy(ref), recipe(bits=3), "rtn", None, progress=False)
    awq = ptq_model(copy.deepcopy(ref), recipe(bits=3), "awq", data[:4], progress=False, mappings=mapping,
                    clip=False)
    assert _output_mse(awq, ref, data[4:]) < 0.8 * _output_mse(rtn, ref, data[4:])
    with pytest.raises(ValueError, match="offset: <number"):
        ptq_model(copy.deepcopy(ref), recipe(), "awq", data[:4], progress=False,
                  mappings=[{**MAPPING[0], "offset": "one"}])


def test_clip_search_never_worse_than_minmax_on_its_objective():
    x = correlated_inputs(1024, 128, seed=3)
    w = torch.randn(32, 128)
    gram = x.t() @ x
    spec = QuantSpec(bits=3, granularity="per_group", group_size=32)
    scale, zp = search_clip(w, gram, spec)
    clipped = fake_quantize_forward(w, scale, zp, spec)[0]
    assert output_error(clipped - w, gram) <= output_error(rtn_weight(w, spec) - w, gram)


W8A8_PER_TENSOR = {"bits": 8, "granularity": "per_tensor", "dynamic": False, "observer": "minmax"}


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothquant_lowers_w8a8_per_tensor_error(alpha):
    ref = Stack(seed=2).eval()
    data = _outlier_batches(seed=2, outliers=3, n=8)
    batches, test = data[:4], data[4:]
    rec = recipe(bits=8, granularity="per_channel", inp=W8A8_PER_TENSOR)
    rtn = ptq_model(copy.deepcopy(ref), rec, "rtn", batches, progress=False)
    sq = ptq_model(copy.deepcopy(ref), rec, "smoothquant", batches, progress=False, mappings=MAPPING, alpha=alpha)
    assert rtn.layers[0].fc.input_quantizer.initialized and sq.layers[0].fc.input_quantizer.initialized
    assert _output_mse(sq, ref, test) < 0.5 * _output_mse(rtn, ref, test)


def test_smooth_scale_keeps_dead_channels_at_one():
    act = torch.tensor([4.0, 0.0, 1.0])
    s = smooth_scale(act, [torch.tensor([[1.0, 2.0, 0.0]])], alpha=0.5)
    assert torch.equal(s[1:], torch.ones(2)) and s[0] == 2.0
