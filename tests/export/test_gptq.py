"""GPTQ v1 export: an independent unpacker (written here from the layout description) recovers exactly
the weights the model used; our loader gives back the same logits."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import qat
from qat.export import export_gptq, load_gptq
from qat.io import load_safetensors
from tests.export.conftest import logits


def recipe(bits=4, sym=True, group=64):
    return qat.QuantRecipe.from_dict({"name": "g", "targets": ["Linear"], "ignore": ["lm_head"], "weight": {
        "bits": bits, "symmetric": sym, "granularity": "per_group", "group_size": group, "scale_dtype": "fp16"}})


def independent_dequant(t: dict, name: str, bits: int) -> np.ndarray:
    """GPTQ v1 by the book: int32 words, value k of a word at bits [k*b, k*b+b); w = (q - (z+1)) * s."""
    per = 32 // bits
    mask = (1 << bits) - 1
    qweight = t[f"{name}.qweight"].numpy().view(np.uint32)            # [in/per, out]
    q = np.stack([(qweight >> (bits * k)) & mask for k in range(per)], axis=1).reshape(-1, qweight.shape[1])
    qzeros = t[f"{name}.qzeros"].numpy().view(np.uint32)              # [groups, out/per]
    z = np.stack([(qzeros >> (bits * k)) & mask for k in range(per)], axis=2).reshape(qzeros.shape[0], -1)
    scales = t[f"{name}.scales"].numpy().astype(np.float32)           # [groups, out]
    g_idx = t[f"{name}.g_idx"].numpy()
    w = (q.astype(np.float32) - (z[g_idx] + 1).astype(np.float32)) * scales[g_idx]
    return w.T                                                         # [out, in]


@pytest.mark.parametrize("bits,sym", [(4, True), (2, False), pytest.param(4, False, marks=pytest.mark.slow),
                                      pytest.param(8, True, marks=pytest.mark.slow)])
def test_independent_unpacker_recovers_the_model_weights(model, ids, tmp_path, bits, sym):
    converted = qat.convert(qat.prepare(model, recipe(bits, sym)))
    ref = logits(converted, ids)
    export_gptq(converted, tmp_path / "g")
    t = load_safetensors(tmp_path / "g" / "model.safetensors")
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        assert np.array_equal(independent_dequant(t, name, bits), converted.get_submodule(name).weight.numpy())
    cfg = json.loads((tmp_path / "g" / "quantize_config.json").read_text())
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["checkpoint_format"]) == (bits, 64, sym, "gptq")
    assert torch.equal(logits(load_gptq(tmp_path / "g"), ids), ref)


def test_unsupported_and_mixed_schemes_are_refused(model, tmp_path):
    with pytest.raises(ValueError, match="GPTQ needs int bits in"):
        export_gptq(qat.prepare(copy.deepcopy(model), recipe(bits=3)), tmp_path / "g")
    mixed = qat.QuantRecipe.from_dict({**recipe().to_dict(), "overrides": [{"targets": ["re:.*down_proj"], "weight": {"bits": 8}}]})
    with pytest.raises(ValueError, match="one \\(bits, group_size, sym\\)"):
        export_gptq(qat.prepare(model, mixed), tmp_path / "g2")


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_ragged_groups_round_trip(tmp_path, sym):
    from tests.export.test_compressed import ragged_model, ragged_recipe

    converted = qat.convert(qat.prepare(ragged_model(), ragged_recipe(sym)))
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    ref = logits(converted, ids)
    export_gptq(converted, tmp_path / "g")
    t = load_safetensors(tmp_path / "g" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    assert t[f"{name}.scales"].shape == (2, 96) and t[f"{name}.qzeros"].shape == (2, 96 * 4 // 32)  # [ceil(I/g), O]
    assert torch.equal(t[f"{name}.g_idx"], (torch.arange(96) // 64).to(torch.int32))
    assert np.array_equal(independent_dequant(t, name, 4), converted.get_submodule(name).weight.numpy())
    assert torch.equal(logits(load_gptq(tmp_path / "g"), ids), ref)
