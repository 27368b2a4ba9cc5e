"""Native export of MoE models: prepared or converted, written and loaded back with equal logits."""
from __future__ import annotations

import copy

import pytest
import torch

import qat
from qat.export.native import load_native, save_native
from qat.modules import QuantizedExperts
from qat.testing import MOE_FAMILIES, tiny_moe


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("recipe", ["w4a16_g128", "w4a16_g128_asym", "gguf_q4_k"])
def test_native_round_trip_equal_logits(family, recipe, tmp_path, moe_ids):
    model = qat.prepare(tiny_moe(family, num_experts=4, hidden_size=256, expert_size=256), recipe)
    fake = model(moe_ids).logits
    save_native(model, tmp_path / "prepared")
    back = load_native(tmp_path / "prepared")
    assert isinstance(back.model.layers[0].mlp.experts, QuantizedExperts)
    assert torch.equal(back(moe_ids).logits, fake)
    converted = qat.convert(copy.deepcopy(model))
    save_native(converted, tmp_path / "converted")
    assert torch.equal(load_native(tmp_path / "converted")(moe_ids).logits, fake)
    assert qat.control.weight_bits(back) == qat.control.weight_bits(model)


def test_per_expert_fp8_round_trip(tmp_path, moe_ids):
    recipe = {"name": "fp8_w", "targets": ["Linear"], "ignore": ["lm_head"],
              "weight": {"bits": 8, "dtype": "fp8_e4m3", "granularity": "per_tensor"}}
    model = qat.prepare(tiny_moe("qwen3_moe", num_experts=4), recipe)
    fake = model(moe_ids).logits
    save_native(model, tmp_path / "m")
    back = load_native(tmp_path / "m")
    assert back.model.layers[0].mlp.experts.qweights["down_proj"].scale.numel() == 4  # one scale per expert
    assert torch.equal(back(moe_ids).logits, fake)
