"""qat-sensitivity on a base recipe (`quant=`): without one the scores are today's; with an A8 base they are measured
with the base's activation / KV schemes, the written recipe keeps them on every quantized module (qat-ptq loads it),
mode=solve rewrites the same recipe from scores.json alone; conflicts are one line before any model loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import qat
from qat.errors import ConfigError
from qat.jobs import sensitivity as job
from qat.modules.fake import FakeQuantLinear
from qat.modules.kv_cache import base_attention
from qat.sensitivity import budget_bits, build_menu, score_model, solve, to_recipe
from qat.testing import tiny_llama
from tests.cli.bad_inputs import run_in_process
from tests.sensitivity.test_analysis import INT_MENU, _batches

IGNORED = "model.layers.1.mlp.down_proj"  # the path recipe's extra ignore entry


def _run(tmp_path, name, *argv):
    return run_in_process("sensitivity", ["calibration.samples=4", "calibration.batch_size=2", "calibration.seq_len=32",
                                          "plot=false", "budget.bits_per_weight=5", *argv,
                                          f"hydra.run.dir={tmp_path}/{name}"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run without a base and one on a recipe file: w4a8_kv8 (int4 g128 weights, A8 per token, KV8) that also
    ignores one MLP projection."""
    tmp = tmp_path_factory.mktemp("base")
    recipe = qat.load_recipe("w4a8_kv8").to_dict()
    recipe.update(name="my_w4a8", ignore=["lm_head", IGNORED])
    (tmp / "my_w4a8.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    for name, argv in (("plain", []), ("base", [f"quant={tmp / 'my_w4a8.yaml'}"])):
        code, out = _run(tmp, name, *argv)
        assert code == 0, out
    return tmp


def _recipe(run):
    """The recipe file a run wrote (its name: `auto_<bpw>bpw`, `auto_<base>_<bpw>bpw` by default)."""
    return Path(json.loads((run / "layout.json").read_text())["recipe"])


def _scores(run):
    return {m["name"]: m["scores"] for m in json.loads((run / "scores.json").read_text())["modules"]}


def test_without_a_base_the_scores_are_those_of_the_float_model():
    """No base (the default) is the float model as before; a weight-only base has no other scheme, so its context is
    that same float model: the scores are equal to the bit."""
    menu, batches = build_menu(INT_MENU), _batches()
    plain = score_model(tiny_llama(), menu, batches)
    weight_only = score_model(tiny_llama(), menu, batches, base="w4a16_g128")
    assert plain.base is None and weight_only.base == qat.load_recipe("w4a16_g128").to_dict()
    assert [m.scores for m in plain.modules] == [m.scores for m in weight_only.modules]


def test_an_a8_base_changes_the_scores_and_drops_its_ignored_modules(runs):
    plain, base = _scores(runs / "plain"), _scores(runs / "base")
    assert json.loads((runs / "plain" / "scores.json").read_text())["base"] is None
    recorded = json.loads((runs / "base" / "scores.json").read_text())["base"]
    assert qat.QuantRecipe.from_dict(recorded).base == qat.load_recipe("w4a8_kv8").base
    assert set(plain) - set(base) == {IGNORED}
    assert ("scored on the base recipe 'my_w4a8' (input int8 sym per_token dyn; kv_cache int8 sym per_token dyn)"
            in (runs / "base" / "report.md").read_text())
    for name, scores in base.items():
        assert scores["float"] == 0 and all(s > 0 for c, s in scores.items() if c != "float")
        assert all(scores[c] != plain[name][c] for c in scores if c != "float"), name


def test_the_written_recipe_keeps_the_base_schemes_on_every_quantized_module(runs):
    run = runs / "base"
    choice = json.loads((run / "layout.json").read_text())["choice"]
    menu = build_menu(yaml.safe_load((qat.recipes.CONFIG_DIR / "menu" / "int.yaml").read_text()))
    base = qat.load_recipe("w4a8_kv8")
    recipe = qat.load_recipe(_recipe(run))
    assert recipe.ignore == ("lm_head", IGNORED) and recipe.base == base.base
    model = qat.prepare(tiny_llama(), recipe)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(linears) - {"lm_head", IGNORED} == set(choice)
    for name, module in linears.items():
        if name in ("lm_head", IGNORED):
            assert type(module) is nn.Linear
            continue
        assert isinstance(module, FakeQuantLinear) and module.input_quantizer.spec == base.base.input, name
        spec = menu[choice[name]].spec
        assert (module.weight_quantizer is None) if spec is None else module.weight_quantizer.spec == spec
    attention = [m for m in model.modules() if hasattr(m, "k_quantizer")]
    assert len(attention) == 2 and all(m.k_quantizer.spec == base.base.kv_cache for m in attention)
    code, out = run_in_process("ptq", ["method=rtn", f"quant={_recipe(run)}", "save=false",
                                       "calibration.samples=4", f"hydra.run.dir={runs}/ptq"])
    assert code == 0, out
    result = json.loads((runs / "ptq" / "result.json").read_text())
    assert result["bits_per_weight"] == pytest.approx(json.loads((run / "layout.json").read_text())["bits_per_weight"])


def test_solve_rewrites_the_same_recipe_without_the_model(runs, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("mode=solve loaded a model")
    monkeypatch.setattr(job, "load_model", no_model)
    run = runs / "base"
    code, out = _run(runs, "solved", "mode=solve", f"scores={run / 'scores.json'}")
    assert code == 0, out
    assert (json.loads((runs / "solved" / "layout.json").read_text())["choice"]
            == json.loads((run / "layout.json").read_text())["choice"])
    assert qat.load_recipe(_recipe(runs / "solved")) == qat.load_recipe(_recipe(run))
    assert _recipe(runs / "solved").read_bytes() == _recipe(run).read_bytes()  # the same file, key order too
    assert _recipe(run).name == f"auto_my_w4a8_{json.loads((run / 'layout.json').read_text())['bits_per_weight']:.2f}bpw.yaml"
    plain = runs / "plain"
    assert _recipe(plain).stem == f"auto_{json.loads((plain / 'layout.json').read_text())['bits_per_weight']:.2f}bpw"
    assert qat.load_recipe(_recipe(plain)).name == _recipe(plain).stem


@pytest.mark.parametrize("base", ["w8a8_static", "w4a8_kv4_rot"])
def test_static_activations_and_rotations_are_the_scoring_context(base):
    """A static (PACT, percentile) input scheme is calibrated before scoring; rotations rotate the weights the
    candidates quantize. The recipe written on them prepares a fresh model."""
    menu, batches = build_menu(INT_MENU), _batches()
    plain = score_model(tiny_llama(), menu, batches)
    table = score_model(tiny_llama(), menu, batches, base=base)
    assert [m.scores for m in table.modules] != [m.scores for m in plain.modules]
    assert all(torch.isfinite(torch.tensor(list(m.scores.values()))).all() for m in table.modules)
    recipe = qat.QuantRecipe.from_dict(to_recipe(solve(table, budget_bits(table, bits_per_weight=6)), table))
    assert recipe.rotations == qat.load_recipe(base).rotations and recipe.base.input == qat.load_recipe(base).base.input
    qat.prepare(tiny_llama(), recipe)


def test_hutchinson_keeps_the_kv_quantizers_and_restores_the_model():
    model = tiny_llama()
    table = score_model(model, build_menu(INT_MENU), _batches(), "hutchinson", base="w4a8_kv8")
    original = tiny_llama().config._attn_implementation
    assert table.base is not None and base_attention(model) == original  # the KV quantizers' attention, restored
    assert model.config._attn_implementation == f"qat_kv_{original}"
    assert all(m.lean for m in model.modules() if isinstance(m, FakeQuantLinear))



def test_hutchinson_runs_fused_experts_unfused_and_restores_them(monkeypatch):
    """The Hessian-vector products run every lean-capable module (Linears and fused experts) on the unfused STE;
    each module's own setting comes back after."""
    from qat.modules import FakeQuantExperts
    from qat.sensitivity import hutchinson
    from qat.testing import tiny_moe

    model = tiny_moe("qwen3_moe", num_experts=4, experts_implementation="eager")
    qat.prepare(model, "w4a16_g128")
    experts = [m for m in model.modules() if isinstance(m, FakeQuantExperts)]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert experts and linears
    experts[0].lean = False  # a per-module setting, restored as it was
    before = {m: m.lean for m in [*experts, *linears.values()]}
    seen, lm_loss = [], hutchinson.lm_loss

    def spying(model_, ids):
        seen.append({m: m.lean for m in before})
        return lm_loss(model_, ids)

    monkeypatch.setattr(hutchinson, "lm_loss", spying)
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    traces = hutchinson.hessian_traces(model, dict(list(linears.items())[:2]), [ids], probes=1, seed=0)
    assert len(traces) == 2 and all(torch.isfinite(torch.tensor(v)) for v in traces.values())
    assert seen and all(not flag for flags in seen for flag in flags.values())
    assert {m: m.lean for m in before} == before


@pytest.mark.parametrize("argv, expected", [
    (["quant=w4a16_g128_mixed"], "quant.overrides[0].weight"),
    (["menu=gguf", "quant=w8a8"], "quant.input (int8 sym per_token dyn) of the base recipe 'w8a8' cannot combine"),
    (["menu=gguf", "quant={tmp}/kv8.yaml"], "quant.kv_cache (int8 sym per_token dyn) of the base recipe 'kv8' has no "
                                            "llama.cpp cache type"),
    (["quant={tmp}/missing.yaml"], "quant={tmp}/missing.yaml: no such file"),
    (["quant={tmp}/garbage.yaml"], "not a valid recipe"),
    (["quant=no_such_recipe"], "quant=no_such_recipe: no such recipe; choose one of "),  # Hydra's, in one line
    (["mode=solve", "scores={tmp}/scores.json", "quant=w8a8"], "read by mode=analyze only"),
])
def test_bad_base_recipes_are_one_line_before_the_model_loads(argv, expected, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(job, "load_model", no_model)
    (tmp_path / "garbage.yaml").write_text("name: g\nweight: {bitz: 4}\n")
    (tmp_path / "kv8.yaml").write_text("name: kv8\nignore: [lm_head]\nweight: {bits: 4}\n"
                                       "kv_cache: {bits: 8, granularity: per_token, dynamic: true}\n")
    (tmp_path / "scores.json").write_text("{}")
    code, out = _run(tmp_path, "run", *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    errors = [line for line in out.splitlines() if line.startswith("qat-sensitivity: error:")]
    assert code == 2 and "Traceback" not in out and len(errors) == 1, out
    assert expected.replace("{tmp}", str(tmp_path)) in errors[0], out


def test_gguf_menu_takes_the_kv_caches_llama_cpp_runs():
    """With GGUF candidates a KV scheme must be one llama.cpp has a cache type for (q8_0, q4_0, ...), else refused."""
    from qat.errors import ConfigError
    from qat.sensitivity.base import check_base, llama_cpp_kv_type
    from qat.transform import load_recipe

    gguf_menu = build_menu({"Q4_0": {"recipe": "gguf_q4_0"}})
    for name, cache in (("gguf_q4_0_kv_q8_0", "q8_0"), ("gguf_q4_0_kv_q4_0", "q4_0")):
        recipe = load_recipe(name)
        assert llama_cpp_kv_type(recipe.base.kv_cache) == cache
        check_base(recipe, gguf_menu)
    int_kv = load_recipe("w4a8_kv8").base.kv_cache
    assert llama_cpp_kv_type(int_kv) is None
    weight_only = qat.QuantRecipe.from_dict({"name": "kv8", "weight": {"bits": 4}, "kv_cache": int_kv.to_dict()})
    with pytest.raises(ConfigError, match=r"quant.kv_cache .* no llama.cpp cache type.*q8_0 / q4_0"):
        check_base(weight_only, gguf_menu)
    check_base(weight_only, build_menu(INT_MENU))  # no GGUF candidate: any KV scheme is a scoring context


@pytest.mark.parametrize("base", ["nvfp4_w4a8", "mxfp4_w4a4"])
def test_fp4_bases_score_the_fp4_menu_end_to_end(base, tmp_path):
    """MXFP4 / NVFP4 / MXFP8 are not GGUF-only types: an fp4 menu takes a base with an input scheme; the recipe
    written keeps the base's input scheme on the scored modules."""
    code, out = _run(tmp_path, "run", "menu=fp4", f"quant={base}", "name=fp4auto")
    assert code == 0, out
    run = tmp_path / "run"
    assert json.loads((run / "scores.json").read_text())["modules"]
    recipe = qat.load_recipe(run / "quant" / "fp4auto.yaml")
    assert recipe.base.input == qat.load_recipe(base).base.input is not None


@pytest.mark.parametrize("base, menu, candidates", [
    ("nvfp4_w4a8", "fp4", None), ("mxfp8", "fp4", None), ("w8a8", "fp4", None),
    ("w8a8", "fp4", ["MXFP8", "float"]), ("w8a8", "int", ["int4_g64", "float"]),
])
def test_only_gguf_only_candidates_in_use_conflict_with_an_input_scheme(base, menu, candidates, tmp_path,
                                                                       monkeypatch):
    def no_model(*args, **kwargs):
        raise RuntimeError("model loaded: the check passed")
    monkeypatch.setattr(job, "load_model", no_model)
    argv = [f"menu={menu}", f"quant={base}"] + ([f"candidates=[{','.join(candidates)}]"] if candidates else [])
    code, out = _run(tmp_path, "run", *argv)
    assert "cannot combine" not in out and "model loaded: the check passed" in out, out


def test_gguf_only_is_asked_of_the_formats():
    menu = {**build_menu({"Q4_K": {"recipe": "gguf_q4_k"}, "IQ4_NL": {"recipe": "gguf_iq4_nl"},
                          "Q8_0": {"recipe": "gguf_q8_0"}, "float": {"weight": None}}),
            **build_menu({"MXFP4": {"recipe": "mxfp4"}, "NVFP4": {"recipe": "nvfp4_w4a16"}})}
    assert {n: c.gguf_only for n, c in menu.items()} == {"Q4_K": True, "IQ4_NL": True, "Q8_0": True,
                                                        "float": False, "MXFP4": False, "NVFP4": False}


def test_a_resolve_writes_the_analysis_recipe_byte_for_byte(runs, tmp_path):
    """A base override's partial input scheme in the recipe's own key order (the analysis) and in scores.json's
    sorted order (a re-solve) are written in one order."""
    from qat.sensitivity import ScoreTable, write_recipe
    table = ScoreTable.load(runs / "base" / "scores.json")
    recipe = qat.load_recipe("w4a8_kv8").to_dict()
    recipe["overrides"] = [{"targets": ["model.layers.0.self_attn.o_proj"], "input": {"symmetric": False, "bits": 8}}]
    table.base = qat.QuantRecipe.from_dict(recipe).to_dict()
    assert list(table.base["overrides"][0]["input"]) == ["symmetric", "bits"]  # as given
    table.save(tmp_path / "scores.json")
    sol = solve(table, budget_bits(table, bits_per_weight=5))
    analysis = write_recipe(to_recipe(sol, table), tmp_path / "a.yaml")
    reloaded = ScoreTable.load(tmp_path / "scores.json")
    resolved = write_recipe(to_recipe(solve(reloaded, budget_bits(reloaded, bits_per_weight=5)), reloaded),
                            tmp_path / "b.yaml")
    assert analysis.read_bytes() == resolved.read_bytes()


def test_a_base_override_matching_nothing_names_the_key_and_the_base():
    recipe = qat.load_recipe("w4a8_kv8").to_dict()
    recipe.update(name="my_base", overrides=[{"targets": ["nosuch_proj"], "input": {"bits": 4}}])
    with pytest.raises(ConfigError) as err:
        score_model(tiny_llama(), build_menu(INT_MENU), _batches(), base=recipe)
    assert "quant (the base recipe 'my_base')" in str(err.value)
    assert "quant.overrides[0] target 'nosuch_proj' matches none" in str(err.value)


def test_the_report_line_names_the_base_overrides():
    from qat.sensitivity.layout import qat_recipe_line
    recipe = qat.load_recipe("w4a8_kv8").to_dict()
    recipe["overrides"] = [{"targets": ["model.layers.0.mlp.down_proj"], "input": {"bits": 4}}]
    line = qat_recipe_line(recipe)
    assert "1 per-module override(s): model.layers.0.mlp.down_proj: input" in line, line
    assert "override" not in qat_recipe_line(qat.load_recipe("w4a8_kv8").to_dict())


def test_gguf_export_refuses_a_base_that_quantizes_activations(tmp_path, monkeypatch):
    """gguf.export=true writes weights only: an NVFP4 W4A8 base (whose fp4 candidates are GGUF types) is refused
    before the model loads, naming the base and its input scheme; its weight-only sibling passes; a KV-cache base
    (llama.cpp's cache types) passes check_gguf_base, an override's input scheme does not."""
    def no_model(*args, **kwargs):
        raise RuntimeError("model loaded: the check passed")
    monkeypatch.setattr(job, "load_model", no_model)
    argv = ["menu=fp4", "candidates=[MXFP4,NVFP4]", "gguf.export=true"]
    code, out = _run(tmp_path, "run", *argv, "quant=nvfp4_w4a8")
    errors = [line for line in out.splitlines() if line.startswith("qat-sensitivity: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in out, out
    assert "base recipe quant='nvfp4_w4a8' quantizes activations (fp8" in errors[0], out
    code, out = _run(tmp_path, "run2", *argv, "quant=nvfp4_w4a16")
    assert "model loaded: the check passed" in out, out
    # mode=solve: the base recorded in scores.json, refused before the layout or any file is written
    monkeypatch.undo()
    code, out = _run(tmp_path, "scored", "menu=fp4", "candidates=[MXFP4,NVFP4]", "quant=nvfp4_w4a8")
    assert code == 0, out
    code, out = run_in_process("sensitivity", ["mode=solve", f"scores={tmp_path / 'scored' / 'scores.json'}",
                                               "gguf.export=true", f"hydra.run.dir={tmp_path}/solved"])
    assert code == 2 and "re-analyze with a weight-only base recipe" in out, out
    written = [f.name for f in (tmp_path / "solved").glob("*") if f.name not in (".hydra", "sensitivity.log")]
    assert not written, written
    job.check_gguf_base(qat.load_recipe("gguf_q4_0_kv_q8_0").to_dict())
    job.check_gguf_base(None)
    with_override = {"name": "late_a8", "weight": {"bits": 4},
                     "overrides": [{"targets": ["mlp"], "input": {"bits": 8, "granularity": "per_token",
                                                                  "dynamic": True}}]}
    with pytest.raises(ConfigError, match=r"quant='late_a8' quantizes activations \(int8"):
        job.check_gguf_base(with_override)
