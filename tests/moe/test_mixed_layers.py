"""A Qwen3-MoE whose config mixes dense MLP layers in (mlp_only_layers / decoder_sparse_step): quantizing and GPTQ
work on it; what assumes every layer routes through experts (GGUF layout, AWQ and rotation mappings) refuses it in
one message naming the layers, never a raw AttributeError."""
from __future__ import annotations

import pytest
import torch

import qat
from qat.errors import ConfigError
from qat.export import export_gguf
from qat.ptq import ptq_model
from qat.transform.rotations.learned import attach_learned_rotations

IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))


def _mixed():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, num_experts=4, moe_intermediate_size=128,
                            intermediate_size=256, num_experts_per_tok=2, mlp_only_layers=[0])
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    assert type(model.model.layers[0].mlp).__name__ == "Qwen3MoeMLP"
    return model


def test_gptq_quantizes_the_dense_and_the_routed_layers_and_converts_exactly():
    model = ptq_model(_mixed(), "w4a16_g64", {"name": "gptq", "min_tokens": 1, "min_expert_tokens": 1}, [IDS],
                      progress=False)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "FakeQuantLinear"
    assert type(model.model.layers[1].mlp.experts).__name__ == "FakeQuantExperts"
    with torch.no_grad():
        ref = model(IDS).logits
        assert torch.equal(qat.convert(model)(IDS).logits, ref)


WHY = r"layers \[0\] have a dense MLP \(config mlp_only_layers=\[0\], decoder_sparse_step=1\)"


def test_what_assumes_routed_layers_refuses_naming_them(tmp_path):
    with pytest.raises(ConfigError, match="awq on qwen3_moe: " + WHY):
        ptq_model(_mixed(), "w4a16_g64", {"name": "awq", "min_tokens": 1}, [IDS], progress=False)
    with pytest.raises(ConfigError, match="learned R1 on qwen3_moe: " + WHY):
        attach_learned_rotations(_mixed())
    with pytest.raises(ConfigError, match="rotations.r1 on qwen3_moe: " + WHY):
        qat.prepare(_mixed(), "w4a4_kv4_rot")
    with pytest.raises(ConfigError, match="GGUF export of qwen3_moe: " + WHY):
        export_gguf(qat.prepare(_mixed(), "gguf_q4_0"), tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())
