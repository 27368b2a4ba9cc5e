"""A model exported in bf16 reloads in bf16 with the logits it had (atol=0): the loaders build the model in the
dtype its float tensors were stored in and dequantize to it (they used to build float32 and refuse the file)."""
from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import qat
from qat.export import export, export_gguf, load_any
from qat.export.common import stored_float_dtype
from qat import testing
from tests.export.conftest import logits, tiny_llama


def bf16_model():
    """Built in bf16 as a bf16 checkpoint loads (RoPE's inv_freq stays float32), not cast from float32."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama().config, dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("fmt, recipe", [("native", "w4a16_g128"), ("compressed_tensors", "w4a16_g128"),
                                         ("gptq", "gptq_w4a16_g128")])
def test_bf16_export_reloads_in_bf16_with_equal_logits(fmt, recipe, ids, tmp_path):
    model = qat.prepare(bf16_model(), recipe)
    ref = logits(model, ids)
    export(model, tmp_path / fmt, format=fmt)
    loaded = load_any(tmp_path / fmt)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32  # built in bf16 as a checkpoint loads, not cast
    got = logits(loaded, ids)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)


@pytest.mark.parametrize("fmt", ["gguf", "torch", "hf"])
def test_load_any_with_a_dtype_casts_as_a_checkpoint_of_that_dtype_loads(fmt, ids, tmp_path):
    """`load_any(float checkpoint, dtype=...)`: RoPE's inv_freq stays float32 (`cast_as_loaded`; a plain `.to` of the
    GGUF model rounded it), so every float form gives transformers' own bf16 load of the same weights, atol 0."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    ref = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16), ids)
    if fmt == "gguf":
        path = export_gguf(model, tmp_path / "m.gguf", "F32")  # exact
    elif fmt == "torch":
        path = tmp_path / "hf" / "pytorch_model.bin"
        torch.save(model.state_dict(), path)
    else:
        path = tmp_path / "hf"
    loaded = load_any(path, dtype="bfloat16")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert not testing.rounded_rope(loaded) and loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(logits(loaded, ids), ref)


def test_stored_float_dtype_counts_the_float_tensors_outside_quantized_modules():
    tensors = {"embed.weight": torch.zeros(10, 4, dtype=torch.bfloat16), "norm.weight": torch.zeros(4),
               "q.weight_scale": torch.zeros(100), "q.weight": torch.zeros(100, dtype=torch.float8_e4m3fn)}
    assert stored_float_dtype(tensors, ["q"]) == torch.bfloat16
    assert stored_float_dtype({"q.qweight": torch.zeros(3, dtype=torch.int32)}, ["q"]) == torch.float32


@pytest.mark.parametrize("fmt", ["native", "compressed_tensors"])
@pytest.mark.parametrize("recipe", ["nvfp4_w4a16", "nvfp4_w4a4"])
def test_nvfp4_model_cast_by_qat_reloads_bit_exactly(recipe, fmt, ids, tmp_path):
    """qat's builders cast as a checkpoint of that dtype loads (`qat.testing.cast_as_loaded`: RoPE's inv_freq stays
    float32), so a bf16 NVFP4 model reloads with its logits (it differed by 0.0046 when inv_freq was rounded)."""
    base = testing.tiny_llama(vocab_size=320, hidden_size=256, intermediate_size=512, dtype=torch.bfloat16)
    assert base.model.rotary_emb.inv_freq.dtype == torch.float32
    model = qat.prepare(base, recipe)
    ref = logits(model, ids)  # W4A4: calibrates the static activation globals
    export(model, tmp_path / fmt, format=fmt)
    assert torch.equal(logits(load_any(tmp_path / fmt), ids), ref)  # atol=0


def test_a_plain_bf16_cast_rounds_rope_frequencies_and_only_that_differs_on_reload(ids, tmp_path, caplog):
    """`model.to(torch.bfloat16)` rounds RoPE's inv_freq (a buffer no checkpoint stores) to bf16; every loader computes
    it in float32, so such a model's logits differ from its reload's (here by a few 1e-3). The weights are equal:
    giving the model the loader's float32 frequencies gives exactly the reloaded logits."""
    plain = tiny_llama().to(torch.bfloat16)
    assert plain.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    model = qat.prepare(plain, "nvfp4_w4a16")
    with caplog.at_level(logging.WARNING):
        export(model, tmp_path / "n", format="native")
    assert "model.rotary_emb.inv_freq is torch.bfloat16 (a plain model.to(dtype) rounded it)" in caplog.text
    loaded = load_any(tmp_path / "n")
    got, ref = logits(loaded, ids), logits(model, ids)
    assert 0 < float((got.float() - ref.float()).abs().max()) < 0.05
    rope, theirs = model.model.rotary_emb, loaded.model.rotary_emb
    rope.inv_freq, rope.original_inv_freq = theirs.inv_freq.clone(), theirs.original_inv_freq.clone()
    assert torch.equal(logits(model, ids), got)
