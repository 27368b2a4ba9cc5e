"""Every recipe in configs/quant composes (plain YAML and Hydra), prepares, trains a step and converts."""
import copy

import pytest
import torch

import qat
from qat.recipes import CONFIG_DIR

NAMES = qat.recipe_names()


def test_there_are_recipes():
    assert {"w4a16_g128", "w8a8", "w4a8_kv8", "w3a16_g64", "fp8_dynamic"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_prepares_trains_and_converts(name, tiny_llama, token_ids):
    recipe = qat.load_recipe(name)
    qat.prepare(tiny_llama, recipe)
    n_quant = sum(1 for _ in qat.quantizers(tiny_llama))
    assert n_quant > 0
    out = tiny_llama(token_ids, labels=token_ids)
    out.loss.backward()
    grads = [p.grad for p in tiny_llama.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    qat.calibrate(tiny_llama, [token_ids])
    with torch.no_grad():
        fake = tiny_llama(token_ids).logits
    qat.convert(tiny_llama)
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(token_ids).logits, fake, atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_composes_with_hydra(name):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR / "quant"), version_base="1.3"):
        cfg = compose(config_name=name)
    recipe = qat.QuantRecipe.from_dict(cfg)
    assert recipe.name == name


@pytest.mark.parametrize("job", ["ptq", "train"])
def test_nvfp4_w4a4_documented_dynamic_override_composes(job):
    """docs/export.md's and the compressed-tensors refusal's `quant.input.static_global=false
    quant.input.dynamic=true` is a plain command-line override (the recipe writes dynamic: false, so no `+`)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=job, overrides=["quant=nvfp4_w4a4", "quant.input.static_global=false",
                                                   "quant.input.dynamic=true"])
        default = compose(config_name=job, overrides=["quant=nvfp4_w4a4"])
    spec = qat.QuantRecipe.from_dict(OmegaConf.to_container(cfg.quant)).base.input
    assert spec.dynamic and not spec.static_global and spec.grid == "nvfp4"
    assert qat.QuantRecipe.from_dict(OmegaConf.to_container(default.quant)) == qat.load_recipe("nvfp4_w4a4")


def test_mixed_precision_override(tiny_llama):
    qat.prepare(tiny_llama, qat.load_recipe("w4a16_g128_mixed"))
    bits = {r["module"]: r["scheme"] for r in qat.summary(tiny_llama)}
    assert "int6" in bits["model.layers.1.mlp.down_proj"] and "int4" in bits["model.layers.1.mlp.up_proj"]
    assert "lm_head" not in bits


def test_kv_cache_is_quantized_where_the_runtime_stores_it(tiny_llama, token_ids):
    tiny_llama.double()  # float64: the cached and uncached matmuls differ by ~1e-16, too little to flip a rounding
    reference = copy.deepcopy(tiny_llama)
    qat.prepare(tiny_llama, {"kv_cache": {"bits": 8, "granularity": "per_token"}})
    attn = tiny_llama.model.layers[0].self_attn
    calls = []
    attn.k_quantizer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    with torch.no_grad():
        full = tiny_llama(token_ids).logits
        assert not torch.allclose(full, reference(token_ids).logits)
        assert calls and calls[0][-1] == attn.head_dim  # keys after RoPE, [B, kv_heads, T, head_dim]
        # decoding with a cache gives the same last-token logits: per-token scales make quantize-at-read
        # equal to quantize-at-store (up to float noise of the matmuls; in float32 that noise flipped a
        # rounding on some machines, hence float64 above)
        prefix = tiny_llama(token_ids[:, :-1], use_cache=True)
        step = tiny_llama(token_ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-10, rtol=1e-10)


def test_quantizer_state_round_trips_through_state_dict(tiny_llama, token_ids):
    recipe = qat.load_recipe("w8a8_static")
    qat.prepare(tiny_llama, recipe)
    qat.calibrate(tiny_llama, [token_ids])
    state = tiny_llama.state_dict()
    from qat.testing import tiny_llama as build

    other = qat.prepare(build(vocab_size=256, seed=5), recipe)
    other.load_state_dict(state)
    for (_, a), (_, b) in zip(qat.quantizers(tiny_llama), qat.quantizers(other)):
        assert a.get_extra_state() == b.get_extra_state()
        assert torch.equal(a.observer.lo, b.observer.lo) and torch.equal(a.observer.hi, b.observer.hi)
    with torch.no_grad():
        torch.testing.assert_close(other(token_ids).logits, tiny_llama(token_ids).logits, atol=0, rtol=0)
