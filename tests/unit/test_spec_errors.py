"""Bad input fails early with a message that names the field and what would be valid."""
import pytest
import torch
from torch import nn

import qat
from qat.spec import QuantSpec


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 1}, r"QuantSpec.bits=1; choose from \[2, 3, 4, 5, 6, 7, 8\]"),
        ({"bits": 9}, r"QuantSpec.bits=9; choose from"),
        ({"granularity": "per_row"}, r"QuantSpec.granularity='per_row'; choose from \['per_tensor'"),
        ({"observer": "maxmin"}, r"QuantSpec.observer='maxmin'; choose from \['minmax', 'moving_average', 'mse', 'percentile'\]"),
        ({"granularity": "per_group"}, r"group_size=None; per_group needs an int >= 2"),
        ({"group_size": 128}, r"only used with granularity='per_group'"),
        ({"dtype": "fp8_e4m3", "bits": 4}, r"fp8 needs bits=8"),
        ({"learn": "lsq", "dynamic": True}, r"needs static ranges"),
        ({"learn": "lsq_plus"}, r"set symmetric=False"),
        ({"scale_dtype": "fp64"}, r"QuantSpec.scale_dtype='fp64'; choose from"),
    ],
    ids=["bits-1", "bits-9", "granularity", "observer", "group-missing", "group-unused", "fp8-bits", "lsq-dynamic", "lsq-plus-sym", "scale-dtype"],
)
def test_quant_spec_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_misspelt_spec_key_is_named():
    with pytest.raises(ValueError, match=r"quant.weight: unknown key\(s\) \['group_szie'\]; valid keys are"):
        qat.QuantRecipe.from_dict({"weight": {"bits": 4, "granularity": "per_group", "group_szie": 128}})


def test_misspelt_recipe_key_is_named():
    with pytest.raises(ValueError, match=r"quant: unknown key\(s\) \['ignroe'\]"):
        qat.QuantRecipe.from_dict({"weight": {"bits": 4}, "ignroe": ["lm_head"]})


def test_misspelt_override_key_is_named():
    recipe = {"weight": {"bits": 4}, "overrides": [{"targets": ["q_proj"], "weight": {"bitz": 6}}]}
    with pytest.raises(ValueError, match=r"quant.overrides\[0\].weight: unknown key\(s\) \['bitz'\]"):
        qat.QuantRecipe.from_dict(recipe)


GRIDS = r"\['uniform', 'block', 'ggml', 'ggml_k', 'iq4_nl', 'iq4_xs', 'mx', 'nvfp4', 'ternary'\]"


@pytest.mark.parametrize("recipe, message", [
    ({"weight": {"bits": 4, "grid": "foo"}}, rf"quant.weight.grid='foo'; choose from {GRIDS}"),
    ({"weight": {"bits": 4}, "overrides": [{"targets": ["q_proj"], "weight": {"grid": "foo"}}]},
     rf"quant.overrides\[0\].weight.grid='foo'; choose from {GRIDS}"),
    ({"weight": {"bits": 4, "dtype": "mxfp4"}}, r"quant.weight.dtype='mxfp4'; choose from \['int', 'fp4_e2m1', "),
    # a format's name where a scheme goes was "dictionary update sequence element #0 has length 1; 2 is required"
    ({"weight": "mxfp4"}, rf"quant.weight='mxfp4': a scheme is a mapping of QuantSpec fields \(null: none\), not a "
                          rf"name; a number format is chosen by its grid, one of {GRIDS}, and dtype"),
    ({"weight": {"bits": 4}, "overrides": [{"targets": ["q_proj"], "weight": "nvfp4"}]},
     rf"quant.overrides\[0\].weight='nvfp4': a scheme is a mapping .* one of {GRIDS}"),  # was: unknown keys 'n', 'v'...
    ({"weight": {"bits": 4}, "overrides": ["mxfp4"]}, r"quant.overrides\[0\]='mxfp4': an override is a mapping"),
], ids=["grid", "override-grid", "dtype", "scheme-as-name", "override-scheme-as-name", "override-as-name"])
def test_unknown_format_or_grid_name_is_one_line_naming_the_key(recipe, message):
    with pytest.raises(ValueError, match=message) as err:
        qat.QuantRecipe.from_dict(recipe)
    assert "\n" not in str(err.value) and str(err.value).startswith("quant.")  # the key first, no config dumped


def test_recipe_that_quantizes_nothing():
    with pytest.raises(ValueError, match="quantizes nothing"):
        qat.QuantRecipe.from_dict({"name": "empty"})


def test_unknown_recipe_name_lists_known():
    with pytest.raises(FileNotFoundError, match=r"known recipes: \[.*'w4a16_g128'"):
        qat.load_recipe("w4a16_g129")


def test_a_directory_is_not_a_recipe(tmp_path):
    from qat.errors import BadFileError

    (tmp_path / "sub.yaml").mkdir()
    for given in (tmp_path, str(tmp_path), tmp_path / "sub.yaml"):
        with pytest.raises(BadFileError, match=r"is a directory; give a recipe YAML file"):
            qat.load_recipe(given)


def test_unknown_observer_args():
    with pytest.raises(ValueError, match="observer 'percentile' got bad observer_args"):
        from qat.observers import build_observer

        build_observer(QuantSpec(observer="percentile", observer_args={"pct": 99}))


def test_target_that_matches_nothing_lists_every_offender(tiny_llama):
    recipe = {"targets": ["re:.*qproj", "Conv2d"], "weight": {"bits": 4}}
    with pytest.raises(ValueError) as err:
        qat.prepare(tiny_llama, recipe)
    assert "target 're:.*qproj' matches no module" in str(err.value)
    assert "target 'Conv2d' matches no module" in str(err.value)
    assert "patterns are class names, module names or 're:<regex>'" in str(err.value)
    assert "quantizable here: classes ['Embedding', 'Linear'], e.g. modules" in str(err.value)


def test_prepare_takes_a_recipe_name(tiny_llama):
    qat.prepare(tiny_llama, "w8a8")
    assert type(tiny_llama.model.layers[0].mlp.down_proj).__name__ == "FakeQuantLinear"
    assert tiny_llama.qat_recipe.name == "w8a8"


def test_k_grid_on_rows_gguf_cannot_hold_warns(tiny_llama, caplog):
    with caplog.at_level("WARNING", logger="qat.transform.prepare"):
        qat.prepare(tiny_llama, "gguf_q4_k")
    assert "rows that are not a multiple of 256" in caplog.text and "not format-exact" in caplog.text


def test_target_of_unquantizable_type(tiny_llama):
    with pytest.raises(ValueError, match=r"matches only modules qat cannot quantize \(LlamaRMSNorm\)"):
        qat.prepare(tiny_llama, {"targets": ["LlamaRMSNorm"], "weight": {"bits": 4}})


def test_override_matching_nothing(tiny_llama):
    recipe = {"weight": {"bits": 4}, "ignore": ["lm_head"], "overrides": [{"targets": ["re:.*down_prj"], "weight": {"bits": 6}}]}
    with pytest.raises(ValueError, match=r"quant.overrides\[0\] target 're:.\*down_prj' matches none"):
        qat.prepare(tiny_llama, recipe)


def test_group_size_that_does_not_divide_lists_all_modules():
    model = nn.Sequential(nn.Linear(96, 8), nn.Linear(8, 8), nn.Linear(200, 4))
    with pytest.raises(ValueError) as err:
        qat.prepare(model, {"weight": {"bits": 4, "granularity": "per_group", "group_size": 64}})
    text = str(err.value)
    assert "0.weight: group_size=64 does not divide the last dimension 96" in text
    assert "1.weight: group_size=64 does not divide the last dimension 8" in text
    assert "2.weight: group_size=64 does not divide the last dimension 200" in text
    assert isinstance(model[0], nn.Linear)  # nothing was swapped


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight(bad):
    model = nn.Sequential(nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[1, 2] = bad
    with pytest.raises(ValueError, match=r"0.weight: 1 NaN/inf value\(s\) in a tensor being quantized"):
        qat.prepare(model, {"weight": {"bits": 8}})


def test_empty_tensor():
    from qat.primitives import check_tensor

    with pytest.raises(ValueError, match=r"layer.weight: cannot quantize an empty tensor \(shape \(0, 4\)\)"):
        check_tensor(torch.empty(0, 4), "layer.weight")
    model = nn.Sequential(nn.Linear(0, 4))
    with pytest.raises(ValueError, match="cannot quantize an empty tensor"):
        qat.prepare(model, {"weight": {"bits": 8}})


def test_prepare_twice_is_refused(tiny_llama):
    qat.prepare(tiny_llama, qat.load_recipe("w4a16_g128"))
    with pytest.raises(ValueError, match="already prepared"):
        qat.prepare(tiny_llama, qat.load_recipe("w4a16_g128"))


def test_kv_cache_without_attention():
    model = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(ValueError, match="no Hugging Face attention module"):
        qat.prepare(model, {"kv_cache": {"bits": 8, "granularity": "per_token"}})


def test_convert_without_prepare(tiny_llama):
    with pytest.raises(ValueError, match="call qat.prepare first"):
        qat.convert(tiny_llama)


def test_uncalibrated_static_activation_is_explained():
    model = nn.Sequential(nn.Linear(16, 4))
    qat.prepare(model, {"input": {"bits": 8, "granularity": "per_tensor"}, "weight": {"bits": 8}})
    qat.set_quantizers(model, roles=["input"], observing=False)
    with pytest.raises(RuntimeError, match="has no range yet: calibrate it"):
        model(torch.randn(2, 16))


def test_state_dict_of_another_scheme_is_refused_naming_the_quantizer(tiny_llama):
    import copy

    a = qat.prepare(copy.deepcopy(tiny_llama), "w4a16_g128")
    b = qat.prepare(copy.deepcopy(tiny_llama), "w4a16_g128_asym")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.weight_quantizer: the checkpoint was "
                                         r"trained with 'int4 sym g128, fp32 scales'"):
        b.load_state_dict(a.state_dict())
    c = qat.prepare(copy.deepcopy(tiny_llama), "w4a16_g128")
    c.load_state_dict(a.state_dict())  # the same scheme loads


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 4.0}, r"QuantSpec.bits=4.0; expected an integer"),
        ({"bits": True}, r"QuantSpec.bits=True; expected an integer"),
        ({"axis": "0"}, r"QuantSpec.axis='0'; expected an integer"),
        ({"symmetric": "false"}, r"QuantSpec.symmetric='false'; use true or false"),
        ({"dynamic": "true"}, r"QuantSpec.dynamic='true'; use true or false"),
        ({"signed": "yes"}, r"QuantSpec.signed='yes'; use true or false \(or null"),
        ({"observer_args": [1, 2]}, r"QuantSpec.observer_args=\[1, 2\]; expected a mapping"),
        ({"observer": "percentile", "observer_args": {"pct": 1}}, r"observer 'percentile' got bad observer_args"),
        ({"observer_args": {"percentile": 99.9}}, r"observer 'minmax' got bad observer_args"),
        ({"observer": "mse", "observer_args": {"grid": 0}}, r"mse: grid=0"),
    ],
    ids=["bits-float", "bits-bool", "axis-str", "symmetric-str", "dynamic-str", "signed-str", "observer-args-list",
         "observer-args-misspelt", "observer-args-of-another-observer", "observer-args-out-of-range"],
)
def test_quant_spec_checks_types_and_observer_args_when_built(kwargs, message):
    # before: a quoted YAML "false" was truthy (symmetric!), bits=4.0 gave 'int4.0' with float qmin/qmax, and
    # observer_args were only checked halfway through prepare, after some modules had been swapped
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_per_channel_axis_out_of_range_is_refused_by_prepare():
    # before: axis=5 on a 2-D weight silently became axis 5 % 2 = 1
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"0.weight: QuantSpec.axis=5 is out of range for a 2-D tensor"):
        qat.prepare(model, {"weight": {"bits": 8, "axis": 5}})


@pytest.mark.parametrize("name", ["w8a8_static", "w4a16_g128_mixed"])
def test_recipe_to_dict_round_trips(name):
    # before: to_dict dropped the description, so from_dict(to_dict(r)) != r
    recipe = qat.load_recipe(name)
    assert qat.QuantRecipe.from_dict(recipe.to_dict()) == recipe


def test_prepare_of_a_bare_linear_says_to_use_from_float():
    # before: "target 'Linear' matches no module; ... quantizable here: classes []" for an nn.Linear
    with pytest.raises(ValueError, match=r"the model itself is a Linear.*FakeQuantLinear.from_float"):
        qat.prepare(nn.Linear(64, 8), "w4a16_g128")


def test_convert_twice_says_already_converted(tiny_llama):
    # before: "the model has no fake-quant modules; call qat.prepare first" for a converted model
    qat.convert(qat.prepare(tiny_llama, "w4a16_g128"))
    with pytest.raises(ValueError, match="already converted"):
        qat.convert(tiny_llama)
