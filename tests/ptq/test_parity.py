"""Every PTQ result converts with exact parity (atol=0) on a tiny Llama."""
from __future__ import annotations

import copy

import pytest
import torch

import qat
from qat.ptq import ptq_model

from .conftest import recipe

CASES = {
    "rtn": ("rtn", recipe(group_size=32), {}),
    "rtn_mse": ("rtn", recipe(group_size=32), {"observer": "mse"}),
    "gptq": ("gptq", recipe(group_size=32), {}),
    "gptq_actorder": ("gptq", recipe(group_size=32), {"actorder": True}),
    "gptq_static_asym": ("gptq", recipe(group_size=32, symmetric=False), {"actorder": True, "static_groups": True}),
    "gptq_w3_channel": ("gptq", recipe(bits=3, granularity="per_channel"), {"true_sequential": False}),
    "awq": ("awq", recipe(group_size=32), {}),
    "rtn_ragged": ("rtn", recipe(group_size=48, ragged=True), {"observer": "mse"}),  # 64 = 48 + 16 columns
    "gptq_ragged_actorder": ("gptq", recipe(group_size=48, ragged=True), {"actorder": True}),
    "awq_ragged": ("awq", recipe(group_size=48, symmetric=False, ragged=True), {}),
    "awq_duo": ("awq", recipe(group_size=32, symmetric=False), {"duo_scaling": True}),
    "smoothquant_w8a8": ("smoothquant", "w8a8", {"alpha": 0.8}),
    "smoothquant_w8a8_static": ("smoothquant", "w8a8_static", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_equals_fake_quant(case, tiny_llama, llama_batches):
    method, rec, opts = CASES[case]
    model = ptq_model(copy.deepcopy(tiny_llama), rec, method, llama_batches, progress=False, **opts)
    assert model.qat_ptq["method"] == method
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        fake = model(ids).logits
        assert torch.isfinite(fake).all()
        assert (fake - ref).abs().max() > 0  # something was quantized
        qat.convert(model)
        conv = model(ids).logits
    torch.testing.assert_close(conv, fake, atol=0, rtol=0)


def test_scaling_methods_leave_the_float_model_unchanged(tiny_llama, llama_batches):
    per_token = {"bits": 8, "symmetric": True, "granularity": "per_token", "dynamic": True}
    for method in ("awq", "smoothquant"):  # SmoothQuant needs quantized activations (it refuses weight-only)
        rec = recipe(group_size=32, inp=per_token if method == "smoothquant" else None)
        model = ptq_model(copy.deepcopy(tiny_llama), rec, method, llama_batches, progress=False)
        ids = llama_batches[0]
        with torch.no_grad(), qat.quantization_disabled(model):
            torch.testing.assert_close(model(ids).logits, tiny_llama(ids).logits, atol=1e-4, rtol=1e-4)
