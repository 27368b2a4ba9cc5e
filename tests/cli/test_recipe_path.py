"""`quant=<path to a recipe YAML>` works the same in every CLI that takes `quant` (qat.cli.recipe_path, applied by
run_hydra): the file's recipe is used, not a shipped recipe of the same name; relative paths and sweeps too.
Missing / malformed files are cases of tests/cli/bad_inputs.py."""
from __future__ import annotations

import importlib
import json
import os

import pytest
import yaml

import qat
from qat.cli.recipe_path import recipe_paths
from qat.errors import ConfigError
from tests.cli.bad_inputs import run_in_process

W3 = {**qat.load_recipe("w3a16_g64").to_dict(), "name": "mine"}


@pytest.fixture
def recipe(tmp_path):
    """A 3-bit recipe in a file named like a shipped 4-bit recipe: the file must win."""
    path = tmp_path / "recipes" / "w4a16_g128.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(W3))
    return path


def _ok(app, argv):
    code, out = run_in_process(app, argv)
    assert code == 0, out
    return out


def test_ptq_takes_an_absolute_and_a_relative_path(recipe, tmp_path, monkeypatch):
    bpw = qat.control.weight_bits(qat.prepare(qat.testing.tiny_llama(), qat.load_recipe(recipe)))[0]
    assert bpw < 4  # the file's 3-bit recipe, not configs/quant/w4a16_g128
    monkeypatch.chdir(tmp_path)
    for i, value in enumerate([str(recipe), "recipes/w4a16_g128.yaml"]):
        _ok("ptq", ["method=rtn", f"quant={value}", "save=false", "eval.max_blocks=2", f"hydra.run.dir={tmp_path}/{i}"])
        result = json.loads((tmp_path / str(i) / "result.json").read_text())
        assert result["quant"] == "mine" and result["bits_per_weight"] == pytest.approx(bpw)


def test_plus_quant_of_a_path_is_quant_of_it(recipe, tmp_path):
    """`+quant=<path>` selects the file as `quant=<path>` does (quant is in every such job's defaults list, where
    Hydra's + would name our temporary option in "Multiple values for quant")."""
    for i, key in enumerate(("+quant", "++quant")):
        out = _ok("ptq", ["method=rtn", f"{key}={recipe}", "save=false", "eval.max_blocks=2",
                          f"hydra.run.dir={tmp_path}/{i}"])
        assert "Multiple values" not in out
        assert json.loads((tmp_path / str(i) / "result.json").read_text())["quant"] == "mine"


def test_export_train_and_eval_take_a_path(recipe, tmp_path):
    _ok("export", ["model=tiny", f"quant={recipe}", "format=native", f"output={tmp_path}/nat",
                   f"hydra.run.dir={tmp_path}/e"])
    modules = json.loads((tmp_path / "nat" / "qat_quant.json").read_text())["modules"]
    assert {m["weight"]["bits"] for m in modules.values()} == {3}  # the file's recipe, not the shipped int4
    _ok("train", [f"quant={recipe}", "trainer.max_steps=1", "eval.max_blocks=2", f"hydra.run.dir={tmp_path}/t"])
    result = json.loads((tmp_path / "t" / "result.json").read_text())
    assert result["quant"] == "mine"
    dynamic = tmp_path / "dyn.yaml"
    dynamic.write_text(yaml.safe_dump({**qat.load_recipe("fp8_dynamic").to_dict(), "name": "my_fp8"}))
    _ok("eval", ["model=tiny", "data=fixture", f"quant={dynamic}", "max_blocks=2", f"hydra.run.dir={tmp_path}/v"])
    assert json.loads((tmp_path / "v" / "result.json").read_text())["quant"] == "my_fp8"


def test_compare_sweeps_a_path_beside_a_name(recipe, tmp_path):
    _ok("compare", ["-m", "method=rtn", f"quant=w4a16_g128,{recipe}", "eval.max_blocks=2",
                    f"hydra.sweep.dir={tmp_path}/sweep"])
    rows = {r["quant"]: r for r in json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]}
    assert set(rows) == {"w4a16_g128", "mine"}
    assert rows["mine"]["bits_per_weight"] < rows["w4a16_g128"]["bits_per_weight"]


def test_the_rewrite_keeps_a_given_searchpath_and_cleans_up(recipe):
    with recipe_paths(["quant=w8a8", "hydra.searchpath=[file:///elsewhere]", f"+quant={recipe}"]) as argv:
        folder = argv[1].split("file://")[-1].rstrip("]")
        assert argv[0] == "quant=w8a8" and argv[2] == "quant=w4a16_g128_2"  # never a shipped name; + as plain
        assert argv[1].startswith("hydra.searchpath=[file:///elsewhere,file://")
        assert yaml.safe_load(open(f"{folder}/quant/w4a16_g128_2.yaml")) == W3
    assert not os.path.exists(folder)
    for plain in (["quant=w8a8"], ["-m", "quant=glob(w4*)"]):  # names and Hydra's sweep functions: untouched
        with recipe_paths(plain) as argv:
            assert argv == plain
    with pytest.raises(ConfigError, match=r"^quant=nowhere/x.yaml: no such file .*w4a16_g128"):
        with recipe_paths(["quant=nowhere/x.yaml"]):
            pass


def test_a_file_name_with_parentheses_or_a_comma(tmp_path, monkeypatch):
    """`quant=a(1).yaml` (an existing file) is a path, not Hydra's grammar; `quant=c,d.yaml` is Hydra's sweep of
    c and d.yaml, refused with the reason when those are missing and the whole name is a file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a(1).yaml").write_text(yaml.safe_dump(W3))
    with recipe_paths(["quant=a(1).yaml"]) as argv:
        assert argv[0] == "quant=a_1_"
    _ok("export", ["model=tiny", "quant=a(1).yaml", "format=native", f"output={tmp_path}/nat",
                   f"hydra.run.dir={tmp_path}/e"])
    assert (tmp_path / "nat" / "qat_quant.json").is_file()
    for plain in (["quant=b(1).yaml"], ["-m", "quant=choice(w8a8,x.yaml)"]):  # no such file: left to Hydra
        with recipe_paths(plain) as argv:
            assert argv == plain
    (tmp_path / "c,d.yaml").write_text(yaml.safe_dump(W3))
    with pytest.raises(ConfigError, match=r"^quant=c,d.yaml: a comma separates sweep values in Hydra.*no such "
                                          r"file: d.yaml.*rename it without the comma"):
        with recipe_paths(["quant=c,d.yaml"]):
            pass


def test_a_recipe_name_shared_with_a_shipped_recipe_or_another_file_labels_rows_by_file(tmp_path, caplog):
    """Rows are named by the recipe's `name`: a file named like a shipped recipe (or like another file of the same
    command) would read as that one, so it is labelled by its file stem, with a warning naming both."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    copy = tmp_path / "my_w3.yaml"
    copy.write_text(yaml.safe_dump({**W3, "name": "w8a8"}))        # a shipped recipe's name
    for sub in ("a", "b"):
        (tmp_path / sub / f"{sub}_mine.yaml").write_text(yaml.safe_dump(W3))  # both named "mine"
    with caplog.at_level("WARNING", logger="qat.cli.recipe_path"):
        with recipe_paths([f"quant={copy},{tmp_path}/a/a_mine.yaml,{tmp_path}/b/b_mine.yaml"]) as argv:
            folder = argv[1].split("file://")[-1].rstrip("]")
            names = [yaml.safe_load(open(f"{folder}/quant/{n}.yaml"))["name"] for n in argv[0][6:].split(",")]
    assert names == ["my_w3", "a_mine", "b_mine"]
    text = caplog.text
    assert "'w8a8' is also the name of the shipped recipe configs/quant/w8a8.yaml" in text and "'my_w3'" in text
    assert f"quant={tmp_path}/a/a_mine.yaml: its recipe name 'mine' is also the name of {tmp_path}/b/b_mine.yaml" in text
    caplog.clear()
    with recipe_paths([f"quant={tmp_path}/a/a_mine.yaml"]) as argv:  # alone, no clash: its own name
        folder = argv[1].split("file://")[-1].rstrip("]")
        assert yaml.safe_load(open(f"{folder}/quant/a_mine.yaml"))["name"] == "mine" and not caplog.records
    _ok("ptq", ["method=rtn", f"quant={copy}", "save=false", "eval.max_blocks=2", f"hydra.run.dir={tmp_path}/r"])
    assert json.loads((tmp_path / "r" / "result.json").read_text())["quant"] == "my_w3"  # not the shipped w8a8's


def test_nameless_recipe_files_are_labelled_by_their_stem_or_path(tmp_path):
    """A recipe file without `name` gets its file stem as the row label (not the "custom" of an unnamed mapping);
    two nameless files with the same stem get their paths as given."""
    nameless = {k: v for k, v in W3.items() if k != "name"}
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.yaml").write_text(yaml.safe_dump(nameless))
    (tmp_path / "a" / "one.yaml").write_text(yaml.safe_dump(nameless))
    for given, expected in (([f"{tmp_path}/a/one.yaml"], ["one"]),
                            ([f"{tmp_path}/a/x.yaml", f"{tmp_path}/b/x.yaml"],
                             [f"{tmp_path}/a/x.yaml", f"{tmp_path}/b/x.yaml"])):
        with recipe_paths([f"quant={','.join(given)}"]) as argv:
            folder = argv[1].split("file://")[-1].rstrip("]")
            names = [yaml.safe_load(open(f"{folder}/quant/{n}.yaml"))["name"] for n in argv[0][6:].split(",")]
        assert names == expected


@pytest.mark.parametrize("app, argv", [("sensitivity", ["quant=null"]), ("eval", ["model=tiny", "data=fixture",
                                                                                  "quant=null"])])
def test_group_null_drops_a_group_the_app_takes_absent(app, argv, tmp_path, monkeypatch):
    """`quant=null` where the app's default is no quant is Hydra's `~quant`, not Hydra's NoneType traceback."""
    module, seen = importlib.import_module(f"qat.cli.{app}"), []

    def job(cfg, out_dir, *given):
        seen.append(cfg)
        raise ConfigError("stop here")
    monkeypatch.setattr(module, f"run_{app}_job", job)
    code, out = run_in_process(app, [*argv, f"hydra.run.dir={tmp_path}/run"])
    assert code == 2 and "stop here" in out and "Traceback" not in out, out
    assert seen and seen[0].get("quant") is None


def test_a_path_beside_cfg_job_prints_the_config(recipe):
    """`qat-ptq quant=<file> --cfg job`: the added searchpath stays among the overrides (was: appended after
    `--cfg job`, where Hydra's parser refused it as an unrecognized argument)."""
    with recipe_paths(["method=rtn", f"quant={recipe}", "--cfg", "job"]) as argv:
        assert argv[0] == "method=rtn" and argv[1].startswith("hydra.searchpath=[file://") and argv[-2:] == ["--cfg", "job"]
    out = _ok("ptq", [f"quant={recipe}", "--cfg", "job"])
    assert "bits: 3" in out
