"""A rotated, quantized model keeps its online rotations through convert, the native export and torch.save;
the formats that cannot hold them warn, naming the modules."""
from __future__ import annotations

import io
import logging

import torch

import qat
from qat.export import export, load_any
from qat.testing import tiny_llama

ROT = {"r1": "hadamard", "r2": "random_hadamard", "r4": "hadamard", "kv_cache": "llama_cpp"}
RECIPE = {"targets": ["Linear"], "ignore": ["lm_head"], "weight": {"bits": 4, "granularity": "per_group",
          "group_size": 32}, "input": {"bits": 8, "granularity": "per_token", "dynamic": True},
          "kv_cache": {"bits": 4, "granularity": "per_group", "group_size": 32, "dynamic": True}, "rotations": ROT}
IDS = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(1))


def _prepared():
    model = tiny_llama(vocab_size=320, hidden_size=256, intermediate_size=384)
    return qat.prepare(model, RECIPE)


def test_native_export_reloads_the_online_rotations(tmp_path):
    prepared = _prepared()
    want = prepared(IDS).logits
    loaded = load_any(export(prepared, tmp_path / "n", "native"))
    assert hasattr(loaded.model.layers[0].mlp.down_proj, "input_rotation")
    assert loaded.model.layers[1].self_attn.qat_kv_rotation.v_block == 64
    assert torch.equal(loaded(IDS).logits, want)


def test_convert_and_pickle_keep_them():
    prepared = _prepared()
    want = prepared(IDS).logits
    converted = qat.convert(prepared)
    assert torch.equal(converted(IDS).logits, want)
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(IDS).logits, want)


def test_rotations_change_the_quantized_model_not_the_recipe_round_trip():
    recipe = qat.transform.as_recipe(RECIPE)
    assert qat.transform.as_recipe(recipe.to_dict()) == recipe
    assert not torch.equal(_prepared()(IDS).logits, qat.prepare(tiny_llama(vocab_size=320, hidden_size=256,
                           intermediate_size=384), {**RECIPE, "rotations": None})(IDS).logits)


def test_formats_without_online_rotations_warn_naming_the_modules(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        export(_prepared(), tmp_path / "ct", "compressed_tensors")
    text = caplog.text
    # R4 of 384 = H12 (x) H32 has no compressed-tensors transform; llama.cpp's K / V rotation (head 64) has one
    assert "online input rotation (R4 Hadamard) of 2 module(s) (model.layers.0.mlp.down_proj" in text
    assert "key/value rotation" not in text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        export(_prepared(), tmp_path / "gptq", "gptq")
    assert "online input rotation (R4 Hadamard) of 2 module(s) (model.layers.0.mlp.down_proj" in caplog.text
    assert "key/value rotation of 2 attention module(s) (model.layers.0.self_attn" in caplog.text
