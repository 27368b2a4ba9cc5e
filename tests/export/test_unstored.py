"""What a format cannot hold is said once, naming the scheme and the modules, not dropped in silence."""
from __future__ import annotations

import logging

import pytest

import qat
from qat.export import export


@pytest.mark.parametrize("fmt,expected", [("gptq", {"input", "KV cache"}), ("compressed_tensors", {"KV cache"}),
                                          ("gguf", {"input", "KV cache"})])
def test_activation_and_kv_schemes_a_format_cannot_store_are_named(model, tmp_path, caplog, fmt, expected):
    prepared = qat.prepare(model, qat.load_recipe("w4a8_kv8"))
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "m")
    with caplog.at_level(logging.WARNING):
        export(prepared, out, fmt, "Q8_0")
    said = {kind for kind in ("input", "KV cache") for r in caplog.records
            if f"the {kind} int8" in r.getMessage() and "not stored" in r.getMessage()}
    assert said == expected
    assert sum("not stored" in r.getMessage() for r in caplog.records) == len(expected)  # one line per scheme


def test_requantized_and_rounded_weights_are_one_warning_each(model, tmp_path, caplog):
    prepared = qat.prepare(model, qat.load_recipe("w4a16_g128"))  # fp32 scales, not a ggml grid
    with caplog.at_level(logging.WARNING):
        export(prepared, tmp_path / "m.gguf", "gguf", "Q8_0")
        export(prepared, tmp_path / "g", "gptq")
    requant = [r for r in caplog.records if "re-quantized" in r.getMessage()]
    rounded = [r for r in caplog.records if "stored as fp16" in r.getMessage()]
    assert len(requant) == 1 and "14 tensor(s) hold int4 sym g128 weights (not a GGUF grid" in requant[0].getMessage()
    assert len(rounded) == 1 and "14 layer(s) have fp32 scales" in rounded[0].getMessage()


def test_trained_k_quant_rows_that_gguf_cannot_hold_say_why(tmp_path, caplog):
    from qat.models import load_model

    prepared = qat.prepare(load_model("tiny"), qat.load_recipe("gguf_q4_k"))  # hidden 128: no Q4_K row fits
    with caplog.at_level(logging.WARNING):
        export(prepared, tmp_path / "m.gguf", "gguf", "Q4_K")
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "Q4_K falls back to Q5_0" in said and "its trained GGUF type does not fit these rows" in said
