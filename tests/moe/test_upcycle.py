"""scripts/upcycle_moe.py: sparse upcycling of a dense Llama into a Mixtral-style MoE (the real MoE of docs/moe.md)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import qat
from qat.models import load_model
from qat.modules import FakeQuantExperts
from qat.testing import tiny_llama

_spec = importlib.util.spec_from_file_location("upcycle_moe", Path(__file__).parents[2] / "scripts" / "upcycle_moe.py")
upcycle_moe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(upcycle_moe)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_zero_perturbation_gives_the_dense_logits(tied, moe_ids):
    dense = tiny_llama(tie_word_embeddings=tied)
    moe = upcycle_moe.upcycle(dense, num_experts=4, top_k=2, noise=0.0)
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 4
    assert moe.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 2 * 256, 128)
    assert (moe.lm_head.weight is moe.model.embed_tokens.weight) == tied
    with torch.no_grad():
        assert torch.allclose(moe(moe_ids).logits, dense(moe_ids).logits, atol=1e-5, rtol=0)
        # with a perturbation the experts differ, and so does the function (a little)
        noisy = upcycle_moe.upcycle(dense, num_experts=4, noise=0.05)(moe_ids).logits
    diff = (noisy - dense(moe_ids).logits).abs().max()
    assert 1e-4 < diff < 0.5


def test_upcycled_folder_loads_and_quantizes_its_experts(tmp_path, moe_ids):
    moe = upcycle_moe.upcycle(tiny_llama(), num_experts=4, noise=0.01)
    moe.save_pretrained(tmp_path / "moe")
    loaded = load_model(tmp_path / "moe")
    assert torch.equal(loaded(moe_ids).logits, moe(moe_ids).logits)
    qat.prepare(loaded, "w4a16_g128")
    assert isinstance(loaded.model.layers[1].mlp.experts, FakeQuantExperts)


def test_refuses_what_it_cannot_upcycle():
    with pytest.raises(ValueError, match=r"top_k=9 must be in \[1, num_experts=8\]"):
        upcycle_moe.upcycle(tiny_llama(), num_experts=8, top_k=9)
    dense = tiny_llama()
    dense.config.mlp_bias = True
    with pytest.raises(ValueError, match="mlp_bias"):
        upcycle_moe.upcycle(dense)
