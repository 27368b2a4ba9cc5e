"""The comparison table / plot, the qat-ptq and qat-compare jobs, and that their configs compose."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

import qat
import qat.models
from qat.jobs.compare import run_compare_job
from qat.jobs.measure import weight_bits
from qat.jobs.ptq import run_ptq_job
from qat.jobs.results import load_results, pareto_front, write_results
from qat.ptq import method_config
from qat.recipes import CONFIG_DIR

from .conftest import compose_job

if not OmegaConf.has_resolver("qat_root"):
    OmegaConf.register_new_resolver("qat_root", lambda: str(CONFIG_DIR.parent))

ROWS = [
    {"method": "fp", "quant": "fp", "ppl": 10.0, "bits_per_weight": 16.0, "size_mb": 2.0, "wall_s": 0.0, "peak_mem_mb": 0.0},
    {"method": "rtn", "quant": "w4", "ppl": 12.0, "bits_per_weight": 4.25, "size_mb": 1.0, "wall_s": 1.0, "peak_mem_mb": 1.0},
    {"method": "gptq", "quant": "w4", "ppl": 11.0, "bits_per_weight": 4.25, "size_mb": 1.0, "wall_s": 2.0, "peak_mem_mb": 1.0},
    {"method": "gptq", "quant": "w3", "ppl": 14.0, "bits_per_weight": 3.5, "size_mb": 0.8, "wall_s": 2.0, "peak_mem_mb": 1.0},
]


def test_pareto_front():
    assert [(r["method"], r["quant"]) for r in pareto_front(ROWS)] == [("gptq", "w3"), ("gptq", "w4"), ("fp", "fp")]


def test_write_results(tmp_path):
    paths = write_results(ROWS, tmp_path)
    doc = json.loads(paths["json"].read_text())
    assert [{k: r[k] for k in ROWS[0]} for r in doc["rows"]] == ROWS and all(r["status"] == "ok" for r in doc["rows"])
    assert paths["csv"].read_text().splitlines()[0] == \
        "method,quant,ppl,bits_per_weight,size_mb,wall_s,peak_mem_mb,status,error"
    md = paths["md"].read_text()
    assert "| gptq   | w3    | 14.000" in md and "status" not in md  # status columns only when a job failed
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_load_results_takes_ptq_rows_and_train_results(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS[1]))
    (tmp_path / "b.json").write_text(json.dumps({"qat_ppl": 11.5, "bits_per_weight": 4.25, "quant": "w4"}))
    rows = load_results([tmp_path / "a.json", tmp_path / "b.json"])
    assert {k: rows[0][k] for k in ROWS[1]} == ROWS[1] and rows[0]["source"] == str(tmp_path / "a.json")
    assert rows[1]["method"] == "qat" and rows[1]["ppl"] == 11.5
    assert load_results([str(tmp_path / "*.json")]) == [{**r, "source": r["source"]} for r in rows]  # a glob
    with pytest.raises(ValueError, match="matches no file"):
        load_results([str(tmp_path / "nothing*.json")])
    (tmp_path / "c.json").write_text(json.dumps({"method": "x"}))
    with pytest.raises(ValueError, match=r"c.json: result row lacks \['quant', 'ppl'\]"):
        load_results([tmp_path / "c.json"])
    paths = write_results(rows, tmp_path / "t")
    assert [r["ppl"] for r in load_results([paths["json"]])] == [12.0, 11.5]  # a written table reads back


def test_bits_per_weight_counts_scales(tiny_llama):
    rec = {"name": "w4g32", "ignore": ["lm_head"], "weight": {"bits": 4, "granularity": "per_group", "group_size": 32}}
    model = qat.prepare(tiny_llama, rec)
    bpw, size = weight_bits(model)
    assert bpw == pytest.approx(4 + 32 / 32)  # fp32 scales, one per 32 weights
    assert 0 < size < sum(p.numel() for p in model.parameters()) * 2 / 1e6


def _compose(name, overrides=()):
    return compose_job(name, overrides)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "smoothquant"])
def test_ptq_config_composes(method):
    cfg = _compose("ptq", [f"method={method}", "model=tiny", "data=fixture"])
    assert method_config(cfg["method"]).__class__.__name__.lower().startswith(method[:3])
    qat.QuantRecipe.from_dict(cfg["quant"])


def test_ptq_job_end_to_end(tmp_path):
    cfg = _compose("ptq", ["calibration.samples=16", "eval.max_blocks=4", "method.actorder=true", "progress=false"])
    result = run_ptq_job(cfg, tmp_path)
    assert result["method"] == "gptq"
    assert json.loads((tmp_path / "result.json").read_text())["ppl"] == pytest.approx(result["ppl"])
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    fresh = qat.prepare(qat.models.load_model("tiny", **cfg["model"]["tiny"]), cfg["quant"])
    fresh.load_state_dict(state)
    assert fresh.model.layers[0].mlp.down_proj.weight_quantizer.group_index() is not None
    # 4 bits + an fp32 scale per 128, and act-order's group index: one int64 per input column, as the native
    # export stores it (qat.formats.storage_bits)
    lins = [m for m in fresh.modules() if getattr(m, "weight_quantizer", None) is not None]
    assert all(m.weight_quantizer.group_index() is not None for m in lins)
    expected = sum(4.25 * m.weight.numel() + 64 * m.in_features for m in lins) / sum(m.weight.numel() for m in lins)
    assert result["bits_per_weight"] == pytest.approx(expected)
    # the saved state reproduces the run: same perplexity as the job measured (two GPTQ runs need not
    # agree bit for bit on CPU: multithreaded BLAS sums the Hessian in varying order)
    from qat.jobs.measure import perplexity
    from qat.jobs.ptq import job_inputs

    blocks = job_inputs(cfg["model"], cfg["data"], cfg["calibration"], cfg["eval"])[2]
    assert perplexity(fresh, blocks, cfg["eval"]["batch_size"]) == pytest.approx(result["ppl"], rel=1e-5)


def test_bad_job_config_is_refused_before_work(tmp_path):
    cfg = _compose("ptq", ["calibration.samples=16"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['act_order'\]"):
        run_ptq_job({**cfg, "method": {**cfg["method"], "act_order": True}}, tmp_path)
    with pytest.raises(ValueError, match=r"calibration: unknown key\(s\) \['sample'\]"):
        run_ptq_job({**cfg, "calibration": {**cfg["calibration"], "sample": 3}}, tmp_path)


def test_compare_job(tmp_path):
    cfg = _compose("compare", ["calibration.samples=8", "eval.max_blocks=2", "methods=[fp,rtn,gptq]",
                               "quants=[w4a16_g128]"])
    paths = run_compare_job(cfg, tmp_path, log=lambda s: None)
    doc = json.loads(paths["json"].read_text())
    rows = doc["rows"]
    assert doc["protocol"] == {"data": cfg["data"]["path"], "split": "test", "blocks": 2, "block_size": 64}
    assert [r["method"] for r in rows] == ["fp", "rtn", "gptq"]
    assert all(r["ppl"] > 1 for r in rows) and rows[0]["bits_per_weight"] == 16.0


def test_compare_job_rows_show_progress_unless_turned_off(tmp_path, monkeypatch):
    """The single-process table (no -m) shows each PTQ row's per-block bar as qat-ptq does; a bad `progress` is
    refused before any model loads."""
    import qat.jobs.compare as compare
    seen = []
    real = compare.ptq.run_one
    monkeypatch.setattr(compare.ptq, "run_one", lambda *a, **k: seen.append(k["progress"]) or real(*a, **k))
    base = ["calibration.samples=8", "eval.max_blocks=1", "methods=[rtn]", "quants=[w4a16_g128]"]
    run_compare_job(_compose("compare", base), tmp_path / "a", log=lambda s: None)
    run_compare_job({**_compose("compare", base), "progress": False}, tmp_path / "b", log=lambda s: None)
    assert seen == [True, False]
    monkeypatch.setattr(compare, "job_inputs", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(ValueError, match="progress"):
        run_compare_job({**_compose("compare", base), "progress": "sometimes"}, tmp_path / "c", log=lambda s: None)
