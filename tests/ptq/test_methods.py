"""The PTQ method registry: the source of the method list, one YAML per method, dispatch without if/elif."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import pytest
import torch
import yaml

import qat
from qat.arch import get_arch
from qat.ptq import METHODS, PTQMethod, apply, method_config, register_method
from qat.ptq.methods import get_method
from qat.recipes import CONFIG_DIR

from .conftest import recipe

COMPARE_ONLY = {"fp", "qat"}  # rows of qat-compare that are not PTQ methods


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_has_its_yaml_with_the_config_defaults(name):
    path = CONFIG_DIR / "method" / f"{name}.yaml"
    assert path.is_file(), f"registered method {name!r} has no {path}"
    data = yaml.safe_load(path.read_text())
    assert data["name"] == name
    cls = get_method(name).Config
    assert sorted(set(data) - {"name"}) == sorted(f.name for f in dataclasses.fields(cls))  # every option, once
    got, default = dataclasses.asdict(method_config(data)), dataclasses.asdict(cls())
    assert {k: _plain(v) for k, v in got.items()} == {k: _plain(v) for k, v in default.items()}


def test_every_method_yaml_names_a_registered_method():
    for path in sorted((CONFIG_DIR / "method").glob("*.yaml")):
        name = (yaml.safe_load(path.read_text()) or {}).get("name")
        assert name is None or name in METHODS or name in COMPARE_ONLY, f"{path.name}: method {name!r}"


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(KeyError, match=r"PTQ method 'gtpq'; registered: \['awq', 'gptq', 'rtn', 'smoothquant'\]"):
        method_config("gtpq")


@dataclass
class HalveConfig:
    factor: float = 0.5
    min_tokens: int = 0


class Halve(PTQMethod):
    """A new algorithm in one class: it scales every weight, then pins RTN qparams (records its contexts)."""

    name = "halve_test"
    Config = HalveConfig
    seen: list = []

    def solve_block(self, ctx):
        Halve.seen.append((ctx.name, sorted(ctx.linears), ctx.arch, ctx.recipe.name))
        for m in ctx.linears.values():
            with torch.no_grad():
                m.weight.mul_(self.config.factor)
            qat.ptq.pin_rtn(m)


def test_a_new_method_is_one_registered_class(tiny_llama, llama_batches):
    register_method(Halve)
    try:
        model = qat.prepare(copy.deepcopy(tiny_llama), recipe())
        apply(model, {"name": "halve_test", "factor": 0.25}, llama_batches, progress=False)
    finally:
        del METHODS["halve_test"]
    assert model.qat_ptq["method"] == "halve_test" and model.qat_ptq["factor"] == 0.25
    assert [s[0] for s in Halve.seen] == ["model.layers.0", "model.layers.1"]
    assert Halve.seen[0][1] == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert Halve.seen[0][2] is get_arch("llama") and Halve.seen[0][3] == "test"
    w = model.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(w, tiny_llama.model.layers[0].mlp.down_proj.weight * 0.25)


def test_scaling_methods_need_mappings_for_an_unknown_family(llama_batches):
    from .conftest import Stack

    model = qat.prepare(Stack(64, 64), recipe())
    with pytest.raises(ValueError, match=r"awq: method.mappings=null takes .* architecture None is not supported; "
                                         r"known: \[[^]]*'llama', 'mistral'[^]]*\].*or give method.mappings"):
        apply(model, "awq", [torch.randn(256, 64)], progress=False)


def test_the_percentile_override_of_docs_ptq_works_on_the_command_line(tmp_path, monkeypatch):
    """docs/ptq.md's `method.observer=percentile +method.observer_args.percentile=90` on MXFP4 (blocks of 32):
    the default percentile warns that it is min-max there; 90 clips (another result) and does not warn."""
    import json

    import qat.observers as observers
    from tests.cli.bad_inputs import run_in_process

    monkeypatch.setattr(observers, "_NO_CLIP_WARNED", set())
    base = ["method=rtn", "quant=mxfp4", "method.observer=percentile", "save=false", "eval.max_blocks=2"]
    ppl = {}
    for extra in ([], ["+method.observer_args.percentile=90"]):
        code, out = run_in_process("ptq", base + extra + [f"hydra.run.dir={tmp_path}/{len(extra)}"])
        assert code == 0, out
        assert ("keeps the maximum of every block of 32 values" in out) == (not extra), out
        assert ("+method.observer_args.percentile=90" in out) == (not extra), out  # the route that applies
        ppl[len(extra)] = json.loads((tmp_path / str(len(extra)) / "result.json").read_text())["ppl"]
    assert ppl[0] != ppl[1]


def test_each_job_of_a_multirun_logs_the_percentile_warning(tmp_path):
    """The no-clipping warning is once per job, not per process: the second job of a multirun logs it too, with the
    recipe's route (the observer came from the recipe file)."""
    import yaml

    import qat
    from tests.cli.bad_inputs import run_in_process

    recipe = tmp_path / "pct.yaml"
    mx = qat.load_recipe("mxfp4").to_dict()
    recipe.write_text(yaml.safe_dump({**mx, "name": "mx_pct", "weight": {**mx["weight"], "observer": "percentile"}}))
    code, out = run_in_process("ptq", ["-m", "method=rtn", "seed=0,1", f"quant={recipe}", "save=false",
                                       "eval.max_blocks=2", f"hydra.sweep.dir={tmp_path}/sweep"])
    assert code == 0, out
    logs = sorted((tmp_path / "sweep").glob("*/ptq.log"))
    assert len(logs) == 2, list((tmp_path / "sweep").rglob("*"))
    for log in logs:
        text = log.read_text()
        assert "keeps the maximum of every block of 32 values" in text, text
        assert "on that scheme in the recipe" in text and "method.observer" not in text
