"""compressed-tensors config groups resolved as compressed-tensors resolves them (`qat.export.ct_targets`): one group
per module, an exact name before regexes before class names, a target two groups list belongs to the later, ignore
for all; checked against compressed-tensors' own `apply_quantization_config` on a tiny Llama."""
from __future__ import annotations

import logging
import re

import pytest
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                             apply_quantization_config)
from torch import nn

from qat.errors import BadFileError
from qat.export.ct_experts import EXPERT_PROJ
from qat.export.ct_targets import group_targets, module_classes
from qat.testing import tiny_llama

# llm-compressor's mixed recipes: a class for everything, regexes and names for some layers, one target in two groups
OVERLAPPING = {
    "g0": ["Linear"],
    "g1": ["re:.*down_proj", "re:.*down_proj"],  # a duplicate inside one group
    "g2": ["re:.*mlp.*", "model.layers.1.mlp.down_proj"],  # the exact name beats both regexes
    "g3": ["re:.*self_attn.(q|k)_proj"],
    "g4": ["re:.*down_proj"],  # listed by g1 too: the later group takes it
}
IGNORE = ["lm_head", "re:.*layers.0.self_attn.v_proj"]


def _layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _classes(model):
    return lambda n: module_classes(model, n, lambda key: key, EXPERT_PROJ)  # noqa: E731


def test_overlapping_groups_resolve_as_compressed_tensors_applies_them(caplog):
    model = tiny_llama(num_layers=2, vocab_size=64, hidden_size=64, intermediate_size=128)
    layers = _layers(model)
    # distinct group sizes tell the groups apart after compressed-tensors' deep copy of the config
    schemes = {k: QuantizationScheme(targets=t, weights=QuantizationArgs(num_bits=4, strategy="group",
                                                                         group_size=2 ** (i + 1)))
               for i, (k, t) in enumerate(OVERLAPPING.items())}
    apply_quantization_config(model, QuantizationConfig(config_groups=schemes, ignore=IGNORE), show_progress=False)
    by_size = {s.weights.group_size: k for k, s in schemes.items()}
    theirs = {n: by_size[m.quantization_scheme.weights.group_size] for n, m in model.named_modules()
              if getattr(m, "quantization_scheme", None) is not None}
    groups = {k: {"targets": t} for k, t in OVERLAPPING.items()}
    with caplog.at_level(logging.WARNING):
        ours = group_targets(groups, IGNORE, layers, _classes(model), "config.json")
    assert ours == theirs
    assert ours == {
        "model.layers.0.self_attn.q_proj": "g3", "model.layers.0.self_attn.k_proj": "g3",
        "model.layers.0.self_attn.o_proj": "g0",
        "model.layers.0.mlp.gate_proj": "g2", "model.layers.0.mlp.up_proj": "g2", "model.layers.0.mlp.down_proj": "g4",
        "model.layers.1.self_attn.q_proj": "g3", "model.layers.1.self_attn.k_proj": "g3",
        "model.layers.1.self_attn.v_proj": "g0", "model.layers.1.self_attn.o_proj": "g0",
        "model.layers.1.mlp.gate_proj": "g2", "model.layers.1.mlp.up_proj": "g2", "model.layers.1.mlp.down_proj": "g2"}
    # g1 matches both down_proj layers but loses them (to g4, then to g2's exact name): said, naming it
    assert "config group 'g1' (targets ['re:.*down_proj']) takes no quantized layer of config.json" in caplog.text
    assert "its scheme is not applied" in caplog.text and "'g4'" not in caplog.text


def test_class_targets_resolve_alphabetically_and_name_targets_are_taken_as_given():
    layers = ["lm_head", "m.a_proj"]
    classes = lambda n: ["Linear", "LinearBase", "Module"]  # noqa: E731
    groups = {"a": {"targets": ["Module"]}, "b": {"targets": ["LinearBase"]}, "c": {"targets": ["Linear"]}}
    assert group_targets(groups, [], layers, classes, "f") == {"lm_head": "c", "m.a_proj": "c"}
    groups["d"] = {"targets": ["m.missing_proj"]}  # not stored: the reader names it
    assert group_targets(groups, ["re:m\\.a"], layers, classes, "f") == {"lm_head": "c", "m.missing_proj": "d"}


@pytest.mark.parametrize("groups, ignore, match", [
    ({"g": {"targets": ["re:.*(mlp"]}}, [], r"config.json: config group 'g': target 're:\.\*\(mlp' is not a valid "
                                            r"regular expression \(missing \), unterminated subpattern"),
    ({"g": {"targets": ["Linear"]}}, ["re:[a-"], r"config.json: ignore: target 're:\[a-' is not a valid regular"),
    ({"g": {"targets": "Linear"}}, [], r"config group 'g' targets is Linear; expected a list of strings"),
    ({"g": {"targets": ["Linear"]}}, [3], r"ignore is \[3\]; expected a list of strings")])
def test_bad_targets_are_refused_naming_the_group_and_target(groups, ignore, match):
    with pytest.raises(BadFileError, match=match):
        group_targets(groups, ignore, ["lm_head"], lambda n: ["Linear"], "config.json")


def test_regexes_are_compiled_once(monkeypatch):
    compiled = []
    real = re.compile
    monkeypatch.setattr(re, "compile", lambda p, *a: compiled.append(p) or real(p, *a))
    layers = [f"model.layers.{i}.mlp.down_proj" for i in range(50)]
    groups = {"a": {"targets": ["re:.*down_proj"]}, "b": {"targets": ["re:.*up_proj"]}}
    assert set(group_targets(groups, ["re:.*lm_head"], layers, lambda n: ["Linear"], "f").values()) == {"a"}
    assert sorted(compiled) == [".*down_proj", ".*lm_head", ".*up_proj"]
