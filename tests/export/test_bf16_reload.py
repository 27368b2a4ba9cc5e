"""A model exported in bf16 reloads in bf16 with the logits it had (atol=0): the loaders build the model in the
dtype its float tensors were stored in and dequantize to it (they used to build float32 and refuse the file)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import qat
from qat.export import export, load_any
from qat.export.common import stored_float_dtype
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
    got = logits(loaded, ids)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)


def test_stored_float_dtype_counts_the_float_tensors_outside_quantized_modules():
    tensors = {"embed.weight": torch.zeros(10, 4, dtype=torch.bfloat16), "norm.weight": torch.zeros(4),
               "q.weight_scale": torch.zeros(100), "q.weight": torch.zeros(100, dtype=torch.float8_e4m3fn)}
    assert stored_float_dtype(tensors, ["q"]) == torch.bfloat16
    assert stored_float_dtype({"q.qweight": torch.zeros(3, dtype=torch.int32)}, ["q"]) == torch.float32
