"""qat-export / qat-eval: configs compose, and the functions behind them work end to end on a tiny model."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qat.export.run import run_eval, run_export
from qat.recipes import CONFIG_DIR

if not OmegaConf.has_resolver("qat_root"):
    OmegaConf.register_new_resolver("qat_root", lambda: str(CONFIG_DIR.parent))


@pytest.mark.parametrize("fmt,gguf_type", [("native", "Q8_0"), ("gguf", "Q4_K_M"), ("compressed_tensors", "Q8_0"), ("gptq", "Q8_0")])
def test_export_config_composes(fmt, gguf_type):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("export", overrides=["model=tiny", f"format={fmt}", f"gguf_type={gguf_type}", "output=x",
                                           "quant=w4a16_g128"])
    assert cfg.model.path == "tiny" and cfg.quant.weight.bits == 4 and cfg.format == fmt


def test_eval_config_composes_with_in_flight_quant():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=["model=tiny", "quant=fp8_dynamic", "data=fixture"])
    assert cfg.quant.input.dynamic and cfg.max_blocks == cfg.data.max_eval_blocks
    assert OmegaConf.to_container(cfg.data, resolve=True)["tokenizer"] == "tiny"


@pytest.fixture
def corpus(tmp_path) -> Path:
    words = "the quick brown fox jumps over a lazy dog while cats sleep".split()
    text = "\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(60)) for i in range(40))
    (tmp_path / "c.txt").write_text(text)
    return tmp_path / "c.txt"


def test_export_then_eval_gguf_and_in_flight_fp8(tmp_path, corpus):
    out = run_export("tiny", str(tmp_path / "t.gguf"), format="gguf", gguf_type="Q8_0")
    assert out["bytes"] > 0 and 8.0 < out["bpw"] < 12.0
    res = run_eval(out["output"], data=str(corpus), seq_len=32, max_blocks=2, tokenizer="tiny", prompt="the", max_new_tokens=3)
    base = run_eval("tiny", data=str(corpus), seq_len=32, max_blocks=2, prompt=None)
    fp8 = run_eval("tiny", data=str(corpus), quant="fp8_dynamic", seq_len=32, max_blocks=2, prompt=None)
    assert abs(res["ppl"] / base["ppl"] - 1) < 0.05 and abs(fp8["ppl"] / base["ppl"] - 1) < 0.05
    assert isinstance(res["sample"], str)


def test_export_from_a_qat_checkpoint(tmp_path):
    import torch

    import qat
    from qat.export import load_any
    from qat.models import load_model

    prepared = qat.prepare(load_model("tiny"), qat.load_recipe("gguf_q4_0"))
    torch.save({"state_dict": {f"model.{k}": v for k, v in prepared.state_dict().items()}}, tmp_path / "last.ckpt")
    out = run_export("tiny", str(tmp_path / "n"), format="native", quant="gguf_q4_0", checkpoint=str(tmp_path / "last.ckpt"))
    ids = torch.randint(0, 200, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_any(out["output"])(ids).logits, prepared(ids).logits)
    with pytest.raises(ValueError, match="checkpoint= needs quant="):
        run_export("tiny", str(tmp_path / "x"), checkpoint=str(tmp_path / "last.ckpt"))
