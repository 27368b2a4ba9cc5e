"""Native export: exported-then-loaded logits equal the fake-quant logits, for every kind of scheme."""
from __future__ import annotations

import json

import pytest
import torch

import qat
from qat.export import load_any, load_native, save_native
from tests.export.conftest import logits

SLOW = pytest.mark.slow  # the default set keeps one recipe per kind of state; the rest run with -m slow
RECIPES = ["w4a16_g128", "w4a8_kv8", "fp8_dynamic", pytest.param("w4a16_g128_asym", marks=SLOW),
           pytest.param("w3a16_g64", marks=SLOW), pytest.param("w8a8", marks=SLOW), pytest.param("w8_embed", marks=SLOW),
           pytest.param("w4a16_g128_lsq", marks=SLOW), pytest.param("gguf_q4_1", marks=SLOW)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_round_trip_logits_equal(model, ids, tmp_path, recipe):
    prepared = qat.prepare(model, qat.load_recipe(recipe))
    qat.calibrate(prepared, [ids])
    ref = logits(prepared, ids)
    save_native(prepared, tmp_path / "n")
    assert not list((tmp_path / "n").glob("*.tmp"))
    assert torch.equal(logits(load_any(tmp_path / "n"), ids), ref)


def test_tied_embeddings_stored_once(ids, tmp_path):
    from tests.export.conftest import tiny_llama

    prepared = qat.prepare(tiny_llama(tie=True), qat.load_recipe("w8_embed"))
    ref = logits(prepared, ids)
    save_native(prepared, tmp_path / "n")
    assert torch.equal(logits(load_native(tmp_path / "n"), ids), ref)


def test_float_model_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="no quantized modules"):
        save_native(model, tmp_path / "n")


def test_truncated_and_mislabelled_exports_are_refused(model, tmp_path):
    save_native(qat.prepare(model, qat.load_recipe("w4a16_g128")), tmp_path / "n")
    weights = tmp_path / "n" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated safetensors"):
        load_native(tmp_path / "n")
    weights.write_bytes(b"\xff" * 4)
    with pytest.raises(ValueError, match="truncated safetensors"):
        load_native(tmp_path / "n")
    meta = tmp_path / "n" / "qat_quant.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": 99}))
    with pytest.raises(ValueError, match="v99"):
        load_native(tmp_path / "n")


def test_written_files_get_the_usual_mode(model, tmp_path):
    import os

    save_native(qat.prepare(model, qat.load_recipe("w4a16_g128")), tmp_path / "n")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "n" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_ragged_groups_round_trip(tmp_path):
    from tests.export.test_compressed import ragged_model, ragged_recipe

    prepared = qat.prepare(ragged_model(), ragged_recipe(sym=False))
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    ref = logits(prepared, ids)
    save_native(prepared, tmp_path / "n")
    assert torch.equal(logits(load_native(tmp_path / "n"), ids), ref)
