"""One bits-per-weight: the same before and after convert for every recipe, equal to the bytes the native export
stores for the quantized weights (codes, scales, zero-points / minimums, super-block scales) over their count."""
import math

import pytest
import torch

import qat
from qat.control import weight_bits
from qat.export import save_native
from qat.io import load_safetensors
from qat.formats import bits_per_weight
from qat.formats.ggml import ggml_spec
from qat.formats.kquant import kquant_spec
from qat.spec import QuantSpec
from qat.testing import tiny_llama

RECIPES = qat.recipe_names()


def _prepared(recipe: str, token_ids):
    model = qat.prepare(tiny_llama(vocab_size=256), recipe)
    qat.calibrate(model, [token_ids])  # static activation ranges (convert and export need them)
    return model


def _native_weight_bits(folder) -> int:
    tensors = load_safetensors(folder / "model.safetensors")
    return 8 * sum(t.numel() * t.element_size() for k, t in tensors.items() if ".qweight." in k)


@pytest.mark.parametrize("recipe", RECIPES)
def test_same_before_and_after_convert_and_equal_to_the_native_bytes(recipe, token_ids, tmp_path):
    model = _prepared(recipe, token_ids)
    before = weight_bits(model)
    rows_before = {r["module"]: r["bits_per_weight"] for r in qat.summary(model)}
    save_native(model, tmp_path / "native")  # converts module by module on the way
    qat.convert(model)
    assert weight_bits(model) == before
    assert {r["module"]: r["bits_per_weight"] for r in qat.summary(model)} == rows_before
    bpw, n = before
    assert n > 0 and math.isfinite(bpw)
    assert bpw * n == _native_weight_bits(tmp_path / "native")


def test_the_issue_reproduction_q4_1_is_5_bits():
    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("gguf_q4_1"))
    before = [r["bits_per_weight"] for r in qat.summary(model)]
    qat.convert(model)
    assert before == [r["bits_per_weight"] for r in qat.summary(model)] == [5.0] * len(before)


@pytest.mark.parametrize("name, bpw", [("Q8_0", 8.5), ("Q4_0", 4.5), ("Q4_1", 5.0), ("Q5_0", 5.5), ("Q5_1", 6.0)])
def test_legacy_ggml_types_are_their_block_sizes(name, bpw):
    assert bits_per_weight(ggml_spec(name), (4, 64)) == bpw


@pytest.mark.parametrize("name, nbytes", [("Q2_K", 84), ("Q3_K", 110), ("Q4_K", 144), ("Q5_K", 176), ("Q6_K", 210)])
def test_k_quants_are_their_block_sizes(name, nbytes):
    assert bits_per_weight(kquant_spec(name), (4, 512)) == nbytes * 8 / 256


def test_k_quant_partial_super_block_counts_its_padding():
    # 128-wide rows: one half-filled super-block per row, with a whole fp16 d / dmin
    spec = kquant_spec("Q4_K")
    assert bits_per_weight(spec, (2, 128)) == (2 * 128 * 4 + 2 * (16 + 16) + 2 * 8 * 6 * 2) / 256


@pytest.mark.parametrize("kwargs, shape, expected", [
    ({"bits": 4, "granularity": "per_group", "group_size": 128}, (8, 256), 4 + 32 / 128),
    ({"bits": 4, "granularity": "per_group", "group_size": 128, "scale_dtype": "fp16"}, (8, 256), 4 + 16 / 128),
    ({"bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 128}, (8, 256), 4 + (32 + 4) / 128),
    ({"bits": 8, "granularity": "per_channel"}, (16, 64), 8 + 32 / 64),
    ({"bits": 8, "granularity": "per_tensor"}, (16, 64), 8 + 32 / 1024),
    ({"bits": 8, "dtype": "fp8_e4m3", "granularity": "per_channel"}, (16, 64), 8 + 32 / 64),
    # SmolLM2's 576-wide rows at g128 with a shorter last group: 5 fp32 scales a row (the README's 4.27 mix)
    ({"bits": 4, "granularity": "per_group", "group_size": 128, "ragged": True}, (3, 576), 4 + 5 * 32 / 576),
], ids=["g128", "g128-fp16", "g128-asym", "per-channel", "per-tensor", "fp8", "ragged"])
def test_uniform_grids_count_their_scales_from_the_shape(kwargs, shape, expected):
    assert bits_per_weight(QuantSpec(**kwargs), shape) == pytest.approx(expected, abs=1e-12)


def test_act_order_counts_the_group_index():
    spec = QuantSpec(bits=4, granularity="per_group", group_size=32)
    assert bits_per_weight(spec, (8, 64), act_order=True) == bits_per_weight(spec, (8, 64)) + 64 / 8


def test_float_model_has_no_quantized_weights():
    bpw, n = weight_bits(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    assert n == 0 and math.isnan(bpw)
