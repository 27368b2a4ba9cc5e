"""PTQ-initialised QAT (qat-train init=gptq|awq|rtn) and the result.json row that qat-compare reads."""
import json

import pytest
import torch
from helpers_train import ROOT, compose_train

import qat
from qat.jobs.results import load_results
from qat.lit.run import train


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_init_pins_the_ptq_grid_then_trains(tmp_path, capsys, method):
    cfg = compose_train([f"init={method}", "init.calibration.samples=4", "init.calibration.seq_len=64",
                         "trainer.max_steps=2", "eval.baselines=true", "eval.max_blocks=2"], tmp_path)
    results = train(cfg)
    out = capsys.readouterr().out
    assert f"| {method.upper()} " in out and "| QAT " in out
    # FP is measured before the PTQ solution is written into the model (it differs from the start point)
    assert results["fp_ppl"] != results["rtn_ppl"]
    row = json.loads((tmp_path / "result.json").read_text())
    assert row["method"] == f"qat+{method}" and row["quant"] == "w4a16_g128" and row["init_s"] > 0
    (loaded,) = load_results([tmp_path / "result.json"])
    assert loaded["method"] == f"qat+{method}" and loaded["ppl"] == pytest.approx(results["qat_ppl"])


def test_init_pins_qparams_that_survive_the_checkpoint(tmp_path):
    from qat.lit import QATModule

    cfg = compose_train(["init=gptq", "init.calibration.samples=4", "init.calibration.seq_len=64",
                         "trainer.max_steps=1"], tmp_path)
    results = train(cfg)
    module = QATModule.load_from_checkpoint(results["ckpt"], map_location="cpu")
    pinned = [q for _, q in qat.quantizers(module.model, ["weight"]) if q.pinned]
    assert pinned and all(not q.observing for q in pinned)
    ids = torch.randint(0, 200, (1, 16))
    with torch.no_grad():
        fake = module.model(ids).logits
        qat.convert(module.model)
        torch.testing.assert_close(module.model(ids).logits, fake, atol=0, rtol=0)


def test_bad_init_option_is_named(tmp_path):
    cfg = compose_train(["init=gptq", "+init.act_order=true"], tmp_path)
    with pytest.raises(ValueError, match=r"init: .*act_order"):
        train(cfg)


def tiny_prepared():
    """A tiny Llama prepared at w4a16_g128 and calibration batches of fixture text."""
    from qat.data import calibration_batches
    from qat.models import load_model

    model = qat.prepare(load_model("tiny"), qat.load_recipe("w4a16_g128"))
    fixture = str(ROOT / "configs" / "data" / "tiny_corpus.txt")
    seqs = calibration_batches({"path": fixture, "tokenizer": "tiny", "sample_by": "paragraph"}, 8, 64)
    return model, [torch.cat(seqs)]


def _fake_quant_weights(model):
    return {n: m.weight_quantizer(m.weight).detach().clone() for n, m in qat.ptq.runner.quantized_linears(model).items()}


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_cell_start_is_exactly_the_ptq_model_with_latents_back_near_the_floats(method):
    import qat.ptq.runner
    from qat.ptq.start import float_weights, ptq_start

    model, batches = tiny_prepared()
    floats = float_weights(model)
    qat.ptq.apply(model, method, batches, progress=False)
    solved = {n: m.weight.detach().clone() for n, m in qat.ptq.runner.quantized_linears(model).items()}
    before = _fake_quant_weights(model)
    moved = ptq_start(model, "cell", floats)
    after = _fake_quant_weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # the same model at step 0
    # GPTQ leaves weights on grid points, moved into their cells; AWQ keeps float (scaled) latent weights
    assert (moved > 0) == (method == "gptq")
    for n, m in qat.ptq.runner.quantized_linears(model).items():
        assert m.weight_quantizer.pinned
        if method == "gptq":  # the latent weights moved from the grid points towards the float weights
            assert (m.weight - floats[n]).norm() < (solved[n] - floats[n]).norm()


def test_track_start_unpins(tmp_path):
    import qat.ptq.runner
    from qat.ptq.start import ptq_start

    model, batches = tiny_prepared()
    qat.ptq.apply(model, "gptq", batches, progress=False)
    ptq_start(model, "track")
    assert all(not m.weight_quantizer.pinned and m.weight_quantizer.observing
               for m in qat.ptq.runner.quantized_linears(model).values())
    with pytest.raises(ValueError, match=r"init.start='grit'; choose from \['cell', 'grid', 'track'\]"):
        ptq_start(model, "grit")


def test_cell_start_trains_where_the_grid_start_stalls(tmp_path):
    """The SmolLM2 finding on the tiny model: from GPTQ's grid points QAT barely moves; from the cell start it
    starts at exactly the GPTQ model and ends better than both the grid start and the RTN start."""
    common = ["init.calibration.samples=8", "init.calibration.seq_len=64", "trainer.max_steps=30",
              "eval.baselines=true", "logger=none", "callbacks=none"]
    res = {}
    for start in ("grid", "cell"):
        res[start] = train(compose_train(["init=gptq", f"init.start={start}", *common], tmp_path / start))
    res["rtn"] = train(compose_train(common[2:], tmp_path / "rtn"))
    assert res["cell"]["rtn_ppl"] == res["grid"]["rtn_ppl"]  # same starting model (the GPTQ result)
    assert res["cell"]["qat_ppl"] < res["cell"]["rtn_ppl"]
    assert res["cell"]["qat_ppl"] < res["grid"]["qat_ppl"] and res["cell"]["qat_ppl"] < res["rtn"]["qat_ppl"]


def test_bad_init_start_is_named(tmp_path):
    cfg = compose_train(["init=gptq", "init.start=grit"], tmp_path)
    with pytest.raises(ValueError, match=r"init.start='grit'; choose from"):
        train(cfg)
