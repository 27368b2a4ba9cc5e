"""qat-export / qat-eval: configs compose, and the functions behind them work end to end on a tiny model."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qat.jobs.eval import run_eval
from qat.jobs.export import run_export
from qat.recipes import CONFIG_DIR
from qat.testing import tiny_model

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
    assert out["bytes"] > 0 and 8.0 < out["file_bits_per_param"] < 12.0
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


def test_imatrix_config_composes():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("export", overrides=["model=tiny", "format=gguf", "gguf_type=Q4_K_M", "output=x",
                                           "imatrix=calibrate", "data=fixture", "calibration.samples=4"])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert cfg.imatrix == "calibrate" and cfg.calibration.samples == 4 and cfg.calibration.save is None
    assert data["path"].endswith("tiny_corpus.txt") and data["tokenizer"] == "tiny"


@pytest.mark.parametrize("kwargs,match", [
    ({"format": "native", "imatrix": "calibrate", "data": "x"}, "needs format=gguf"),
    ({"format": "gguf", "imatrix": "calibrate"}, "needs calibration text: data="),
    ({"format": "gguf", "imatrix": "nope.safetensors"}, "choose null, 'calibrate', or an existing .safetensors"),
    ({"format": "gguf", "imatrix": "calibrate", "data": "x", "calibration": {"sample": 3}}, "unknown key.*'sample'.*valid"),
])
def test_bad_imatrix_values_are_refused_before_loading(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_export("no/such/model", str(tmp_path / "m.gguf"), **kwargs)


def outlier_llama(folder: Path) -> Path:
    """A 1-layer Llama (rows of 256: K-quants fit) with outlier input channels, saved as a HF folder."""
    import torch

    from qat.testing import tiny_llama

    model = tiny_llama(vocab_size=320, hidden_size=256, intermediate_size=512, num_layers=1,
                       max_position_embeddings=128)
    with torch.no_grad():  # outlier input channels, as trained LLMs have: what an imatrix is for
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.mul_(torch.exp(torch.randn(256, generator=torch.Generator().manual_seed(3))))
    model.save_pretrained(folder)
    return folder


def test_imatrix_calibrate_writes_a_file_that_fits_the_model(tmp_path, corpus, caplog):
    from qat.io import load_safetensors

    src = outlier_llama(tmp_path / "fp")
    cal = {"samples": 2, "seq_len": 32, "batch_size": 1, "save": str(tmp_path / "im.safetensors")}
    res = run_export(str(src), str(tmp_path / "m.gguf"), format="gguf", gguf_type="Q8_0", tokenizer="tiny",
                     imatrix="calibrate", data=str(corpus), calibration=cal)
    imp = load_safetensors(cal["save"])
    assert res["imatrix"] == "calibrate" and imp["model.layers.0.mlp.down_proj.weight"].shape == (512,)
    assert bool((imp["model.layers.0.self_attn.q_proj.weight"] > 0).all())
    assert "has no IQ4_NL/IQ4_XS/Q2_K/Q4_K/Q5_K tensors" in caplog.text  # Q8_0 blocks take no importances: said, not hidden


@pytest.mark.slow
def test_imatrix_calibrate_lowers_held_out_error_and_is_reusable(tmp_path, corpus):
    import gguf
    import torch

    from qat.export import load_any
    from qat.models import ByteTokenizer

    src = outlier_llama(tmp_path / "fp")
    common = {"format": "gguf", "gguf_type": "Q4_K", "tokenizer": "tiny"}
    plain = run_export(str(src), str(tmp_path / "plain.gguf"), **common)
    cal = {"samples": 8, "seq_len": 64, "save": str(tmp_path / "imatrix.safetensors")}
    weighted = run_export(str(src), str(tmp_path / "imat.gguf"), imatrix="calibrate", data=str(corpus), calibration=cal, **common)
    assert weighted["imatrix"] == "calibrate" and (tmp_path / "imatrix.safetensors").is_file()
    held_out = torch.tensor([ByteTokenizer()("a lazy cat jumps while the quick dog sleeps over brown fox")["input_ids"]])
    with torch.no_grad():
        ref = load_any(str(src))(held_out).logits
        err = {k: float(((load_any(r["output"])(held_out).logits - ref) ** 2).mean()) for k, r in
               (("plain", plain), ("imatrix", weighted))}
    assert err["imatrix"] < 0.9 * err["plain"], err
    print(f"held-out logit MSE vs float: plain {err['plain']:.3g}, imatrix {err['imatrix']:.3g}")
    again = run_export(str(src), str(tmp_path / "again.gguf"), imatrix=cal["save"], **common)
    blocks = {k: [t.data.tobytes() for t in gguf.GGUFReader(r["output"]).tensors] for k, r in
              (("plain", plain), ("imatrix", weighted), ("again", again))}
    assert blocks["again"] == blocks["imatrix"] != blocks["plain"]


def test_imatrix_file_that_does_not_fit_is_named(tmp_path):
    import torch

    from qat.io import save_safetensors

    bad = tmp_path / "bad.safetensors"
    save_safetensors({"model.layers.0.mlp.down_proj.weight": torch.ones(7), "model.nope.weight": torch.ones(3)}, bad)
    with pytest.raises(ValueError, match=r"(?s)does not fit.*nope.weight \(no such linear layer\).*down_proj.weight \(shape \(7,\), expected \(512,\)\)"):
        run_export(str(outlier_llama(tmp_path / "fp")), str(tmp_path / "m.gguf"), format="gguf", gguf_type="Q4_K",
                   tokenizer="tiny", imatrix=str(bad))


@pytest.mark.parametrize("kwargs,match", [
    ({"format": "onnx"}, "format='onnx'; choose from"),
    ({"format": "gguf", "gguf_type": "Q4_K_X"}, "gguf_type='Q4_K_X'; choose a type"),
    ({"format": "gguf", "output": "/proc/qat/m.gguf"}, "'/proc/qat/m.gguf' is not writable"),
    ({"format": "native", "output": "/proc/version/n"}, "'/proc/version/n' is not writable.*a file is in the way"),
])
def test_bad_format_type_or_output_is_refused_before_loading(tmp_path, kwargs, match):
    kwargs = {"output": str(tmp_path / "m.gguf"), **kwargs}
    with pytest.raises(ValueError, match=match):  # "no/such/model" would fail to load: the check comes first
        run_export("no/such/model", **kwargs)
    assert not any(tmp_path.iterdir())


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"old")
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "config.json").write_text("{}")
    for output, fmt in ((tmp_path / "m.gguf", "gguf"), (tmp_path / "n", "native")):
        with pytest.raises(ValueError, match="already exists; pass overwrite=true"):
            run_export("no/such/model", str(output), format=fmt)
    res = run_export("tiny", str(tmp_path / "m.gguf"), format="gguf", gguf_type="F16", overwrite=True)
    assert res["bytes"] > 1000 and (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"


def test_float_model_for_a_quantized_format_and_unknown_architecture_are_refused_before_calibration(tmp_path, monkeypatch):
    import qat.jobs.export as run

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated before the check")

    monkeypatch.setattr(run, "importance_for", no_calibration)
    with pytest.raises(ValueError, match="format=gptq stores quantized weights.*pass quant=<recipe>"):
        run_export("tiny", str(tmp_path / "g"), format="gptq")
    real = run.prepare_source

    def as_gpt2(*args, **kwargs):
        model = real(*args, **kwargs)
        model.config.model_type = "gpt2"
        return model

    monkeypatch.setattr(run, "prepare_source", as_gpt2)
    with pytest.raises(ValueError, match="architecture 'gpt2' of 'tiny' is not supported; known: \\[[^]]*'llama'"):
        run_export("tiny", str(tmp_path / "m.gguf"), format="gguf", imatrix="calibrate", data="x")
    assert not any(tmp_path.iterdir())  # nothing written, no folder made


def test_static_in_flight_recipe_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="'w8a8_static' has a static input scheme.*needs calibration"):
        run_eval("no/such/model", quant="w8a8_static")
    with pytest.raises(ValueError, match="'w8a8_static' has a static input scheme.*qat-ptq quant=w8a8_static export="):
        run_export("no/such/model", str(tmp_path / "n"), quant="w8a8_static")
    import qat  # a recipe given as a mapping (a quant=<file>): its name is no recipe qat-ptq could take by name
    mine = {**qat.load_recipe("w8a8_static").to_dict(), "name": "my_static"}
    with pytest.raises(ValueError, match=r"'my_static' has a static.*qat-ptq quant=<the same recipe file> export="):
        run_export("no/such/model", str(tmp_path / "n"), quant=mine)


def test_pinned_checkpoint_of_another_recipe_is_refused_naming_the_module(tmp_path):
    import torch

    import qat
    from qat.models import load_model
    from qat.modules.quantizer import TensorQuantizer

    prepared = qat.prepare(load_model("tiny"), qat.load_recipe("w4a16_g128"))
    for module in prepared.modules():  # pin the qparams, as qat-ptq's model.pt holds them
        if isinstance(getattr(module, "weight_quantizer", None), TensorQuantizer):
            module.weight_quantizer.set_qparams(*module.weight_quantizer.qparams(module.weight))
    torch.save(prepared.state_dict(), tmp_path / "model.pt")
    ckpt = str(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="q_proj.weight_quantizer: the checkpoint was trained with 'int4 sym g128, "
                                         "fp32 scales', this model is prepared with 'int4 asym g128, fp32 scales'"):
        run_export("tiny", str(tmp_path / "a"), quant="w4a16_g128_asym", checkpoint=ckpt)
    with pytest.raises(ValueError, match="this model is prepared with 'int3 sym g64, fp32 scales'"):
        run_export("tiny", str(tmp_path / "b"), quant="w3a16_g64", checkpoint=ckpt)
    # a checkpoint written before quantizers recorded their scheme: the pinned qparams themselves are checked
    state = {k: v for k, v in torch.load(ckpt, weights_only=True).items()}
    for key in [k for k in state if k.endswith("_extra_state")]:
        state[key] = {k: v for k, v in state[key].items() if k != "scheme"}
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"q_proj.weight_quantizer: the checkpoint's pinned zero-point is missing, "
                                         r"but this model's scheme is int4 asym g128"):
        run_export("tiny", str(tmp_path / "d"), quant="w4a16_g128_asym", checkpoint=str(tmp_path / "old.pt"))
    with pytest.raises(ValueError, match=r"q_proj.weight_quantizer: the checkpoint's pinned scale has shape "
                                         r"\(128, 1, 1\); int3 sym g64 on this model needs \(128, 2, 1\)"):
        run_export("tiny", str(tmp_path / "e"), quant="w3a16_g64", checkpoint=str(tmp_path / "old.pt"))
    assert run_export("tiny", str(tmp_path / "c"), quant="w4a16_g128", checkpoint=ckpt)["bytes"] > 0


def test_a_tokenizer_given_that_cannot_be_loaded_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="tokenizer='/no/such/tok' cannot be loaded"):
        run_export("no/such/model", str(tmp_path / "m.gguf"), format="gguf", tokenizer="/no/such/tok")
    with pytest.raises(ValueError, match="tokenizer='/no/such/tok' cannot be loaded"):
        run_eval("no/such/model", tokenizer="/no/such/tok")
    assert not any(tmp_path.iterdir())


def test_missing_output_is_named_and_nothing_is_written(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "qat.cli.export", "model=tiny", "format=native",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "output= is required" in proc.stderr
    assert not (tmp_path / "???").exists()


def test_gguf_pure_reaches_the_writer(tmp_path):
    import gguf

    rules = run_export("tiny", str(tmp_path / "r.gguf"), format="gguf", gguf_type="Q4_0")
    pure = run_export("tiny", str(tmp_path / "p.gguf"), format="gguf", gguf_type="Q4_0", gguf_pure=True)
    out = {t.name: t.tensor_type.name for t in gguf.GGUFReader(rules["output"]).tensors}
    assert out.get("output.weight", out["token_embd.weight"]) in ("Q6_K", "Q8_0")  # tiny is tied: token_embd
    assert {t.tensor_type.name for t in gguf.GGUFReader(pure["output"]).tensors if len(t.shape) > 1} == {"Q4_0"}


def test_eval_without_data_is_generation_only():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=["model=tiny", "~data", "max_new_tokens=4"])
    assert "data" not in cfg and cfg.max_blocks is None
    result = run_eval("tiny", data=cfg.get("data"), prompt=cfg.prompt, max_new_tokens=4)
    assert "ppl" not in result and isinstance(result["sample"], str)


def test_eval_max_new_tokens_zero_skips_the_sample(corpus):
    """max_new_tokens=0 (the config check allows it) means no sample, not transformers' ValueError."""
    result = run_eval("tiny", data=str(corpus), seq_len=32, max_blocks=2, prompt="the",
                      max_new_tokens=0)
    assert "sample" not in result and result["ppl"] > 0


def test_checkpoint_of_another_model_is_named_before_prepare(tmp_path):
    import torch

    import qat
    from qat.models import load_model

    prepared = qat.prepare(load_model("tiny"), qat.load_recipe("w4a16_g128"))
    torch.save(prepared.state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"is for another model than this one \(set model= to the model it was "
                                         r"trained from\): model.embed_tokens.weight: \(512, 128\) there, \(512, 256\) here"):
        run_export("tiny", str(tmp_path / "x"), quant="w4a16_g128", checkpoint=str(tmp_path / "model.pt"),
                   tiny={"hidden_size": 256, "intermediate_size": 512})


def test_tiny_byte_tokenizer_is_named_as_not_stored(tmp_path, caplog):
    """tokenizer=tiny is qat's byte stand-in: the export says it is not stored and how to read the file back,
    instead of asking for the tokenizer= that was given."""
    with caplog.at_level("WARNING"):
        run_export("tiny", str(tmp_path / "t.gguf"), format="gguf", gguf_type="F32", tokenizer="tiny")
    assert "byte-level stand-in" in caplog.text and "tokenizer=tiny" in caplog.text


def test_export_of_a_folder_without_tokenizer_says_the_export_has_none(tmp_path, caplog):
    tiny_model("qwen2", num_layers=1).save_pretrained(tmp_path / "weights_only")  # config.json + weights only
    with caplog.at_level(logging.WARNING):
        run_export(str(tmp_path / "weights_only"), str(tmp_path / "out"), format="native", quant="w4a16_g128")
    assert "weights_only (no tokenizer files there)" in caplog.text and "tokenizer=<" in caplog.text
    assert not (tmp_path / "out" / "tokenizer.json").exists()
