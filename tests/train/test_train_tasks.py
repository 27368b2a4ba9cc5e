"""qat-train's table with lm-eval task columns (eval.tasks): every row (FP, RTN, QAT) gets value ± stderr, the FP
cell is lm-eval's number for the float model, result.json carries the QAT row's tasks to qat-compare, a missing
lm-eval leaves the columns out with one line saying why, bad names are refused before training."""
from __future__ import annotations

import json

import pytest

import qat.lit.run as run
from qat.jobs.harness import INSTALL_HINT
from qat.jobs.results import load_results
from qat.lit.run import check_config, train

from helpers_train import compose_train

TASK = "qat_tiny_lambada"
BASE = ["trainer.max_steps=2", "eval.baselines=true", "eval.max_blocks=2", "callbacks=none", "logger=none"]


def test_defaults_main_job_on_tests_off():
    assert list(compose_train([]).eval.tasks) == []
    assert list(compose_train(["experiment=smollm2_w4_qat"]).eval.tasks) == ["qat_wiki_lambada"]
    # smoke and tiny debug runs of any experiment run no task
    assert list(compose_train(["experiment=smollm2_w4_qat", "debug=tiny"]).eval.tasks) == []
    assert list(compose_train(["experiment=smollm2_w4_qat", "debug=fast_dev_run"]).eval.tasks) == []


def test_table_has_task_columns_for_every_row(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from qat.jobs.harness import evaluate_tasks, flat_metrics
    from qat.models import ByteTokenizer, load_model

    cfg = compose_train([*BASE, f"eval.tasks=[{TASK}]"], tmp_path)
    results = train(cfg)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| model"))
    assert f"{TASK}/acc" in header and header.index("ppl") < header.index(f"{TASK}/acc")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for name in ("FP", "RTN", "QAT"):
        assert " ± " in rows[name], name
    assert "lm-eval task columns" in out
    for key in ("fp_tasks", "rtn_tasks", "tasks"):
        assert set(results[key]) == {f"{TASK}/acc", f"{TASK}/perplexity"}
    # the FP cells are lm-eval's numbers for the float model, exactly
    model = load_model("tiny", "float32", **dict(cfg.model.tiny))
    fresh = flat_metrics(evaluate_tasks(model, ByteTokenizer(), [TASK], batch_size=4))
    assert results["fp_tasks"] == fresh
    acc = results["fp_tasks"][f"{TASK}/acc"]
    assert f"{acc['value']:.4f} ± {acc['stderr']:.4f}" in rows["FP"]
    # result.json: the QAT row's tasks reach qat-compare
    row, = load_results([tmp_path / "result.json"])
    assert row["tasks"] == json.loads((tmp_path / "result.json").read_text())["tasks"] == results["tasks"]


def test_without_lm_eval_columns_are_left_out_with_one_line(tmp_path, capsys, monkeypatch):
    def missing():
        raise ImportError(INSTALL_HINT)

    monkeypatch.setattr(run, "require_lm_eval", missing)
    results = train(compose_train([*BASE, f"eval.tasks=[{TASK}]"], tmp_path))
    out = capsys.readouterr().out
    assert TASK not in out.split("| model")[1].splitlines()[0]  # no column
    notes = [line for line in out.splitlines() if "left out of the table" in line]
    assert len(notes) == 1 and "pip install 'qat[eval]'" in notes[0] and TASK in notes[0]
    assert "tasks" not in results and {"fp_ppl", "rtn_ppl", "qat_ppl"} <= set(results)


@pytest.mark.parametrize("override, match", [
    ("eval.tasks=[qat_no_such_task]", r"eval.tasks / eval.harness: tasks: unknown \['qat_no_such_task'\]"),
    ("eval.harness.batch_size=0", r"harness.batch_size=0"),
    ("+eval.harness.limt=3", r"eval.harness: unknown key\(s\) \['limt'\]"),
])
def test_bad_tasks_refused_before_training(override, match):
    if "no_such" in override:  # a qat_ name: lm-eval's own index (a minute) is not read
        pytest.importorskip("lm_eval")
    overrides = [override] if "tasks" in override else [override, f"eval.tasks=[{TASK}]"]
    with pytest.raises(ValueError, match=match):
        check_config(compose_train(overrides))


def test_tasks_read_data_tokenizer_not_the_weights_only_model_folder(tmp_path):
    """model.path=<weights only> data.tokenizer=<folder>: the pre-check passes, and the task columns are computed
    with that tokenizer (it used to be loaded from model.path, refused with "give data.tokenizer=", given)."""
    pytest.importorskip("lm_eval")
    from tests.integration.test_harness import weights_only_and_tokenizer

    model, tok = weights_only_and_tokenizer(tmp_path)
    cfg = compose_train(["trainer.max_steps=1", "eval.max_blocks=2", "callbacks=none", "logger=none",
                         f"model.path={model}", f"data.tokenizer={tok}", f"eval.tasks=[{TASK}]", "eval.harness.limit=2"],
                        tmp_path / "out")
    results = train(cfg)
    assert set(results["tasks"]) == {f"{TASK}/acc", f"{TASK}/perplexity"}
    assert results["tasks"][f"{TASK}/acc"]["n"] == 2
