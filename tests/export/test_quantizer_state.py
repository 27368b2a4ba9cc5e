"""Quantizer state (learned scales, LSQ+ zero-points, PACT clips) is never taken for a model tensor: a model
prepared with a learned-scale recipe exports to GGUF like any non-GGUF-grid model (re-quantized, said so),
and qat-export's pre-flight name check and its bits per weight count the model's weights only."""
from __future__ import annotations

import copy
import logging

import pytest

import qat
from qat.export import export, load_any
from qat.export.gguf_export import check_names
from qat.export.gguf_import import open_gguf
from qat.jobs.measure import file_bits_per_weight
from tests.export.conftest import logits

LEARNED = ("w2a16_g64", "w4a16_g128_lsq", "w8a8_static", "ternary_g64_lsq",  # LSQ+ / LSQ weight scales, PACT input clip
           "fp8_block_lsq")  # GGUF has no FP8 block type: re-quantized
# learned scales on a grid the GGUF file holds exactly (MXFP4: the E8M0 scale; IQ4_XS, NVFP4: their two-level scales;
# TQ2_0: its fp16 scale per 256), so its linears are not re-quantized: tests/unit/test_mxfp4.py, test_iq4_xs.py,
# test_nvfp4.py and tests/export/test_gguf_fallback.py export them exactly
LEARNED_EXACT = ("mxfp4_lsq", "gguf_iq4_xs_lsq", "nvfp4_w4a16_lsq", "nvfp4_w4a4_lsq", "gguf_tq2_0_lsq")


def _prepared(model, recipe, ids):
    prepared = qat.prepare(model, qat.load_recipe(recipe))
    qat.calibrate(prepared, [ids])
    return prepared


def _tensor_names(path) -> set[str]:
    return {t.name for t in open_gguf(path).tensors}


def test_the_learned_recipes_are_every_recipe_with_quantizer_parameters(model):
    found = {r for r in qat.recipe_names()
             if any("_quantizer." in n for n, _ in qat.prepare(copy.deepcopy(model), qat.load_recipe(r)).named_parameters())}
    assert found == set(LEARNED) | set(LEARNED_EXACT)


@pytest.mark.parametrize("gguf_type", ["F16", "Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("recipe", LEARNED)
def test_gguf_of_a_learned_scale_model_is_requantized_and_loads(model, ids, tmp_path, caplog, recipe, gguf_type):
    float_path = export(copy.deepcopy(model), tmp_path / "float.gguf", "gguf", gguf_type)
    prepared = _prepared(model, recipe, ids)
    with caplog.at_level(logging.WARNING):
        path = export(prepared, tmp_path / "m.gguf", "gguf", gguf_type)
    assert _tensor_names(path) == _tensor_names(float_path)  # the model's tensors, no quantizer state
    assert any("re-quantized" in r.getMessage() and "not format-exact" in r.getMessage() for r in caplog.records)
    loaded = load_any(path)
    assert loaded(ids).logits.shape == logits(prepared, ids).shape and loaded(ids).logits.isfinite().all()


@pytest.mark.parametrize("recipe", LEARNED)
def test_export_preflight_and_bits_per_weight_count_model_weights_only(model, ids, tmp_path, recipe):
    path = export(copy.deepcopy(model), tmp_path / "m.gguf", "gguf", "Q8_0")
    prepared = _prepared(copy.deepcopy(model), recipe, ids)
    assert check_names(prepared, repr(recipe)).gguf_arch_name == "llama"  # qat-export's pre-flight for gguf
    assert file_bits_per_weight(path, prepared) == file_bits_per_weight(path, model)
