"""Scores on tiny real models: a deliberately damaged layer ranks first under every scorer; the recipe a layout
writes loads through qat.prepare with the chosen schemes; a GGUF layout exports with the chosen tensor types."""
from __future__ import annotations

import gguf
import pytest
import torch
import yaml

import qat
from qat.errors import ConfigError
from qat.export import export
from qat.sensitivity import (budget_bits, build_menu, gguf_tensor_types, llama_quantize_args, score_model, solve,
                             to_recipe)
from qat.jobs.sensitivity import gguf_names_of
from qat.recipes import CONFIG_DIR
from qat.testing import tiny_llama

INT_MENU = {"int2": {"weight": {"bits": 2, "symmetric": False, "granularity": "per_group", "group_size": 64}},
            "int4": {"weight": {"bits": 4, "granularity": "per_group", "group_size": 64}},
            "int8": {"weight": {"bits": 8, "granularity": "per_group", "group_size": 64}},
            "float": {"weight": None}}
DAMAGED = "model.layers.1.mlp.up_proj"


def _batches(vocab=512, n=2, seq=32):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (2, seq), generator=g) for _ in range(n)]


def _damaged_model():
    """A tiny Llama whose layer-1 up_proj has an outlier column in each group of 64 on an input channel the norm
    zeroes: the float function does not see it, but every group's range, hence its quantization step, is huge."""
    model = tiny_llama()
    with torch.no_grad():
        up = model.get_submodule(DAMAGED)
        peak = 40 * up.weight.abs().max()
        for j in range(0, up.in_features, 64):
            up.weight[:, j] = peak
            model.model.layers[1].post_attention_layernorm.weight[j] = 0
    return model


@pytest.mark.parametrize("method", ["fisher", "hutchinson", "kl"])
def test_a_damaged_layer_ranks_first(method):
    table = score_model(_damaged_model(), build_menu(INT_MENU), _batches(), method)
    for cand in ("int4", "int8"):  # (at int2 every module is wrecked alike)
        ranked = sorted(table.modules, key=lambda m: -m.scores[cand])
        assert ranked[0].name == DAMAGED, [(m.name, m.scores[cand]) for m in ranked[:3]]
    for m in table.modules:  # (the damaged module's symmetric peak error breaks the order: left out)
        assert m.scores["float"] == 0 and (m.name == DAMAGED or m.scores["int8"] <= m.scores["int4"] <= m.scores["int2"])
    sol = solve(table, budget_bits(table, bits_per_weight=6.0), ties=[])
    bpw = {m.name: m.bits[sol.choice[m.name]] / m.params for m in table.modules}
    assert bpw[DAMAGED] == max(bpw.values()) > min(bpw.values())  # the solver spends its bits where they matter


def test_fisher_cache_does_not_change_scores():
    model, menu, batches = tiny_llama(), build_menu(INT_MENU), _batches()
    a = score_model(model, menu, batches, {"name": "fisher", "cache_mb": 0})
    b = score_model(model, menu, batches, {"name": "fisher", "cache_dtype": "float32"})
    for x, y in zip(a.modules, b.modules):
        assert x.scores == pytest.approx(y.scores, rel=1e-4)
    assert all(p.requires_grad for p in model.parameters())  # the scorer restored them


def test_the_recipe_loads_through_prepare_with_the_chosen_schemes():
    model, menu = tiny_llama(), build_menu(INT_MENU)
    table = score_model(model, menu, _batches(), "fisher")
    sol = solve(table, budget_bits(table, bits_per_weight=4.2))
    assert len(set(sol.choice.values())) > 1  # a real mix
    recipe = qat.QuantRecipe.from_dict(to_recipe(sol, table))
    prepared = qat.prepare(tiny_llama(), recipe)
    for name, cand in sol.choice.items():
        module = prepared.get_submodule(name)
        if menu[cand].spec is None:
            assert type(module) is torch.nn.Linear
        else:
            assert module.weight_quantizer.spec == menu[cand].spec
    bpw, _ = qat.control.weight_bits(prepared)
    quantized = [m for m in table.modules if menu[sol.choice[m.name]].spec is not None]
    assert bpw == pytest.approx(sum(m.bits[sol.choice[m.name]] for m in quantized) / sum(m.params for m in quantized))


def test_no_candidate_fits_is_refused_naming_the_modules():
    menu = build_menu({"g48": {"weight": {"bits": 4, "granularity": "per_group", "group_size": 48}}})
    with pytest.raises(ConfigError, match=r"no candidate of the menu fits:\n  - model.layers.0.self_attn.q_proj"):
        score_model(tiny_llama(), menu, _batches(), "fisher")


@pytest.mark.parametrize("entries, match", [
    ({}, "menu="), ({"x": {"recipe": "no_such"}}, "menu.x.recipe"), ({"x": {"weight": {"bits": 17}}}, "bits"),
    ({"x": {"wieght": None}}, "menu.x="), ({"x": 3}, "menu.x="),
])
def test_bad_menus_name_the_entry(entries, match):
    with pytest.raises(ConfigError, match=match):
        build_menu(entries)


def test_gguf_layout_exports_the_chosen_tensor_types(tmp_path):
    model = tiny_llama(hidden_size=256, intermediate_size=512)
    menu = build_menu({t: {"recipe": f"gguf_{t.lower()}"} for t in ("Q2_K", "Q4_0", "Q4_K", "Q6_K", "Q8_0")})
    table = score_model(model, menu, _batches(), "fisher", gguf_names=gguf_names_of(model))
    sol = solve(table, budget_bits(table, bits_per_weight=4.8))
    types = gguf_tensor_types(sol, table)
    assert len(set(types.values())) > 1 and len(types) == 14
    args = llama_quantize_args(types)
    assert args[:2] == ["--tensor-type", r"^blk\.0\.attn_q\.weight$=" + types["blk.0.attn_q.weight"].lower()]
    prepared = qat.prepare(model, to_recipe(sol, table))
    path = export(prepared, tmp_path / "auto.gguf", "gguf", gguf_type="Q8_0")
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {k: written[k] for k in types} == types


def test_llama_quantize_takes_the_chosen_types(tmp_path):
    """Where llama.cpp is built (QAT_LLAMA_CPP): `llama-quantize --tensor-type-file` of the layout's lines turns our
    F32 file into exactly the chosen types (the other tensors as its mix gives them)."""
    import subprocess

    from tests.export.test_llama_cpp import BIN, TEXT, check

    if BIN is None:
        pytest.skip("llama.cpp not found: set QAT_LLAMA_CPP to a llama.cpp build folder")
    model, tok = check.tiny_model_and_tokenizer(TEXT)
    menu = build_menu({t: {"recipe": f"gguf_{t.lower()}"} for t in ("Q2_K", "Q4_0", "Q4_K", "Q6_K", "Q8_0")})
    table = score_model(model, menu, _batches(vocab=320), "fisher", gguf_names=gguf_names_of(model))
    types = gguf_tensor_types(solve(table, budget_bits(table, bits_per_weight=4.8)), table)
    (tmp_path / "types.txt").write_text("\n".join(llama_quantize_args(types)[1::2]) + "\n")
    f32 = export(model, tmp_path / "f32.gguf", "gguf", gguf_type="F32", tokenizer=tok)
    out = tmp_path / "mixed.gguf"
    proc = subprocess.run([str(BIN / "llama-quantize"), "--tensor-type-file", str(tmp_path / "types.txt"), str(f32),
                           str(out), "Q8_0", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert {k: written[k] for k in types} == types and len(set(types.values())) > 1


def test_the_default_int_menu_has_no_int2_and_options_between_int3_and_int4():
    """The default menu (configs/menu/int.yaml) offers nothing below 3 bits, and on SmolLM2's 576-wide rows it has
    options cheaper than int3 g64 (3.5 bpw: with int2 gone, a 3.5-bit mix needs them) and between int3 and int4."""
    menu = build_menu(yaml.safe_load((CONFIG_DIR / "menu" / "int.yaml").read_text()))
    quantized = {n: c for n, c in menu.items() if c.spec is not None}
    assert min(c.spec.bits for c in quantized.values()) == 3 and "float" in menu
    shape = (576, 576)
    bpw = {n: c.bits(shape) / (576 * 576) for n, c in quantized.items() if c.misfit(shape) is None}
    assert bpw["int3_g64"] == 3.5 and bpw["int4_g64"] == 4.5
    assert min(bpw.values()) < 3.5 and any(3.5 < b < 4.5 for b in bpw.values()), bpw
