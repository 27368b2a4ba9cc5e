"""The compressed-tensors transform config of the online rotations: compressed-tensors itself, applying what qat
writes to the unrotated float model, rotates the same weights, stores the same keys and values, and keeps the
logits; qat's loader reads it back; sizes it cannot express are warned about, naming them."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

import qat
from qat.export import export, load_any
from qat.export.ct_transforms import transform_config
from qat.testing import tiny_llama
from qat.transform.rotations import apply_rotations

ct_transform = pytest.importorskip("compressed_tensors.transform")
IDS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(3))
KV = {"bits": 8, "granularity": "per_token", "dynamic": True}


def _tiny(**kw):
    return tiny_llama(vocab_size=320, hidden_size=256, intermediate_size=kw.pop("intermediate_size", 512),
                      num_heads=4, num_kv_heads=2, **kw)


class _Capture(torch.nn.Module):
    """Stands in for a KV quantizer: keeps what it sees (the rotated keys / values), returns it unchanged."""

    def __init__(self, store, key):
        super().__init__()
        self.store, self.key = store, key

    def forward(self, x):
        self.store[self.key] = x.detach().clone()
        return x


def _kv_seen(model) -> dict[str, torch.Tensor]:
    """The keys / values layer 0's KV quantizer sees (after RoPE and the KV rotation) on IDS; layer 1 unquantized."""
    seen: dict[str, torch.Tensor] = {}
    attention = model.model.layers[0].self_attn
    attention.k_quantizer, attention.v_quantizer = _Capture(seen, "k"), _Capture(seen, "v")
    model.model.layers[1].self_attn.k_quantizer = model.model.layers[1].self_attn.v_quantizer = None
    seen["logits"] = model(IDS).logits
    return seen


def test_compressed_tensors_applies_our_config_as_we_do():
    """R4 (down_proj, 512) and llama.cpp's K / V rotation (head 64) as compressed-tensors' own
    `apply_transform_config` applies them to the float model: the same fused weights, the same rotated keys and
    values stored, the same logits."""
    base = _tiny()
    recipe = {"targets": ["Linear"], "ignore": ["lm_head", "re:.*_proj"], "kv_cache": KV}
    plain = _kv_seen(qat.prepare(copy.deepcopy(base), recipe))
    ours = qat.prepare(copy.deepcopy(base), {**recipe, "rotations": {"r4": "hadamard", "kv_cache": "llama_cpp"}})
    config, held = transform_config(ours)
    assert sorted(config["config_groups"]) == ["input_rotation_row", "k_rotation_64", "v_rotation_64"]
    assert sorted(held["input"]) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert sorted(held["kv"]) == [f"model.layers.{i}.self_attn" for i in range(2)]
    seen = _kv_seen(ours)
    assert torch.allclose(seen["logits"], plain["logits"], atol=1e-5)

    theirs = copy.deepcopy(base)
    tconfig = ct_transform.TransformConfig.model_validate(json.loads(json.dumps(config)))
    ct_transform.apply_transform_config(theirs, tconfig)
    for i in range(2):
        assert torch.allclose(theirs.model.layers[i].mlp.down_proj.weight,
                              ours.model.layers[i].mlp.down_proj.weight, atol=1e-6)
    attention = theirs.model.layers[0].self_attn
    values = []
    attention.v_proj.register_forward_hook(lambda m, a, out: values.append(out.detach()))
    # compressed-tensors 0.20.1's k_cache hook looks for a `past_key_values` argument that transformers 5.24
    # renamed to `cache`, so in this pairing its keys reach attention unrotated: the key transform is checked
    # as a module (the matrix and the place it names: post-RoPE keys), the logits without it
    assert torch.allclose(attention.k_rotation_64_k_cache(plain["k"]), seen["k"], atol=1e-5)
    assert torch.allclose(attention.k_rotation_64_q_attn(plain["k"]), seen["k"], atol=1e-5)
    without_k = copy.deepcopy(base)
    ct_transform.apply_transform_config(without_k, ct_transform.TransformConfig.model_validate(
        {"config_groups": {k: v for k, v in tconfig.config_groups.items() if k != "k_rotation_64"}}))
    assert torch.allclose(without_k(IDS).logits, plain["logits"], atol=1e-5)
    theirs(IDS)
    stored_v = values[0].reshape(*values[0].shape[:2], -1, 64).transpose(1, 2)  # [batch, kv heads, seq, 64]
    assert torch.allclose(stored_v, seen["v"], atol=1e-5) and not torch.allclose(stored_v, plain["v"], atol=1e-3)


def test_export_writes_it_and_the_loader_reads_it_back(tmp_path, caplog):
    recipe = {"targets": ["Linear"], "ignore": ["lm_head"], "weight": {"bits": 4, "granularity": "per_group",
              "group_size": 32}, "kv_cache": {"bits": 8, "granularity": "per_token", "dynamic": True},
              "rotations": {"r1": "random_hadamard", "r3": "hadamard", "r4": "hadamard"}}
    prepared = qat.prepare(_tiny(), recipe)
    with caplog.at_level(logging.WARNING):
        out = export(prepared, tmp_path / "ct", "compressed_tensors")
    # all of them held: no warning about a rotation (the INFO lines of prepare may be in caplog from earlier)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "rotation" in r.getMessage()]
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["transform_config"]["config_groups"]
    assert {k: [a["location"] for a in g["apply"]] for k, g in groups.items()} == {
        "input_rotation_row": ["input", "weight_input"], "k_rotation_64": ["q_attn", "k_cache"]}
    loaded = load_any(out)
    assert loaded.model.layers[1].mlp.down_proj.input_rotation.size == 512
    assert loaded.model.layers[0].self_attn.qat_kv_rotation.k_block == 64
    for module in prepared.modules():  # compressed-tensors keeps no per-token KV scheme: compare without it
        if hasattr(module, "k_quantizer"):
            module.k_quantizer = module.v_quantizer = None
    want = prepared(IDS).logits
    assert torch.allclose(loaded(IDS).logits, want, atol=1e-5)
    loaded.model.layers[1].mlp.down_proj.input_rotation = torch.nn.Identity()  # without it: another model
    assert not torch.allclose(loaded(IDS).logits, want, atol=1e-2)


def test_sizes_it_cannot_express_are_warned_naming_them(tmp_path, caplog):
    model = apply_rotations(_tiny(intermediate_size=384), {"r4": "hadamard"})  # 384 = H12 (x) H32
    config, held = transform_config(model)
    assert config is None and held == {"input": [], "kv": []}
    prepared = qat.prepare(model, {"targets": ["Linear"], "ignore": ["lm_head"], "weight": {"bits": 8}})
    with caplog.at_level(logging.WARNING):
        export(prepared, tmp_path / "ct", "compressed_tensors")
    assert "online input rotation (R4 Hadamard) of 2 module(s) (model.layers.0.mlp.down_proj" in caplog.text
    assert "size 384 (blocks of 384)" in caplog.text and "power-of-two sizes only" in caplog.text
