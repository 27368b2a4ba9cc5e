"""PTQ on the 4-bit float formats: RTN pins on-grid scales and converts exactly; GPTQ and AWQ refuse MXFP4 / NVFP4
(their solvers take integer and GGUF block grids only), naming the modules and the grids they take."""
from __future__ import annotations

import pytest
import torch

import qat
from qat.formats.nvfp4 import nvfp4_spec
from qat.modules.quantizer import TensorQuantizer
from qat.primitives import fake_quantize_forward
from qat.ptq import ptq_model
from qat.testing import tiny_llama

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4_w4a16"])
def test_rtn_converts_exactly(recipe):
    model = ptq_model(tiny_llama(vocab_size=256), recipe, "rtn", [IDS], progress=False)
    with torch.no_grad():
        ref = model(IDS).logits
        assert torch.equal(qat.convert(model)(IDS).logits, ref)


@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4_w4a16"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_refuse_fp4_grids(recipe, method):
    with pytest.raises(ValueError, match=rf"(?s){method}: unsupported weight scheme.*q_proj: weight scheme fp4_e2m1"):
        ptq_model(tiny_llama(vocab_size=256), recipe, {"name": method, "min_tokens": 1}, [IDS], progress=False)


def test_nvfp4_learned_scale_stays_on_the_e4m3_grid():
    w = torch.randn(8, 64, requires_grad=True)
    q = TensorQuantizer(nvfp4_spec(learn="lsq"), "weight", w.detach())
    with torch.no_grad():
        q.scale.mul_(1.03)  # off the E4M3 grid
    out = q(w)
    ref = qat.modules.quantized.QuantizedWeight.from_tensor(w, nvfp4_spec(), q.scale.detach(), None).dequantize()
    assert torch.equal(out.detach(), ref)
    assert torch.equal(out.detach(), fake_quantize_forward(w.detach(), q.scale.detach(), None, nvfp4_spec())[0])
    out.pow(2).sum().backward()
    assert bool(q.scale.grad.abs().sum() > 0)
