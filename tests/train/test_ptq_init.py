"""PTQ-initialised QAT (qat-train init=gptq|awq|rtn) and the result.json row that qat-compare reads."""
import json

import pytest
import torch
from helpers_train import compose_train

import qat
from qat.compare import load_results
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
