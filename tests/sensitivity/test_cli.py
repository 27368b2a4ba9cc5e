"""qat-sensitivity end to end on the tiny model: analyze writes scores / recipe / report; solve re-solves the saved
scores for another budget with no model loaded; the recipe trains / quantizes through qat-ptq; bad input is one
message naming the key and exit 2."""
from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import qat
from qat.jobs import sensitivity as job
from qat.recipes import CONFIG_DIR
from tests.cli.bad_inputs import run_in_process


def _run(tmp_path, *argv):
    return run_in_process("sensitivity", ["calibration.samples=4", "calibration.batch_size=2", "calibration.seq_len=32",
                                          *argv, f"hydra.run.dir={tmp_path}/run"])


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sens")
    code, out = _run(tmp, "budget.bits_per_weight=3.5", "name=auto")  # by name on a search path below
    assert code == 0, out
    return tmp / "run", out


def test_analyze_writes_scores_recipe_and_report(analyzed):
    run, out = analyzed
    layout = json.loads((run / "layout.json").read_text())
    assert layout["bits"] <= layout["budget_bits"] and layout["bits_per_weight"] <= 3.5
    scores = json.loads((run / "scores.json").read_text())
    assert len(scores["modules"]) == 14 and scores["method"] == "fisher"
    first = scores["modules"][0]
    assert first["bits_per_weight"]["int4_g64"] == 4.5 and first["params"] == 128 * 128
    assert set(first["scores"]) == set(scores["candidates"])
    recipe = qat.load_recipe(run / "quant" / "auto.yaml")
    prepared = qat.prepare(qat.testing.tiny_llama(), recipe)
    assert qat.control.weight_bits(prepared)[0] == pytest.approx(layout["bits_per_weight"])
    assert "| model.layers.0.self_attn.q_proj |" in (run / "report.md").read_text() and "total:" in out
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_solve_needs_no_model(analyzed, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("mode=solve loaded a model")
    monkeypatch.setattr(job, "load_model", no_model)
    monkeypatch.setattr(job, "calibration_batches", no_model)
    run, _ = analyzed
    for bpw in (4.5, 6.0):
        code, out = run_in_process("sensitivity", ["mode=solve", f"scores={run}/scores.json",
                                                   f"budget.bits_per_weight={bpw}", f"hydra.run.dir={tmp_path}/{bpw}"])
        assert code == 0, out
        layout = json.loads((tmp_path / str(bpw) / "layout.json").read_text())
        assert 3.5 < layout["bits_per_weight"] <= bpw
    code, out = run_in_process("sensitivity", ["mode=solve", f"scores={run}/scores.json", "budget.bits_per_weight=4.5",
                                               "candidates=[int3_g64,int5_g64]", f"hydra.run.dir={tmp_path}/c"])
    assert code == 0, out
    assert set(json.loads((tmp_path / "c" / "layout.json").read_text())["choice"].values()) <= {"int3_g64", "int5_g64"}


def test_solve_reproduces_analyze_at_the_same_budget(analyzed, tmp_path):
    """Same table columns (the menu's order, float where the menu puts it: scores.json keeps the order although
    its keys are sorted), same layout and the same recipe as the analysis at its budget."""
    run, _ = analyzed
    code, out = run_in_process("sensitivity", ["mode=solve", f"scores={run}/scores.json", "budget.bits_per_weight=3.5",
                                               "name=auto", f"hydra.run.dir={tmp_path}/s"])
    assert code == 0, out
    header = (run / "report.md").read_text().splitlines()[0]
    assert (tmp_path / "s" / "report.md").read_text().splitlines()[0] == header
    assert header.index("| float |") > header.index("| int8_g64 |")  # the int menu lists float last
    choice = [json.loads((r / "layout.json").read_text())["choice"] for r in (run, tmp_path / "s")]
    assert choice[0] == choice[1]
    assert qat.load_recipe(tmp_path / "s" / "quant" / "auto.yaml") == qat.load_recipe(run / "quant" / "auto.yaml")


def test_the_recipe_runs_in_qat_ptq(analyzed, tmp_path):
    run, _ = analyzed
    code, out = run_in_process("ptq", ["method=rtn", f"hydra.searchpath=[file://{run}]", "quant=auto", "save=false",
                                       f"hydra.run.dir={tmp_path}/ptq"])
    assert code == 0, out
    use = json.loads((run / "layout.json").read_text())["use"]  # the printed hint: quant=<the recipe's path>
    code, out = run_in_process("ptq", ["method=rtn", use, "save=false", f"hydra.run.dir={tmp_path}/ptq2"])
    assert code == 0, out
    assert json.loads((tmp_path / "ptq2" / "result.json").read_text())["bits_per_weight"] == pytest.approx(
        json.loads((tmp_path / "ptq" / "result.json").read_text())["bits_per_weight"])
    result = json.loads((tmp_path / "ptq" / "result.json").read_text())
    layout = json.loads((run / "layout.json").read_text())
    assert result["bits_per_weight"] == pytest.approx(layout["bits_per_weight"])


def test_the_recipe_is_a_quant_of_qat_compare_rows_rtn_gptq_and_qat(analyzed, tmp_path):
    """qat-compare -m with the run folder on the search path: RTN, GPTQ and QAT (qat-train, 2 steps) rows of the
    auto layout, each at the layout's bits per weight; the single-process form takes the recipe file's path."""
    run, _ = analyzed
    layout = json.loads((run / "layout.json").read_text())
    sweep = tmp_path / "sweep"
    code, out = run_in_process("compare", ["-m", "method=rtn,gptq,qat", "quant=auto",
                                           f"hydra.searchpath=[file://{run}]", "calibration.samples=4",
                                           "eval.max_blocks=2",
                                           'qat.overrides=["trainer.max_steps=2"]', f"hydra.sweep.dir={sweep}"])
    assert code == 0, out
    rows = {r["method"]: r for r in json.loads((sweep / "results.json").read_text())["rows"]}
    assert set(rows) == {"rtn", "gptq", "qat"}
    for row in rows.values():
        assert row["status"] == "ok" and row["quant"] == "auto", row
        assert row["bits_per_weight"] == pytest.approx(layout["bits_per_weight"])
    code, out = run_in_process("compare", ["methods=[rtn]", f"quants=[{run}/quant/auto.yaml]", "eval.max_blocks=2",
                                           f"hydra.run.dir={tmp_path}/single"])
    assert code == 0, out
    row = json.loads((tmp_path / "single" / "results.json").read_text())["rows"][0]
    assert row["ppl"] == pytest.approx(rows["rtn"]["ppl"]) and row["quant"] == "auto"


def test_quant_on_the_command_line_replaces_the_main_jobs_recipe_whole(analyzed):
    """qat-train experiment=smollm2_w4_qat quant=auto trains the auto layout, not w4a16_g64's fields merged in."""
    run, _ = analyzed
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=smollm2_w4_qat", "quant=auto",
                                                      f"hydra.searchpath=[file://{run}]"])
        main = compose(config_name="train", overrides=["experiment=smollm2_w4_qat"])
    recipe = qat.QuantRecipe.from_dict(OmegaConf.to_container(cfg.quant))
    assert recipe == qat.load_recipe(run / "quant" / "auto.yaml") and recipe.name == "auto"
    assert qat.QuantRecipe.from_dict(OmegaConf.to_container(main.quant)) == qat.load_recipe("w4a16_g64")


def test_gguf_menu_writes_types_llama_quantize_arguments_and_the_file(tmp_path):
    tiny = ["model.tiny.hidden_size=256", "model.tiny.intermediate_size=512"]
    code, out = _run(tmp_path, "menu=gguf", "budget.bits_per_weight=5", "gguf.export=true", *tiny)
    assert code == 0, out
    run = tmp_path / "run"
    types = json.loads((run / "gguf_types.json").read_text())
    lines = (run / "tensor_types.txt").read_text().split()
    assert len(lines) == len(types) == 14 and lines[0] == r"^blk\.0\.attn_q\.weight$=" + types["blk.0.attn_q.weight"].lower()
    import gguf
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(run / "model.gguf").tensors}
    assert {k: written[k] for k in types} == types
    # a re-solve exports too: it takes model= (the model is not in scores.json), and refuses another model's path
    argv = ["mode=solve", f"scores={run}/scores.json", "budget.bits_per_weight=6", "gguf.export=true", "plot=false"]
    code, out = run_in_process("sensitivity", [*argv, *tiny, f"hydra.run.dir={tmp_path}/solve"])
    assert code == 0, out
    resolved = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "solve" / "model.gguf").tensors}
    assert {k: resolved[k] for k in types} == json.loads((tmp_path / "solve" / "gguf_types.json").read_text())
    code, out = run_in_process("sensitivity", [*argv, f"model.path={tmp_path}/other", f"hydra.run.dir={tmp_path}/o"])
    assert code == 2 and "scores.json was measured on model 'tiny'" in out, out


@pytest.mark.parametrize("argv, expected", [
    (["mode=bogus"], "mode='bogus'"),
    (["mode=solve"], "mode=solve needs scores="),
    (["mode=solve", "scores={tmp}/missing.json"], "missing.json"),
    (["mode=solve", "scores={tmp}/garbage.json"], "garbage.json"),
    (["scores={tmp}/garbage.json"], "read by mode=solve only"),
    (["budget.bits_per_weight=-1"], "budget.bits_per_weight"),
    (["budget.bytes=-5"], "budget.bytes"),
    (["budget.bits_per_weight=null"], "exactly one"),
    (["budget.bits_per_weight=0.5"], "smallest layout"),
    (["+budget.bitz=3"], "bitz"),
    (["method.name=nope"], "method.name='nope'"),
    (["method.name=hutchinson", "method.probes=0"], "method.probes"),
    (["method.cache_mb=-1"], "method.cache_mb"),
    (["method.probes=2"], "unknown option(s) ['probes'] for fisher"),  # declared null; set, fisher refuses it
    (["mode=solve", "scores={tmp}/garbage.json", "menu=gguf"], "menu= read by mode=analyze only"),
    (["mode=solve", "scores={tmp}/garbage.json", "model=smollm2_135m", "method.name=kl"],
     "model=, method= read by mode=analyze only"),
    (["+method.colour=red"], "colour"),
    (["ties=['*bad']"], "ties[0]"),
    (["candidates=[nope]"], "not in the menu"),
    (["ties=abc"], "ties="),
    (["+menu.bad={weight:{bits:17}}"], "menu.bad"),
    (["+menu.bad={recipe:no_such_recipe}"], "no_such_recipe"),
    (["menu=no_such_menu"], "no_such_menu"),
    (["calibration.samples=0"], "calibration.samples"),
    (["calibration.split=nowhere"], "calibration.split"),
    (["gguf.export=maybe"], "gguf.export"),
    (["gguf.export=true"], "gguf.export=true needs every candidate to be a GGUF type"),
    (["menu=gguf", "gguf.export=true", "gguf.rest=Q9"], "gguf.rest='Q9'; choose a GGUF type"),
    (["float_bits=8"], "float_bits"),
    (["name=a/b"], "name="),
    (["targets=[Conv1D]"], "select no nn.Linear"),
])
def test_bad_input_is_one_clear_message(argv, expected, tmp_path):
    (tmp_path / "garbage.json").write_text("not json at all")
    code, out = _run(tmp_path, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2, out
    if expected != "smallest layout":  # the one refusal that needs the scores (the budget is below every layout)
        assert not (tmp_path / "run" / "scores.json").exists()  # refused before any analysis
    assert "Traceback" not in out and expected.lower() in out.lower(), out


def test_budget_bytes_replaces_the_default_bits_per_weight(analyzed, tmp_path):
    """`budget.bytes=N` as the docs write it: the config's default bits_per_weight (4.5) gives way."""
    run, _ = analyzed
    params = sum(m["params"] for m in json.loads((run / "scores.json").read_text())["modules"])
    nbytes = params * 6 // 8  # 6 bits per weight: a budget the default 4.5 would not give
    code, out = _run(tmp_path, "mode=solve", f"scores={run / 'scores.json'}", f"budget.bytes={nbytes}")
    assert code == 0, out
    layout = json.loads((tmp_path / "run" / "layout.json").read_text())
    assert 4.5 < layout["bits_per_weight"] <= 6


def test_weights_only_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """A model folder without tokenizer files: refused naming it and data.tokenizer=, before load_model; with
    data.tokenizer=<a folder with a tokenizer> the same folder passes the check."""
    from qat.errors import ConfigError
    from qat.jobs.config import register_resolvers
    from qat.testing import tiny_model
    from tests.export.test_gguf_file import bpe_tokenizer

    register_resolvers()  # configs/paths' ${qat_root:}, as the CLI registers it

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the tokenizer check")
    monkeypatch.setattr(job, "load_model", no_model)
    tiny_model("qwen2", num_layers=1).save_pretrained(tmp_path / "weights_only")
    bpe_tokenizer().save_pretrained(tmp_path / "tok")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="sensitivity", overrides=[
            f"model.path={tmp_path}/weights_only", f"paths.output_dir={tmp_path}/out"]), resolve=True)
    with pytest.raises(ConfigError, match=r"weights_only: no tokenizer could be loaded.*data\.tokenizer="):
        job.run_sensitivity_job(cfg, str(tmp_path / "out"))
    job.check_sensitivity({**cfg, "data": {**cfg["data"], "tokenizer": str(tmp_path / "tok")}})


def test_default_names_differ_and_clashing_recipe_files_are_labelled_apart(analyzed, tmp_path, capsys):
    """Unnamed runs write auto_<bpw>bpw; two recipe files of one name (two runs' `auto`) get distinct qat-compare
    rows, labelled by path, with a warning naming both."""
    from qat.jobs.ptq import quant_labels
    run, _ = analyzed
    code, out = run_in_process("sensitivity", ["mode=solve", f"scores={run}/scores.json", "budget.bits_per_weight=4.5",
                                               "plot=false", f"hydra.run.dir={tmp_path}/s"])
    assert code == 0, out
    bpw = json.loads((tmp_path / "s" / "layout.json").read_text())["bits_per_weight"]
    assert (tmp_path / "s" / "quant" / f"auto_{bpw:.2f}bpw.yaml").is_file()
    twin = tmp_path / "twin" / "quant" / "auto.yaml"
    twin.parent.mkdir(parents=True)
    twin.write_bytes((run / "quant" / "auto.yaml").read_bytes())
    quants = [str(run / "quant" / "auto.yaml"), str(twin), "w4a16_g128"]
    warnings = []
    labels = quant_labels(quants, warnings.append)
    assert labels == quants[:2] + ["w4a16_g128"] and len(warnings) == 2
    assert str(twin) in warnings[0] and "'auto'" in warnings[0]
    mine = tmp_path / "mine.yaml"
    mine.write_text((run / "quant" / "auto.yaml").read_text())
    assert quant_labels([quants[0], str(mine)], warnings.append) == [quants[0], "mine"]


def test_method_options_are_declared_so_the_documented_form_works(tmp_path, monkeypatch):
    """method.probes= (no `+`) reaches the scorer; the other methods' null options are its defaults."""
    seen = []

    def no_model(*args, **kwargs):
        raise AssertionError("stop before the model")
    monkeypatch.setattr(job, "load_model", no_model)
    real = job.build_scorer
    monkeypatch.setattr(job, "build_scorer", lambda options: seen.append(real(options)) or seen[-1])
    code, out = _run(tmp_path, "method.name=hutchinson", "method.probes=1")
    assert "stop before the model" in out and seen and seen[0].config.probes == 1, out
