"""`clip_ratio` of dynamic schemes: each tensor's range times the ratio before the scale is chosen (QuaRot's clipped
activation quantizers), one definition for fake quant, convert and the native export; refused where it cannot apply
or a format cannot hold it."""
from __future__ import annotations

import pytest
import torch

import qat
from qat.errors import ConfigError
from qat.export import check_recipe_format, export, load_any
from qat.modules.quantizer import TensorQuantizer
from qat.spec import QuantSpec
from qat.testing import tiny_llama

torch.manual_seed(0)
X = torch.randn(6, 128) * torch.linspace(0.1, 3.0, 128)  # uneven columns: some tokens' peaks far above the rest


def _by_hand_sym(x, bits, ratio, group):
    """Signed symmetric int: amax of each group of `group` inputs times the ratio, scale amax / ((qmax - qmin) / 2)."""
    view = x.reshape(*x.shape[:-1], -1, group)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    scale = view.abs().amax(-1, keepdim=True) * ratio / ((qmax - qmin) / 2)
    return (torch.clamp(torch.round(view / scale), qmin, qmax) * scale).reshape(x.shape)


def _by_hand_asym(x, bits, ratio):
    """Unsigned asymmetric int per token: min / max (0 included) times the ratio."""
    lo = x.amin(-1, keepdim=True).clamp(max=0) * ratio
    hi = x.amax(-1, keepdim=True).clamp(min=0) * ratio
    qmax = 2 ** bits - 1
    scale = (hi - lo) / qmax
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return (torch.clamp(torch.round(x / scale) + zero, 0, qmax) - zero) * scale


@pytest.mark.parametrize("ratio", [1.0, 0.9, 0.6])
def test_a_clipped_dynamic_scheme_is_the_range_times_the_ratio(ratio):
    sym = QuantSpec(bits=4, granularity="per_group", group_size=64, dynamic=True, clip_ratio=ratio)
    asym = QuantSpec(bits=4, symmetric=False, granularity="per_token", clip_ratio=ratio)
    got_sym = TensorQuantizer(sym, "input", X)(X)
    got_asym = TensorQuantizer(asym, "kv_cache", X)(X)
    assert torch.equal(got_sym, _by_hand_sym(X, 4, ratio, 64))
    assert torch.equal(got_asym, _by_hand_asym(X, 4, ratio))
    if ratio < 1:  # the peaks saturate at the clipped range
        peak = X.reshape(6, 2, 64).abs().amax(-1)
        assert torch.all(got_sym.reshape(6, 2, 64).abs().amax(-1) < peak)


def test_clipping_lowers_the_error_of_4_bit_groups_of_bell_shaped_values():
    # rotated activations are close to Gaussian: in groups of 64 the peak is ~2.4 sigma, the 4-bit step it sets is
    # coarse, and giving up the tail for finer steps pays
    x = torch.randn(4096, 512, generator=torch.Generator().manual_seed(0))
    errors = {r: float((TensorQuantizer(QuantSpec(bits=4, granularity="per_group", group_size=64, dynamic=True,
                                                  clip_ratio=r), "input", x)(x) - x).pow(2).mean())
              for r in (1.0, 0.9)}
    assert errors[0.9] < 0.95 * errors[1.0]


def test_a_clipped_input_passes_no_gradient_where_it_saturates():
    spec = QuantSpec(bits=4, granularity="per_token", dynamic=True, clip_ratio=0.5)
    x = X.clone().requires_grad_(True)
    TensorQuantizer(spec, "input", X)(x).sum().backward()
    peak = X.abs().amax(-1, keepdim=True)
    # the clipped range is 0.5 of the peak: the codes -8..7 times 0.5 * peak / 7.5 reach -0.53 and 0.47 of it
    inside, beyond = X.abs() < peak * 0.45, X.abs() > peak * 0.6
    assert inside.sum() > 100 and beyond.sum() > 20
    assert torch.equal(x.grad[inside], torch.ones_like(x.grad[inside]))
    assert torch.equal(x.grad[beyond], torch.zeros_like(x.grad[beyond]))


@pytest.mark.parametrize("kwargs, message", [
    ({"clip_ratio": 0.0}, r"QuantSpec.clip_ratio=0.0; expected a number in \(0, 1\] \(1: no clipping\)"),
    ({"clip_ratio": 1.5}, r"QuantSpec.clip_ratio=1.5; expected a number in \(0, 1\]"),
    ({"clip_ratio": "0.9"}, r"QuantSpec.clip_ratio='0.9'; expected a number"),
    ({"clip_ratio": True}, r"QuantSpec.clip_ratio=True; expected a number"),
    ({"clip_ratio": float("nan")}, r"QuantSpec.clip_ratio=nan; expected a number in \(0, 1\]"),
    # a held range: its observer (percentile, mse) or a learned range clips it
    ({"clip_ratio": 0.9, "granularity": "per_tensor"},
     r"QuantSpec.clip_ratio=0.9 clips the range each tensor of a dynamic scheme on the uniform grid \(int, fp8\) "
     r"takes, not a held or another grid's range \(int8 sym per_tensor\); held ranges clip with observer "
     r"percentile / mse or learn lsq / pact"),
    # llama.cpp's cache blocks: the runtime takes the whole range
    ({"clip_ratio": 0.9, "granularity": "per_group", "group_size": 32, "grid": "ggml", "dynamic": True,
      "scale_dtype": "fp16"}, r"clip_ratio=0.9 clips the range .* \(int8 sym g32 dyn ggml\); held"),
], ids=["zero", "above-one", "string", "bool", "nan", "static", "ggml"])
def test_bad_clip_ratios_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_a_recipe_names_its_key_and_the_spec_says_it():
    with pytest.raises(ValueError, match=r"quant.input.clip_ratio=2; expected a number in \(0, 1\]"):
        qat.QuantRecipe.from_dict({"weight": {"bits": 4}, "input": {"bits": 4, "granularity": "per_token",
                                                                    "clip_ratio": 2}})
    spec = QuantSpec(bits=4, granularity="per_token", clip_ratio=0.9)
    assert spec.describe() == "int4 sym per_token dyn clip0.9"
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert QuantSpec(bits=4, granularity="per_token").describe() == "int4 sym per_token dyn"  # unchanged at 1
    assert QuantSpec(bits=4, granularity="per_token", clip_ratio=1) == QuantSpec(bits=4, granularity="per_token")


RECIPE = {"targets": ["Linear"], "ignore": ["lm_head"],
          "weight": {"bits": 4, "granularity": "per_group", "group_size": 32},
          "input": {"bits": 4, "granularity": "per_group", "group_size": 32, "dynamic": True, "clip_ratio": 0.9},
          "kv_cache": {"bits": 4, "symmetric": False, "granularity": "per_token", "clip_ratio": 0.95},
          "rotations": {"r1": "hadamard", "r2": "hadamard", "r3": "hadamard", "r4": "hadamard"}}
IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))


def _prepared(recipe=RECIPE):
    torch.manual_seed(0)
    return qat.prepare(tiny_llama(vocab_size=320, hidden_size=256, intermediate_size=512), recipe)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_convert_and_the_native_export_compute_the_clipped_model(tmp_path, symmetric):
    recipe = {**RECIPE, "input": {**RECIPE["input"], "symmetric": symmetric}}
    prepared = _prepared(recipe)
    with torch.no_grad():
        want = prepared(IDS).logits
        unclipped = _prepared({**recipe, "input": {**recipe["input"], "clip_ratio": 1.0},
                               "kv_cache": {**recipe["kv_cache"], "clip_ratio": 1.0}})(IDS).logits
        assert not torch.equal(want, unclipped)  # the ratio changes the model
        loaded = load_any(export(prepared, tmp_path / "n", "native"))
        attention = loaded.model.layers[0].self_attn
        assert loaded.model.layers[0].mlp.down_proj.input_quantizer.spec.clip_ratio == 0.9
        assert attention.k_quantizer.spec.clip_ratio == 0.95
        assert torch.equal(loaded(IDS).logits, want)
        assert torch.equal(qat.convert(prepared)(IDS).logits, want)


def test_compressed_tensors_refuses_a_clipped_input_scheme_before_work(tmp_path):
    recipe = qat.transform.as_recipe({**RECIPE, "rotations": None})
    with pytest.raises(ConfigError, match=r"compressed-tensors: recipe .* clips its dynamic input scheme \(int4 sym "
                       r"g32 dyn clip0.9: clip_ratio=0.9\); compressed-tensors' input_activations have no clip ratio.*"
                       r"format=native stores it \(a model for this format: quant.input.clip_ratio=1\)"):
        check_recipe_format(recipe, "compressed_tensors")
    check_recipe_format(recipe, "gptq")  # activations are not stored there (warned about), as unclipped ones
    with pytest.raises(ConfigError, match=r"model.layers.0.self_attn.q_proj clips its dynamic input scheme"):
        export(_prepared({**RECIPE, "rotations": None}), tmp_path / "ct", "compressed_tensors")
    assert not (tmp_path / "ct").exists()
