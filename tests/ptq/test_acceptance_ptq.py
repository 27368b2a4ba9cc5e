"""Acceptance checks of qat-ptq / qat-compare jobs: bad values fail before any model is loaded."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

import qat.jobs.ptq
import qat.models
from qat.export import check_recipe_format
from qat.jobs.compare import run_compare_job
from qat.jobs.ptq import run_ptq_job
from qat.ptq import method_config
from qat.recipes import CONFIG_DIR
from qat.transform import load_recipe

from .conftest import compose_job

if not OmegaConf.has_resolver("qat_root"):
    OmegaConf.register_new_resolver("qat_root", lambda: str(CONFIG_DIR.parent))


@pytest.fixture
def no_model(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(qat.models, "load_model", fail)
    monkeypatch.setattr(qat.jobs.ptq, "load_model", fail)  # the jobs' own reference


@pytest.mark.parametrize("overrides, match", [
    (["export=foo"], r"export='foo'; choose from \['native', 'compressed_tensors', 'gptq', 'gguf'\]"),
    (["calibration.samples=0"], r"calibration.samples=0; must be a positive integer"),
    (["calibration.seq_len=-1"], r"calibration.seq_len=-1; must be an integer >= 2"),
    (["calibration.seq_len=1"], r"calibration.seq_len=1; must be an integer >= 2"),  # was data.block_size=1, later
    (["data.block_size=512"], r"data.block_size=512 is larger than the context .*max_position_embeddings=256"),
    (["method=smoothquant", "quant=w8a8", "method.alpha=abc"], r"alpha='abc' must be of type float"),
    (["method=rtn", "quant=w8a8_static", "export=compressed_tensors"],
     r"export=compressed_tensors: compressed-tensors: recipe 'w8a8_static' has a static input scheme"),
    (["method=rtn", "quant=mxfp4", "export=gptq"], r"export=gptq: GPTQ export: recipe 'mxfp4' has fp4_e2m1"),
    (["distributed.processes=4096", "calibration.samples=65536"],  # no upper limit before: 4096 ranks spawned
     r"distributed.processes=4096 is more than the \d+ CPU core\(s\) this host lets qat use; choose 1\.\.\d+"),
])
def test_ptq_job_refuses_bad_values_before_work(tmp_path, no_model, overrides, match, monkeypatch):
    monkeypatch.setattr(qat.jobs.ptq, "launch", lambda *args, **kwargs: pytest.fail("processes were spawned"))
    cfg = compose_job("ptq", ["progress=false", *overrides])
    with pytest.raises(ValueError, match=match):
        run_ptq_job(cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_compare_job_refuses_bad_calibration_before_work(tmp_path, no_model):
    cfg = compose_job("compare", ["calibration.samples=0", "methods=[fp,rtn]", "quants=[w4a16_g128]"])
    with pytest.raises(ValueError, match="calibration.samples=0"):
        run_compare_job(cfg, tmp_path)


@pytest.mark.parametrize("method, value", [("gptq", {"actorder": "yes"}), ("gptq", {"blocksize": 1.5}),
                                           ("awq", {"n_grid": "20"})])
def test_method_option_types_are_checked(method, value):
    key = next(iter(value))
    with pytest.raises(ValueError, match=f"method {method}: {key}=.* must be of type"):
        method_config({"name": method, **value})


def test_gguf_export_of_a_ptq_job_is_a_gguf_file(tmp_path):
    cfg = compose_job("ptq", ["method=rtn", "export=gguf", "calibration.samples=8", "eval.max_blocks=2",
                              "progress=false"])
    result = run_ptq_job(cfg, tmp_path)
    assert result["export"].endswith(".gguf") and (tmp_path / "export_gguf.gguf").read_bytes()[:4] == b"GGUF"


def test_gguf_type_of_a_ptq_export_is_chosen_and_checked_before_work(tmp_path, monkeypatch):
    """qat-ptq export=gguf gguf_type=<type or mix>: the tensors not on a GGUF grid are written in it; a bad name, or
    gguf_type without export=gguf, is refused before anything loads."""
    import gguf

    cfg = compose_job("ptq", ["method=rtn", "export=gguf", "gguf_type=Q4_K_M", "calibration.samples=8",
                              "eval.max_blocks=2", "progress=false", "save=false"])
    run_ptq_job(cfg, tmp_path / "ok")
    types = {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "ok" / "export_gguf.gguf").tensors}
    assert "Q4_K" in types  # the default (Q8_0) writes no K-quant
    import qat.jobs.ptq as job
    monkeypatch.setattr(job, "job_inputs", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(ValueError, match=r"gguf_type='Q4_K_X'; choose a type \[.*\] or a mix \[.*'Q4_K_M'"):
        run_ptq_job({**cfg, "gguf_type": "Q4_K_X"}, tmp_path / "bad")
    with pytest.raises(ValueError, match=r"gguf_type='Q4_K_M' applies to export=gguf only \(export='native'\)"):
        run_ptq_job({**cfg, "export": "native"}, tmp_path / "bad")


def test_the_export_of_a_ptq_job_stores_the_tokenizer_it_read(tmp_path):
    """qat-ptq export=... stores the tokenizer the job read its text with (the model folder's here), as qat-export
    does: a GGUF of a PTQ run carries a vocabulary llama.cpp can run, a folder its tokenizer files."""
    import gguf

    from qat.export.load import load_any_tokenizer
    from qat.testing import tiny_model
    from tests.export.test_gguf_file import bpe_tokenizer

    tiny_model("llama", num_layers=1).save_pretrained(tmp_path / "m")
    bpe_tokenizer().save_pretrained(tmp_path / "m")
    for fmt, out in (("gguf", "export_gguf.gguf"), ("native", "export_native")):
        cfg = compose_job("ptq", ["method=rtn", f"export={fmt}", f"model.path={tmp_path / 'm'}", "calibration.samples=2",
                                  "eval.max_blocks=2", "progress=false", "save=false"])
        run_ptq_job(cfg, tmp_path / fmt)
        if fmt == "gguf":
            tokens = gguf.GGUFReader(tmp_path / fmt / out).fields["tokenizer.ggml.tokens"]  # padded to the rows
            assert bytes(tokens.parts[tokens.data[1]]).decode() == "<|im_start|>"
        else:
            assert load_any_tokenizer(str(tmp_path / fmt / out)).get_vocab() == bpe_tokenizer().get_vocab()


def test_result_is_written_before_the_export(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise qat.jobs.ptq.ConfigError("the writer refused this model")

    monkeypatch.setattr(qat.jobs.ptq, "export", fail)
    cfg = compose_job("ptq", ["method=rtn", "export=gptq", "calibration.samples=2", "eval.max_blocks=2",
                              "progress=false", "save=false"])
    with pytest.raises(ValueError, match="refused this model"):
        run_ptq_job(cfg, tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())  # the measurement survives the failed export
    assert result["quant"] == "w4a16_g128" and result["ppl"] > 1 and "export" not in result


def test_compressed_tensors_refusal_lists_the_float_formats_it_takes():
    with pytest.raises(ValueError, match=r"int weights .*, fp8_e4m3 per_channel \(axis 0\) / per_tensor weights, "
                                         r"or mxfp4 / nvfp4 / mxfp8 / fp8_block weights"):
        check_recipe_format(load_recipe("gguf_q4_k"), "compressed_tensors")
    # what the writer takes passes
    for name in ("mxfp4", "nvfp4_w4a16", "mxfp8", "fp8_block", "w8a8", "w4a16_g128", "fp8_dynamic", "mxfp4_w4a4"):
        check_recipe_format(load_recipe(name), "compressed_tensors")


def _row(method, protocol, **extra):
    return {"method": method, "quant": "w4", "ppl": 10.0, "bits_per_weight": 4.25, "size_mb": 1.0, "wall_s": 1.0,
            "peak_mem_mb": 1.0, "status": "ok", "error": "", "protocol": protocol, **extra}


def test_merging_a_sweeps_result_files_lists_fp_once_in_job_order(tmp_path):
    import json

    from qat.jobs.results import load_results

    proto = {"data": "d", "split": "test", "blocks": 2, "block_size": 8}
    jobs = {"0_fp_w4": _row("fp", proto), "1_fp_w3": _row("fp", proto, reused="0_fp_w4/result.json"),
            "2_rtn_w4": _row("rtn", proto), "10_qat_w4": _row("qat", proto)}
    for name, row in jobs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps(row))
    rows = load_results([str(tmp_path / "*" / "result.json"), str(tmp_path / "2_rtn_w4" / "result.json")])
    assert [r["method"] for r in rows] == ["fp", "rtn", "qat"]


def test_compare_job_refuses_mismatched_results_before_running(tmp_path, monkeypatch):
    import json

    import qat.jobs.ptq

    other = tmp_path / "other.json"
    other.write_text(json.dumps(_row("qat", {"data": "elsewhere", "split": "test", "blocks": 3, "block_size": 64})))
    monkeypatch.setattr(qat.jobs.ptq, "run_one", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    cfg = compose_job("compare", ["calibration.samples=8", "methods=[rtn]", "quants=[w4a16_g128]",
                                  f"results=[{other}]"])
    with pytest.raises(ValueError, match="other.json: eval protocol differs from this run's"):
        run_compare_job(cfg, tmp_path / "out")


def test_pareto_labels_do_not_overlap_when_points_are_close(tmp_path):
    """docs/img/smollm2_g128_pareto.png had every point labelled with its scheme: close points piled up."""
    from qat.jobs.results import pareto_figure, plot_pareto

    rows = [_row(m, None, quant=q, ppl=p, bits_per_weight=b) for m, q, p, b in [
        ("fp", "fp", 27.9, 16.0), ("rtn", "w4a16_g128_ragged", 41.7, 4.27), ("gptq", "w4a16_g128_ragged", 41.4, 4.27),
        ("awq", "w4a16_g128_ragged", 38.0, 4.27), ("qat", "w4a16_g128_ragged", 29.8, 4.27),
        ("rtn", "w4a16_g128", 42.0, 4.25), ("rtn", "w3a16_g128_ragged", 360.7, 3.27),
        ("qat", "w3a16_g128_ragged", 52.9, 3.27)]]
    fig = pareto_figure(rows, "close points")
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    axes = [*fig.axes, *(c for a in fig.axes for c in a.child_axes)]  # the top (secondary) axis is a child
    texts = [t for a in axes for t in [*a.texts, *a.get_xticklabels()] if t.get_visible() and t.get_text()]
    names = " ".join(t.get_text() for t in texts)
    assert all(q in names for q in ("w4a16_g128_ragged", "w4a16_g128", "w3a16_g128_ragged"))  # every scheme named
    boxes = [t.get_window_extent(renderer) for t in texts]
    overlaps = [(texts[i].get_text(), texts[j].get_text()) for i in range(len(boxes)) for j in range(i)
                if boxes[i].overlaps(boxes[j])]
    assert overlaps == []
    plot_pareto(rows, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_too_few_calibration_tokens_fail_before_work(tmp_path, no_model):
    cfg = compose_job("ptq", ["method=awq", "calibration.samples=1", "progress=false"])
    with pytest.raises(ValueError, match=r"1 x 64 = 64 tokens; method awq needs min_tokens=128"):
        run_ptq_job(cfg, tmp_path)


def test_smoothquant_on_a_weight_only_recipe_is_refused(tmp_path):
    cfg = compose_job("ptq", ["method=smoothquant", "quant=w4a16_g128", "calibration.samples=4", "progress=false"])
    with pytest.raises(ValueError, match=r"smoothquant: the recipe quantizes no activations.*w8a8"):
        run_ptq_job(cfg, tmp_path)
    assert not (tmp_path / "result.json").exists()


def test_result_files_are_strict_json(tmp_path):
    """A failed row (NaN numbers) made results.json unreadable for jq / JavaScript: NaN is not JSON."""
    import json

    from qat.jobs.results import failed_row, load_results, write_results

    rows = [_row("rtn", None), failed_row("gptq", "w4", ValueError("boom"))]
    paths = write_results(rows, tmp_path)
    strict = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert strict["rows"][1]["ppl"] is None
    back = load_results([paths["json"]])
    assert back[1]["status"] == "failed" and back[1]["ppl"] != back[1]["ppl"]  # null reads back as NaN


@pytest.mark.parametrize("opts, match", [
    ({"name": "rtn", "observer": "foo"}, r"rtn: observer='foo'; choose from \['minmax'"),
    ({"name": "gptq", "percdamp": -1}, r"^gptq: percdamp=-1 must be in \[0, 1\)$"),  # names only the offender
    ({"name": "gptq", "min_tokens": -5}, r"gptq: min_tokens=-5 must be >= 0"),
    ({"name": "awq", "max_shrink": 2.0}, r"^awq: max_shrink=2.0 must be in \[0, 1\)$"),
])
def test_method_option_ranges_name_the_offender(opts, match):
    with pytest.raises(ValueError, match=match):
        method_config(opts)


def test_compare_job_checks_every_scheme_before_the_first_row(tmp_path, no_model):
    cfg = compose_job("compare", ["methods=[fp,rtn]", "quants=[w4a16_g128,w4a16_g12]", "calibration.samples=8"])
    with pytest.raises(ValueError, match=r"quants entry 'w4a16_g12': quant recipe 'w4a16_g12' not found"):
        run_compare_job(cfg, tmp_path)
