"""Offline rotations keep the float model's logits (to float tolerance) on every family qat.testing builds;
online ones (R3, R4, llama.cpp's KV rotation) cancel in float; families a rotation cannot pass are refused."""
from __future__ import annotations

import copy

import pytest
import torch

import qat
from qat.errors import ConfigError
from qat.testing import FAMILIES, MOE_FAMILIES, tiny_model, tiny_moe
from qat.transform.rotations import RotationConfig, apply_rotations

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
R1_REFUSED = {"gemma3_text"}  # post-norms between o_proj / down_proj and the residual


def _model(family):
    if family in MOE_FAMILIES:
        return tiny_moe(family, num_layers=2, experts_implementation="eager").double()
    return tiny_model(family, num_layers=2, vector_noise=0.1).double()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _check(family, config):
    model = _model(family)
    ref = _logits(model)
    rotated = apply_rotations(copy.deepcopy(model), config, has_kv=True)
    got = _logits(rotated)
    # transformers computes RMSNorm in float32 whatever the dtype: float32 tolerance
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()
    return model, rotated


@pytest.mark.parametrize("family", sorted(FAMILIES) + list(MOE_FAMILIES))
@pytest.mark.parametrize("kind", ["hadamard", "random_orthogonal"])
def test_r1_r2_keep_the_logits(family, kind):
    config = {"r2": kind} if family in R1_REFUSED else {"r1": kind, "r2": kind}
    model, rotated = _check(family, config)
    name = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.allclose(rotated.state_dict()[name], model.state_dict()[name])


KV = {"bits": 8, "granularity": "per_token", "dynamic": True}


@pytest.mark.parametrize("rotation", ["r3", "llama_cpp"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_online_rotations_cancel_in_float(family, rotation):
    """R1 + R4 + a key rotation, through qat's KV attention with the quantizers taken out: the float logits.
    (Phi-3's fused qkv_proj has no k_proj: qat quantizes no KV cache there, so no key rotation.)"""
    model = tiny_model(family, num_layers=2, vector_noise=0.1, hidden_size=256, intermediate_size=384).double()
    ref = _logits(model)
    rotations = {"r4": "hadamard", **({} if family in R1_REFUSED else {"r1": "random_hadamard"})}
    if family != "phi3":
        rotations.update({"r3": "hadamard"} if rotation == "r3" else {"kv_cache": "llama_cpp"})
    recipe = {"targets": ["Linear"], "ignore": ["lm_head", "re:.*_proj"], "kv_cache": KV, "rotations": rotations}
    if family == "phi3":
        apply_rotations(model, rotations)
    else:
        qat.prepare(model, recipe)
        for module in model.modules():
            if hasattr(module, "k_quantizer"):
                module.k_quantizer = module.v_quantizer = None
        rot = model.model.layers[0].self_attn.qat_kv_rotation
        assert (rot.k_block, rot.v_block) == ((64, 0) if rotation == "r3" else (64, 64))
    assert hasattr(model.model.layers[1].mlp.down_proj, "input_rotation")
    assert torch.allclose(_logits(model), ref, atol=1e-5, rtol=1e-5)


def test_r1_unties_tied_embeddings():
    model = tiny_model("qwen2", tie_word_embeddings=True, vector_noise=0.1).double()
    ref = _logits(model)
    apply_rotations(model, {"r1": "hadamard"})
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert torch.allclose(_logits(model), ref, atol=1e-5)


def test_gemma_r1_and_moe_r4_are_refused_naming_why():
    with pytest.raises(ConfigError, match="post_attention_layernorm"):
        apply_rotations(_model("gemma3_text"), {"r1": "hadamard"})
    with pytest.raises(ConfigError, match="no down_proj Linear"):
        apply_rotations(_model("qwen3_moe"), {"r4": "hadamard"})


def test_rotation_config_checks_itself():
    with pytest.raises(ConfigError, match=r"r1='givens'; choose from"):
        RotationConfig.from_dict({"r1": "givens"})
    with pytest.raises(ConfigError, match="unknown key"):
        RotationConfig.from_dict({"r5": "hadamard"})
    with pytest.raises(ConfigError, match="both rotate the keys"):
        RotationConfig.from_dict({"r3": "hadamard", "kv_cache": "llama_cpp"})
    with pytest.raises(ConfigError, match="no kv_cache scheme"):
        qat.prepare(_model("llama"), {"weight": {"bits": 4}, "rotations": {"r3": "hadamard"}})
