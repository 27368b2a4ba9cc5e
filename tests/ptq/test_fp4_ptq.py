"""PTQ on the block formats (MXFP4, MXFP8, NVFP4, FP8 blocks, IQ4_NL, IQ4_XS, ternary) and plain fp8: RTN pins on-grid scales and converts exactly;
GPTQ solves on each format's own grid (columns rounded with its rounding and block scales) and beats RTN; GPTQ and
AWQ models convert exactly."""
from __future__ import annotations

import pytest
import torch

import qat
from qat.formats.fp8_block import fp8_block_spec
from qat.formats.iq4_nl import iq4_nl_spec
from qat.formats.iq4_xs import fitted_scale as iq4_xs_fitted_scale
from qat.formats.iq4_xs import iq4_xs_spec, scale_grid
from qat.formats.minifloat import e4m3_scale_grid
from qat.formats.mxfp4 import mxfp4_spec
from qat.formats.mxfp8 import mxfp8_spec
from qat.formats.nvfp4 import nvfp4_spec
from qat.formats.ternary import tq2_0_spec
from qat.modules.quantizer import TensorQuantizer
from qat.primitives import choose_qparams, compute_range, fake_quantize_forward
from qat.ptq import gptq_quantize, ptq_model
from qat.spec import QuantSpec
from qat.testing import tiny_llama

from .conftest import gptq_problem as _problem, output_error as _err

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4_w4a16"])
def test_rtn_converts_exactly(recipe):
    model = ptq_model(tiny_llama(vocab_size=256), recipe, "rtn", [IDS], progress=False)
    with torch.no_grad():
        ref = model(IDS).logits
        assert torch.equal(qat.convert(model)(IDS).logits, ref)


SPECS = {"mxfp4": mxfp4_spec(), "nvfp4": nvfp4_spec(), "iq4_nl": iq4_nl_spec(), "iq4_xs": iq4_xs_spec(),
         "ternary": tq2_0_spec().replace(group_size=64), "mxfp8": mxfp8_spec(), "fp8_block": fp8_block_spec(16)}


@pytest.mark.parametrize("name", list(SPECS))
def test_gptq_on_the_block_grids_stays_on_the_grid_and_beats_rtn(name):
    """GPTQ quantizes every column with the format's own rounding and block scales: fake-quantizing the solution
    with the pinned scales gives it back bit for bit (the codes a converted model and the exports hold)."""
    spec = SPECS[name]
    x, w, gram = _problem()
    h = 2 * gram / x.shape[0]
    res = gptq_quantize(w, h, spec)
    assert res.scale.shape == (32, 512 // spec.group_size, 1) and res.zero_point is None
    assert torch.equal(fake_quantize_forward(res.weight, res.scale, None, spec)[0], res.weight)
    if name in ("nvfp4", "ternary"):  # fitted on the whole original weight (NVFP4: one global for the tensor)
        assert torch.equal(res.scale, choose_qparams(*compute_range(w, spec), spec)[0])
    if name == "nvfp4":
        assert torch.equal(e4m3_scale_grid(res.scale)[0], res.scale)
    if name == "iq4_xs":
        assert torch.equal(scale_grid(res.scale), res.scale)  # two-level scales fitted per super-block
    if name == "mxfp8":
        assert torch.equal(torch.exp2(torch.log2(res.scale).round()), res.scale)  # E8M0: powers of two
    if name == "fp8_block":  # one scale per 16 x 16 block: each band of 16 rows shares its group scales
        assert torch.equal(res.scale, res.scale[::16].repeat_interleave(16, 0))
    rtn = fake_quantize_forward(w, *choose_qparams(*compute_range(w, spec), spec), spec)[0]
    assert _err(w, res.weight, gram) < 0.8 * _err(w, rtn, gram)


def test_gptq_iq4_scales_come_from_the_weighted_search():
    x, w, gram = _problem()
    h = 2 * gram / x.shape[0]
    static = gptq_quantize(w, h, iq4_xs_spec(), static_groups=True)
    assert torch.equal(static.scale, iq4_xs_fitted_scale(w, torch.diag(h)))
    plain = gptq_quantize(w, h, iq4_xs_spec(), static_groups=True, importance_fit=False)
    assert torch.equal(plain.scale, choose_qparams(*compute_range(w, iq4_xs_spec()), iq4_xs_spec())[0])


def _recipe(name):
    if name == "fp8_block":  # 16 x 16 blocks: several bands of rows on the tiny model
        return FP8_BLOCK16
    if name == "ternary_g64":  # ternary_g64_lsq without the learned scale
        return {**qat.recipes.read_recipe("ternary_g64_lsq"), "name": name,
                "weight": SPECS["ternary"].to_dict()}
    return name


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_gptq_on_plain_fp8_rounds_every_column_to_e4m3(granularity, static):
    """fp8 elements on the uniform grid: each column is rounded to E4M3 with the pinned scale (fake-quantizing the
    solution gives it back), and the error pushed onto the columns to come beats rounding the weight alone."""
    spec = QuantSpec(bits=8, dtype="fp8_e4m3", granularity=granularity, group_size=32 if granularity == "per_group"
                     else None)
    x, w, gram = _problem()
    res = gptq_quantize(w, 2 * gram / x.shape[0], spec, static_groups=static)
    assert torch.equal(fake_quantize_forward(res.weight, res.scale, None, spec)[0], res.weight)
    rtn = fake_quantize_forward(w, *choose_qparams(*compute_range(w, spec), spec), spec)[0]
    assert _err(w, res.weight, gram) < 0.8 * _err(w, rtn, gram)


FP8_BLOCK16 = {"name": "fp8_block16", "weight": fp8_block_spec(16).to_dict()}


@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4_w4a16", "gguf_iq4_nl", "gguf_iq4_xs", "ternary_g64", "mxfp8",
                                    "fp8_block"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_on_the_block_grids_convert_exactly(recipe, method):
    model = ptq_model(tiny_llama(vocab_size=256), _recipe(recipe), {"name": method, "min_tokens": 1}, [IDS],
                      progress=False)
    with torch.no_grad():
        ref = model(IDS).logits
        assert torch.isfinite(ref).all()
        assert torch.equal(qat.convert(model)(IDS).logits, ref)


def test_gptq_act_order_with_dynamic_groups_is_refused_on_block_grids():
    with pytest.raises(ValueError, match=r"(?s)gptq: unsupported.*q_proj, .*\): actorder with dynamic groups.*mx grid"):
        ptq_model(tiny_llama(vocab_size=256), "mxfp4", {"name": "gptq", "actorder": True, "min_tokens": 1}, [IDS],
                  progress=False)
    # NVFP4 solves with static groups anyway: act-order works there
    model = ptq_model(tiny_llama(vocab_size=256), "nvfp4_w4a16", {"name": "gptq", "actorder": True, "min_tokens": 1},
                      [IDS], progress=False)
    assert model.model.layers[0].self_attn.q_proj.weight_quantizer.group_index() is None


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
