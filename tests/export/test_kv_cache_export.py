"""A KV-cache scheme a format cannot hold is warned about (naming the modules) and its quantizer state is not
written: the export loads back, with the model's weights. GPTQ has no KV cache; compressed-tensors' kv_cache_scheme
holds a static per-tensor scheme (k_scale / v_scale, as vLLM reads them), which loads back with equal logits, but
not qat's per-token dynamic KV."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import qat
from qat.errors import ConfigError
from qat.export import export, load_any
from qat.export.common import weight_of
from qat.io import load_safetensors
from qat.spec import QuantSpec
from tests.export.conftest import logits

KV_RECIPES = ("w4a8_kv8", "w4a4_kv4_rot", "w4a4_g64_kv4_rot", "w4a4_g64_kv4_rot_asym", "w4a8_kv4_rot", "gguf_q4_0_kv_q8_0", "gguf_q4_0_kv_q4_0")
FORMATS = ("compressed_tensors", "gptq")
FOLDER_KV_RECIPES = tuple(r for r in KV_RECIPES if not r.startswith("gguf_"))  # GGUF grids: tests/export/test_llama_cpp_kv.py


def test_the_kv_recipes_are_every_recipe_with_a_kv_cache_scheme():
    assert {r for r in qat.recipe_names() if qat.load_recipe(r).base.kv_cache is not None} == set(KV_RECIPES)


CLIPPED_INPUTS = ("w4a4_g64_kv4_rot_asym",)  # compressed-tensors has no clip ratio: refused (below)
CASES = [(r, f) for r in FOLDER_KV_RECIPES for f in FORMATS if not (r in CLIPPED_INPUTS and f == "compressed_tensors")]


def test_clipped_inputs_recipes_are_those_with_a_clip_ratio():
    clipped = {r for r in KV_RECIPES if (qat.load_recipe(r).base.input or QuantSpec()).clip_ratio != 1.0}
    assert clipped == set(CLIPPED_INPUTS)


@pytest.mark.parametrize("recipe", CLIPPED_INPUTS)
def test_compressed_tensors_refuses_a_clipped_recipe_before_writing(model, ids, tmp_path, recipe):
    prepared = qat.prepare(model, qat.load_recipe(recipe))
    with pytest.raises(ConfigError, match="clip_ratio=0.95"):
        export(prepared, tmp_path / "m", "compressed_tensors")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(("recipe", "fmt"), CASES)
def test_unstorable_kv_scheme_is_warned_not_written_and_the_export_loads(model, ids, tmp_path, caplog, recipe, fmt):
    prepared = qat.prepare(model, qat.load_recipe(recipe))
    qat.calibrate(prepared, [ids])
    with caplog.at_level(logging.WARNING):
        out = export(prepared, tmp_path / "m", fmt)
    kv = [r.getMessage() for r in caplog.records if "KV cache" in r.getMessage() and "not stored" in r.getMessage()]
    assert len(kv) == 1 and "model.layers.0.self_attn" in kv[0]
    assert not [k for k in load_safetensors(out / "model.safetensors") if "_quantizer." in k]
    loaded = load_any(out)
    theirs, ours = loaded.state_dict(), prepared.state_dict()
    for key, value in theirs.items():
        if ".qweight." in key or not isinstance(value, torch.Tensor):
            continue
        assert torch.equal(value, ours[key]), key
    exact = fmt == "compressed_tensors"  # GPTQ stores scales in fp16 (rounded: w4a8_kv8 has fp32 scales)
    for name, module in loaded.named_modules():
        if hasattr(module, "qweight"):
            want = weight_of(prepared, f"{name}.weight").dequantize()
            got = module.qweight.dequantize()
            assert torch.equal(got, want) if exact else torch.allclose(got, want, rtol=2e-3, atol=1e-6), name
    assert loaded(ids).logits.isfinite().all()


STATIC_KV = {"int8_static_kv": {"bits": 8, "granularity": "per_tensor"},
             "fp8_static_kv": {"bits": 8, "dtype": "fp8_e4m3", "granularity": "per_tensor"}}


def _static_kv_model(model, ids, kv):
    prepared = qat.prepare(model, {"targets": ["Linear"], "ignore": ["lm_head"], "kv_cache": kv,
                                   "weight": {"bits": 4, "granularity": "per_group", "group_size": 128}})
    qat.calibrate(prepared, [ids])
    return prepared


@pytest.mark.parametrize("kv", STATIC_KV.values(), ids=STATIC_KV.keys())
def test_static_per_tensor_kv_is_stored_as_compressed_tensors_reads_it(model, ids, tmp_path, caplog, kv):
    from compressed_tensors.quantization import QuantizationConfig

    prepared = _static_kv_model(model, ids, kv)
    with caplog.at_level(logging.WARNING):
        out = export(prepared, tmp_path / "ct", "compressed_tensors")
    assert not [r for r in caplog.records if "KV cache" in r.getMessage()]
    qconfig = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    scheme = qconfig.kv_cache_scheme
    assert (scheme.strategy, scheme.dynamic, scheme.symmetric) == ("tensor", False, True)
    tensors = load_safetensors(out / "model.safetensors")
    attention = prepared.get_submodule("model.layers.1.self_attn")
    assert tensors["model.layers.1.self_attn.k_scale"].shape == (1,)
    assert torch.equal(tensors["model.layers.1.self_attn.v_scale"], attention.v_quantizer.qparams(ids)[0].reshape(1))
    assert not [k for k in tensors if "_quantizer." in k]
    assert torch.equal(logits(load_any(out), ids), logits(prepared, ids))


@pytest.mark.parametrize("kv", STATIC_KV.values(), ids=STATIC_KV.keys())
def test_static_kv_has_no_place_in_gptq_and_is_warned(model, ids, tmp_path, caplog, kv):
    prepared = _static_kv_model(model, ids, kv)
    with caplog.at_level(logging.WARNING):
        out = export(prepared, tmp_path / "g", "gptq")
    assert any("KV cache" in r.getMessage() and "not stored" in r.getMessage() for r in caplog.records)
    assert not [k for k in load_safetensors(out / "model.safetensors") if "_quantizer." in k or k.endswith("_scale")]
    assert load_any(out)(ids).logits.isfinite().all()
