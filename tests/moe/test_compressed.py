"""compressed-tensors export of MoE models in the per-expert layout vLLM reads (`experts.{i}.gate_proj` ...),
loaded back by qat with equal logits."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import qat
from qat.export import export_compressed_tensors, load_compressed_tensors
from qat.modules import QuantizedExperts
from qat.testing import tiny_moe

RECIPES = {
    "w4a16_g128": "w4a16_g128",
    "w4a16_g128_asym": "w4a16_g128_asym",
    "int8_channel": {"name": "int8_channel", "targets": ["Linear"], "ignore": ["lm_head"],
                     "weight": {"bits": 8, "granularity": "per_channel"}},
    "int8_per_expert": {"name": "int8_tensor", "targets": ["Linear"], "ignore": ["lm_head"],
                        "weight": {"bits": 8, "granularity": "per_tensor"}},
}


@pytest.mark.parametrize("recipe", list(RECIPES.values()), ids=list(RECIPES))
@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_per_expert_layout_round_trip(family, recipe, tmp_path, moe_ids):
    model = qat.prepare(tiny_moe(family, num_experts=4), recipe)
    fake = model(moe_ids).logits
    out = export_compressed_tensors(model, tmp_path / "ct")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert tuple(f.get_tensor("model.layers.0.mlp.experts.3.up_proj.weight_shape").tolist()) == (128, 128)
    for e in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.{e}.{proj}.weight_packed" in keys
    assert not any("gate_up_proj" in k for k in keys)
    assert "model.layers.0.mlp.gate.weight" in keys  # the router, in float
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    targets = [t for g in qconfig["config_groups"].values() for t in g["targets"]]
    assert "model.layers.0.mlp.experts.0.gate_proj" in targets
    back = load_compressed_tensors(out)
    assert isinstance(back.model.layers[0].mlp.experts, QuantizedExperts)
    assert torch.equal(back(moe_ids).logits, fake)
    again = export_compressed_tensors(qat.convert(model), tmp_path / "converted")  # a converted model writes the same
    assert torch.equal(load_compressed_tensors(again)(moe_ids).logits, fake)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "mixtral"])
def test_transformers_with_compressed_tensors_loads_the_moe_export(family, tmp_path, moe_ids):
    """transformers 5 reads the per-expert tensors (decompressed by compressed-tensors, merged into the fused
    experts by its conversion mapping) with equal logits. Symmetric schemes only: with zero-points
    transformers 5.24 + compressed-tensors 0.20 fail on dense layers as well (a zero-point shape mismatch)."""
    import transformers

    model = qat.prepare(tiny_moe(family, num_experts=4), "w4a16_g128")
    fake = model(moe_ids).logits
    out = export_compressed_tensors(model, tmp_path / "ct")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(loaded(moe_ids).logits, fake)


def test_mixtral_uses_its_checkpoint_names(tmp_path, moe_ids):
    """Mixtral checkpoints (what vLLM reads) say block_sparse_moe.experts.{i}.w1 / w3 / w2 and block_sparse_moe.gate."""
    model = qat.prepare(tiny_moe("mixtral", num_experts=4), "w4a16_g128")
    fake = model(moe_ids).logits
    out = export_compressed_tensors(model, tmp_path / "ct")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.layers.0.block_sparse_moe.experts.2.w1.weight_packed", "model.layers.0.block_sparse_moe.experts.2.w3"
            ".weight_packed", "model.layers.0.block_sparse_moe.experts.2.w2.weight_packed",
            "model.layers.0.block_sparse_moe.gate.weight"} <= keys
    assert not any(".mlp." in k for k in keys)
    assert torch.equal(load_compressed_tensors(out)(moe_ids).logits, fake)


FLOAT_ON_EXPERTS = {
    "fp8_channel": {"name": "fp8_channel", "targets": ["Linear"], "ignore": ["lm_head"],
                    "weight": {"bits": 8, "dtype": "fp8_e4m3", "granularity": "per_channel"}},
    "mxfp4": "mxfp4",
    "mxfp8": "mxfp8",
}


@pytest.mark.parametrize("recipe", list(FLOAT_ON_EXPERTS.values()), ids=list(FLOAT_ON_EXPERTS))
def test_float_weights_on_fused_experts_are_refused_before_loading(recipe, tmp_path):
    """compressed-tensors writes fused experts as int groups only: a float-format weight scheme that reaches them
    is refused by check_recipe_format (and qat-ptq's / qat-export's pre-checks) for an MoE folder, naming what
    experts take vs Linear; a dense model, or an override giving the experts an int scheme, passes."""
    from qat.errors import ConfigError
    from qat.export import check_recipe_format
    from qat.jobs.export import run_export
    from qat.jobs.ptq import format_errors
    from qat.models import has_fused_experts

    r = qat.QuantRecipe.from_dict(recipe) if isinstance(recipe, dict) else qat.load_recipe(recipe)
    folder = tmp_path / "moe"
    tiny_moe("qwen3_moe", num_experts=4).save_pretrained(folder)
    assert has_fused_experts(folder) and not has_fused_experts("tiny")
    message = r"fused MoE experts; experts take int weights only .* for Linear layers only"
    with pytest.raises(ConfigError, match=message):
        check_recipe_format(r, "compressed_tensors", experts=True)
    check_recipe_format(r, "compressed_tensors")  # a dense model: Linear layers take it
    int_experts = qat.QuantRecipe.from_dict({**r.to_dict(), "overrides": [
        {"targets": ["Experts"], "weight": {"bits": 4, "dtype": "int", "granularity": "per_group", "group_size": 32,
                                            "grid": "uniform", "symmetric": True}}]})
    check_recipe_format(int_experts, "compressed_tensors", experts=True)
    assert "experts take int weights only" in format_errors(recipe, "compressed_tensors", True)[0]
    with pytest.raises(ConfigError, match=message):
        run_export(str(folder), str(tmp_path / "ct"), format="compressed_tensors", quant=recipe)
    if r.base.input is not None:  # prepare refuses activation quantization of fused experts itself
        return
    with pytest.raises(ConfigError, match=message):
        export_compressed_tensors(qat.prepare(tiny_moe("qwen3_moe", num_experts=4), r), tmp_path / "late")


def test_shared_expert_linears_are_not_taken_for_fused_experts():
    """Shared experts (Qwen2-MoE `shared_expert`, DeepSeek `shared_experts`) are nn.Linear: an fp8 override on them
    passes for an MoE model, and does not exempt a float base scheme from the fused experts' check."""
    from qat.errors import ConfigError
    from qat.export import check_recipe_format
    fp8 = {"bits": 8, "dtype": "fp8_e4m3", "granularity": "per_channel"}
    int4 = {"bits": 4, "dtype": "int", "granularity": "per_group", "group_size": 32, "symmetric": True}
    for shared in ("shared_expert", "mlp.shared_experts"):
        ok = qat.QuantRecipe.from_dict({"name": "s", "targets": ["Linear"], "weight": int4,
                                        "overrides": [{"targets": [shared], "weight": fp8}]})
        check_recipe_format(ok, "compressed_tensors", experts=True)
        float_base = qat.QuantRecipe.from_dict({"name": "f", "targets": ["Linear"], "weight": fp8,
                                                "overrides": [{"targets": [shared], "weight": int4}]})
        with pytest.raises(ConfigError, match="fused MoE experts"):
            check_recipe_format(float_base, "compressed_tensors", experts=True)


def test_expert_pieces_taking_groups_with_different_weights_are_refused(tmp_path):
    """A mixed recipe (`Linear` int8, `re:.*experts.*down_proj` int4, as llm-compressor writes one) gives one fused
    experts module's pieces two weight schemes; qat's QuantizedExperts holds one: refused, naming the experts."""
    from qat.errors import BadFileError

    out = export_compressed_tensors(qat.prepare(tiny_moe("qwen3_moe", num_experts=4), RECIPES["int8_channel"]),
                                    tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    (group,) = q["config_groups"].values()
    q["config_groups"] = {"a": {**group, "targets": ["Linear"]},
                          "b": {**group, "targets": ["re:.*experts.*down_proj"],
                                "weights": {**group["weights"], "num_bits": 4}}}
    (out / "config.json").write_text(json.dumps(config))
    (out / "qat_checksums.json").unlink()  # as another tool would have written it
    with pytest.raises(BadFileError, match=r"the pieces of experts 'model.layers.0.mlp.experts' take config groups "
                                           r"with different weights \(\{'num_bits': 4, .*\{'num_bits': 8, .*under one weights scheme"):
        load_compressed_tensors(out)
