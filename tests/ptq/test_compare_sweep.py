"""qat-compare -m: the multirun over method x scheme (QAT included), failed jobs, and the eval-protocol check."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from qat.jobs.results import check_protocols, load_results, write_results
from qat.jobs.sweep import collect_sweep, run_sweep_job, train_config
from qat.recipes import CONFIG_DIR

from .conftest import compose_job

PROTO = {"data": "corpus.txt", "split": "test", "blocks": 4, "block_size": 64}


def _compare_cfg(overrides):
    return compose_job("compare", overrides)


def _row(method, quant, ppl, protocol=PROTO):
    return {"method": method, "quant": quant, "ppl": ppl, "bits_per_weight": 4.25, "size_mb": 1.0, "wall_s": 1.0,
            "peak_mem_mb": 1.0, "status": "ok", "error": "", "protocol": protocol}


@pytest.mark.slow
def test_multirun_writes_one_table_with_qat_and_failed_rows(tmp_path):
    """fp, rtn, gptq, qat (a real 3-step training) and a job that fails, x two schemes, in one command."""
    (tmp_path / "cfg" / "method").mkdir(parents=True)
    (tmp_path / "cfg" / "method" / "boom.yaml").write_text("name: gptq\nlabel: boom\nmin_tokens: 1000000000\n")
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "qat.cli.compare", "-m", "method=fp,rtn,gptq,qat,boom",
           "quant=w4a16_g128,w3a16_g64", "calibration.samples=8", "eval.max_blocks=4",
           'qat.overrides=["trainer.max_steps=3","eval.baselines=true"]', f"hydra.sweep.dir={sweep}",
           f"hydra.searchpath=[file://{tmp_path / 'cfg'}]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]  # fail_on_error: exit 1, after writing the table
    assert "2 job(s) failed: 8_boom_w4a16_g128, 9_boom_w3a16_g64" in proc.stderr  # their folders
    doc = json.loads((sweep / "results.json").read_text())
    got = {(r["method"], r["quant"]): r for r in doc["rows"]}
    ok = [(m, q) for m in ("rtn", "gptq", "qat") for q in ("w4a16_g128", "w3a16_g64")] + [("fp", "fp")]
    assert set(got) == set(ok) | {("boom", "w4a16_g128"), ("boom", "w3a16_g64")}  # the float row once
    for key in ok:
        row = got[key]
        assert row["status"] == "ok" and all(math.isfinite(row[k]) for k in ("ppl", "bits_per_weight", "size_mb", "wall_s"))
    assert got[("fp", "fp")]["bits_per_weight"] == 16 and got[("rtn", "w3a16_g64")]["bits_per_weight"] == 3.5
    for q in ("w4a16_g128", "w3a16_g64"):
        assert got[("boom", q)]["status"] == "failed" and "min_tokens" in got[("boom", q)]["error"]
        assert got[("boom", q)]["ppl"] is None  # strict JSON: NaN is written as null
        # the QAT row comes from a real training: 3 steps moved it away from its starting point
        qat_row = json.loads(next(sweep.glob(f"*_qat_{q}/result.json")).read_text())
        assert qat_row["steps"] == 3 and qat_row["ppl"] != qat_row["start_ppl"]
        rtn_row = json.loads(next(sweep.glob(f"*_rtn_{q}/result.json")).read_text())
        assert qat_row["device"] == rtn_row["device"] == "cpu"  # QAT_DEVICE=cpu: every row's device
        assert got[("qat", q)]["bits_per_weight"] == got[("rtn", q)]["bits_per_weight"]
    assert doc["protocol"] == {"data": str(CONFIG_DIR.parent / "configs/data/tiny_corpus.txt"), "split": "test",
                               "blocks": 4, "block_size": 64}
    assert "| boom " in (sweep / "results.md").read_text() and "failed" in (sweep / "results.csv").read_text()
    assert (sweep / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_failed_job_is_a_row_not_an_exception(tmp_path):
    cfg = _compare_cfg(["method=gptq", "quant=w4a16_g128", "method.min_tokens=1000000000"])
    row = run_sweep_job(cfg, tmp_path / "0_gptq", log=lambda s: None)
    assert row["status"] == "failed" and "min_tokens" in row["error"] and math.isnan(row["ppl"])
    assert json.loads((tmp_path / "0_gptq" / "result.json").read_text())["status"] == "failed"
    row = run_sweep_job({**cfg, "method": {"name": "qat"}}, tmp_path / "1_qat", log=lambda s: None)
    assert row["status"] == "failed" and "qat-compare" in row["error"]  # no QAT runner given
    rows = collect_sweep(tmp_path)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert "| failed |" in write_results(rows, tmp_path)["md"].read_text()


def test_mismatched_protocol_is_refused_naming_the_file(tmp_path):
    for i, (method, proto) in enumerate([("fp", PROTO), ("rtn", PROTO), ("qat", {**PROTO, "blocks": 8})]):
        (tmp_path / f"{i}_{method}").mkdir()
        (tmp_path / f"{i}_{method}" / "result.json").write_text(json.dumps(_row(method, "w4", 10.0 + i, proto)))
    rows = collect_sweep(tmp_path)
    with pytest.raises(ValueError, match=r"2_qat/result.json: eval protocol differs from .*0_fp/result.json "
                                         r"\(blocks: 4 vs 8\)"):
        write_results(rows, tmp_path)
    assert not (tmp_path / "results.md").exists()
    # the same check guards rows merged into a plain qat-compare run
    cfg = _compare_cfg(["methods=[fp]", "eval.max_blocks=2", f"results=[{tmp_path / '0_fp' / 'result.json'}]"])
    from qat.jobs.compare import run_compare_job

    with pytest.raises(ValueError, match=r"0_fp/result.json: eval protocol differs .*blocks: 2 vs 4"):
        run_compare_job(cfg, tmp_path / "plain", log=lambda s: None)


def test_reused_float_row_appears_once(tmp_path):
    for i in range(2):
        (tmp_path / f"{i}_fp").mkdir()
        row = {**_row("fp", "fp", 10.0), "model": "tiny", **({"reused": "0_fp/result.json"} if i else {})}
        (tmp_path / f"{i}_fp" / "result.json").write_text(json.dumps(row))
    assert [r["method"] for r in collect_sweep(tmp_path)] == ["fp"]
    (tmp_path / "2_fp").mkdir()  # measured twice (a parallel launcher): still one row
    (tmp_path / "2_fp" / "result.json").write_text(json.dumps(_row("fp", "fp", 10.0)))
    assert [r["source"].split("/")[-2] for r in collect_sweep(tmp_path)] == ["0_fp"]
    assert load_results([tmp_path / "0_fp" / "result.json"])[0]["protocol"] == PROTO


def test_qat_job_trains_on_the_compare_model_data_scheme_and_blocks():
    cfg = _compare_cfg(["method=qat_gptq", "quant=w3a16_g64", "data.block_size=32", "eval.max_blocks=3",
                        "calibration.samples=12", 'qat.overrides=["trainer.max_steps=2"]'])
    tcfg = train_config(cfg, "/tmp/unused")
    assert tcfg.data.block_size == 32 and tcfg.data.path == cfg["data"]["path"] and tcfg.eval.max_blocks == 3
    assert tcfg.quant.name == "w3a16_g64" and tcfg.init.name == "gptq" and tcfg.trainer.max_steps == 2
    assert tcfg.init.calibration == {"samples": 12, "seq_len": 32} and tcfg.model.path == "tiny"
    assert tcfg.task_name == "tiny_qat"  # qat.experiment (the tiny one by default)
    main_job = train_config({**cfg, "qat": {"experiment": "smollm2_w4_qat"}}, "/tmp/unused")
    assert list(main_job.eval.tasks) == []  # the experiment's lm-eval column is not a sweep row's
    with pytest.raises(ValueError, match=r"qat: unknown key\(s\) \['steps'\]"):
        train_config({**cfg, "qat": {"steps": 3}}, "/tmp/unused")


@pytest.mark.parametrize("device, accelerator, devices", [("cpu", "cpu", 1), ("cuda:1", "gpu", [1]),
                                                        ("cuda", "gpu", 1), ("auto", "gpu", 1)])
def test_qat_job_trains_on_the_compare_device(monkeypatch, device, accelerator, devices):
    """A QAT row's trainer is placed by the compare job's `device` (its fp / PTQ rows follow it too); a host with two
    CUDA devices is faked: only the overrides are built here, nothing runs on it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = _compare_cfg(["method=qat", "quant=w4a16_g128", f"device={device}"])
    tcfg = train_config(cfg, "/tmp/unused")
    assert (tcfg.trainer.accelerator, tcfg.trainer.devices) == (accelerator, devices)


def test_qat_job_device_gives_way_to_trainer_overrides(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = _compare_cfg(["method=qat", "quant=w4a16_g128", "device=cuda:1",
                        'qat.overrides=["trainer.accelerator=cpu"]'])
    tcfg = train_config(cfg, "/tmp/unused")
    assert (tcfg.trainer.accelerator, tcfg.trainer.devices) == ("cpu", 1)  # configs/trainer's, not device's
    ddp = {**cfg, "qat": {**cfg["qat"], "overrides": []}, "method": {**cfg["method"], "overrides": ["trainer=ddp"]}}
    with pytest.raises(ValueError, match=r"trainer.devices=2 .*2 training processes, and Lightning starts each one by "
                                         r"re-running the whole qat-compare command"):
        train_config(ddp, "/tmp/unused")  # configs/trainer/ddp's two CPU processes: refused, not the sweep run twice
    for devices in ("[0,1]", "-1"):
        with pytest.raises(ValueError, match="re-running the whole qat-compare command"):
            train_config({**ddp, "method": {**ddp["method"], "overrides": ["trainer=ddp", f"trainer.devices={devices}"]}},
                         "/tmp/unused")
    tcfg = train_config({**ddp, "method": {**ddp["method"], "overrides": ["trainer=ddp", "trainer.devices=1"]}},
                        "/tmp/unused")
    assert tcfg.trainer.strategy == "ddp" and tcfg.trainer.devices == 1 and tcfg.trainer.accelerator == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device='cuda:1': no CUDA device here"):
        train_config({**cfg, "qat": {**cfg["qat"], "overrides": []}}, "/tmp/unused")


@pytest.mark.parametrize("method", ["fp", "qat", "qat_gptq", "qat_awq"])
def test_compare_method_configs_compose(method):
    cfg = _compare_cfg([f"method={method}", "quant=w4a16_g128"])
    assert cfg["method"]["name"] == ("fp" if method == "fp" else "qat")


def test_compare_holds_one_model_at_a_time(tmp_path, monkeypatch):
    """Each row's model is dropped before the next row loads its own (on a GPU: twice the model memory otherwise)."""
    import weakref

    from qat.jobs import compare, ptq

    inputs, loaded = ptq.job_inputs, []

    def job_inputs(*args, **kwargs):
        load, batches, blocks = inputs(*args, **kwargs)

        def tracked():
            assert all(ref() is None for ref in loaded), "the previous row's model is still alive"
            model = load()
            loaded.append(weakref.ref(model))
            return model
        return tracked, batches, blocks
    monkeypatch.setattr(compare, "job_inputs", job_inputs)
    cfg = _compare_cfg(["methods=[fp,rtn]", "quants=[w4a16_g128,w3a16_g64]", "eval.max_blocks=2", "device=cpu"])
    compare.run_compare_job(cfg, tmp_path, log=lambda s: None)
    assert len(loaded) == 3


def test_rows_of_cpu_and_gpu_runs_are_not_merged(tmp_path):
    """Rows record their device; merging a CPU row with a GPU one is refused naming both, rows of one kind (cuda:0
    and cuda:1) and rows that record none (older files, qat-train) pass."""
    rows = [{**_row("gptq", "w4", 10.0), "source": "cpu/result.json", "device": "cpu"},
            {**_row("rtn", "w4", 11.0), "source": "legacy/result.json"}]
    assert check_protocols(rows) == PROTO
    gpu = [{**_row("gptq", "w4", 10.0), "source": f"gpu{i}/result.json", "device": f"cuda:{i}"} for i in range(2)]
    assert check_protocols(gpu) == PROTO
    with pytest.raises(ValueError, match=r"gpu0/result.json: measured on device cuda, cpu/result.json on cpu"):
        check_protocols([*rows, *gpu])
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "result.json").write_text(json.dumps(gpu[0]))
    assert load_results([tmp_path / "gpu" / "result.json"])[0]["device"] == "cuda:0"


def test_ptq_rows_show_progress_unless_turned_off(tmp_path, monkeypatch, capsys):
    """A GPTQ row on a real model runs for minutes: it shows the per-block bar as qat-ptq does (progress: false
    hides it); a bad value fails the row before the model loads."""
    import qat.jobs.sweep as sweep
    seen = []
    monkeypatch.setattr(sweep, "run_one", lambda *a, **k: seen.append(k["progress"]) or ({"ppl": 1.0}, None))
    cfg = _compare_cfg(["method=rtn", "quant=w4a16_g128"])
    for value, shown in ((None, True), (False, False)):
        run_sweep_job({**cfg, "progress": value} if value is not None else cfg, tmp_path / str(value),
                      log=lambda s: None)
        assert seen.pop() is shown
    monkeypatch.setattr(sweep, "job_inputs", lambda *a, **k: pytest.fail("loaded before the check"))
    row = run_sweep_job({**cfg, "progress": "sometimes"}, tmp_path / "bad", log=lambda s: None)
    assert row["status"] == "failed" and "progress" in row["error"]
