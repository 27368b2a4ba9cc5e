"""PTQ pre-flight on a model skeleton (config only, parameters on the meta device): the same refusals as the real
model gives, for every shipped recipe and method, and qat-compare refuses every bad method x scheme row before
the first row runs."""
from __future__ import annotations

import pytest

from qat.errors import ConfigError, grouped_lines
from qat.models import load_model, model_skeleton
from qat.ptq import METHODS, preflight
from qat.recipes import CONFIG_DIR
from qat.testing import tiny_llama

from .conftest import compose_job

RECIPES = sorted(p.stem for p in (CONFIG_DIR / "quant").glob("*.yaml"))
# 96 wide: groups of 32 / 64 fit some rows and not others, so the shape refusals show up too
TINY = {"hidden_size": 96, "intermediate_size": 256, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 256}


def _outcome(model, recipe, methods):
    """The refusal (message) of preparing `model` with `recipe`, else one outcome per method."""
    try:
        preflight(model, recipe)
    except ConfigError as err:
        return str(err)
    outcome = {}
    for method in methods:
        try:
            preflight(model, None, method)
            outcome[str(method)] = "ok"
        except ConfigError as err:
            outcome[str(method)] = str(err)
    return outcome


def test_skeleton_holds_no_weights_and_the_same_modules(tmp_path):
    tiny_llama(**TINY).save_pretrained(tmp_path)
    skeleton = model_skeleton(tmp_path)
    real = load_model(tmp_path)
    assert all(p.is_meta for p in skeleton.parameters())
    assert [(n, p.shape) for n, p in skeleton.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
    with pytest.raises(ConfigError, match="could not load model 'no-such-owner/no-such-model-qat'"):
        model_skeleton("no-such-owner/no-such-model-qat")  # no hub here (or no such repository): one message


@pytest.mark.parametrize("recipe", RECIPES)
def test_preflight_on_the_skeleton_refuses_what_the_real_model_refuses(tmp_path, recipe):
    """Every shipped recipe x method: the skeleton (meta weights) gives exactly the real model's outcome, so the
    up-front check neither misses a refusal nor invents one."""
    tiny_llama(**TINY).save_pretrained(tmp_path)
    methods = sorted(METHODS)
    meta = _outcome(model_skeleton(tmp_path), recipe, methods)
    real = _outcome(load_model(tmp_path), recipe, methods)
    assert meta == real


def test_compare_refuses_every_bad_row_before_anything_runs(tmp_path, monkeypatch):
    import qat.jobs.compare as compare

    monkeypatch.setattr(compare, "job_inputs", lambda *a, **k: pytest.fail("data loaded before the check"))
    odd = {"name": "w4_g96", "weight": {"bits": 4, "granularity": "per_group", "group_size": 96}}
    cfg = compose_job("compare", ["methods=[rtn,awq,smoothquant]", "quants=[w4a16_g6,w4a16_g64,gguf_q4_0]"])
    cfg["quants"].append(odd)
    with pytest.raises(ConfigError) as caught:
        compare.run_compare_job(cfg, tmp_path, log=lambda s: None)
    lines = str(caught.value).splitlines()
    assert lines[0] == "bad config (nothing has run):"
    heads = [line for line in lines if line.startswith("  - ")]
    assert [h.split(":")[0] for h in heads] == [
        "  - quants entry 'w4a16_g6'",  # a misspelled recipe hides none of the other bad rows
        "  - methods entry 'smoothquant' x quants entry 'w4a16_g64'",
        "  - methods entry 'awq' x quants entry 'gguf_q4_0'",
        "  - methods entry 'smoothquant' x quants entry 'gguf_q4_0'",
        "  - quants entry 'w4_g96'"], lines
    assert "group_size=96 does not divide the last dimension 128" in str(caught.value)
    assert not list(tmp_path.iterdir())


def test_prepare_errors_are_one_line_per_reason():
    with pytest.raises(ConfigError) as caught:
        from qat import prepare
        prepare(tiny_llama(**TINY), {"weight": {"bits": 4, "granularity": "per_group", "group_size": 64}})
    lines = str(caught.value).splitlines()  # 13 linears read 96-wide inputs: one reason, one line
    assert len(lines) == 1 and lines[0].startswith("cannot prepare the model: 13 modules "
                                                   "(model.layers.0.self_attn.q_proj.weight, "), lines
    assert lines[0].endswith("group_size=64 does not divide the last dimension 96; choose a group size that divides "
                             "it, or set ragged: true for a shorter last group"), lines
    assert grouped_lines(["a.w: bad", "note: x y", "b.w: bad"]) == ["2 modules (a.w, b.w): bad", "note: x y"]
    assert grouped_lines(["a.w: bad", "a.w: bad"]) == ["a.w: bad"]  # a module named once


def test_an_experts_only_recipe_passes_and_a_non_causal_config_is_one_message(tmp_path):
    """A recipe that quantizes only the fused experts leaves no FakeQuantLinear: the model still counts as prepared
    (not prepared twice). A config with no causal-LM class (T5) is a user error naming its type, not a traceback."""
    from transformers import T5Config

    from qat.testing import tiny_moe

    tiny_moe("qwen3_moe", vocab_size=256, num_experts=4).save_pretrained(tmp_path / "moe")
    experts = {"name": "exp", "targets": ["Experts"], "weight": {"bits": 4, "granularity": "per_group", "group_size": 64}}
    assert _outcome(model_skeleton(tmp_path / "moe"), experts, ["rtn", "gptq"]) == {"rtn": "ok", "gptq": "ok"}
    refused = _outcome(model_skeleton(tmp_path / "moe"), "w4a16_g64", [{"name": "gptq", "actorder": True}])
    assert "gptq: unsupported expert weight scheme(s)" in refused["{'name': 'gptq', 'actorder': True}"]
    T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16).save_pretrained(tmp_path / "t5")
    for build in (model_skeleton, load_model):
        with pytest.raises(ConfigError, match="model of type 't5' .* is not a causal language model"):
            build(tmp_path / "t5")


def test_a_quantized_export_as_the_float_model_is_refused_by_name(tmp_path):
    """qat-ptq / qat-compare model.path=<an export>: one message saying what it is and what reads it (qat-eval),
    for the skeleton and the real load alike, not a transformers crash on its packed weights."""
    import qat
    from qat.export import export_compressed_tensors, save_native

    model = qat.prepare(tiny_llama(**TINY), {"weight": {"bits": 4, "granularity": "per_channel"}})
    export_compressed_tensors(model, tmp_path / "ct")
    save_native(model, tmp_path / "native")
    for folder, kind in ((tmp_path / "ct", "compressed-tensors"), (tmp_path / "native", "qat native")):
        for build in (model_skeleton, load_model):
            with pytest.raises(ConfigError, match=rf"is a quantized export \({kind}\); .*qat-eval model.path="):
                build(folder)
