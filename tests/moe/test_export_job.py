"""qat-export's job (`qat.jobs.export.run_export`) on a fused-expert MoE model: it completes and its summary
counts the expert weights (a converted QuantizedExperts holds them as codes, not as `gate_up_proj` / `down_proj`)."""
from __future__ import annotations

import pytest

from qat.jobs.export import run_export
from qat.testing import tiny_moe


@pytest.mark.parametrize("fmt, gguf_type, low, high", [("native", "Q8_0", 4.0, 32.0), ("gguf", "Q8_0", 8.0, 32.0)])
def test_export_job_of_a_moe_model_counts_every_parameter(fmt, gguf_type, low, high, tmp_path):
    float_model = tiny_moe("qwen3_moe", num_experts=4)
    float_model.save_pretrained(tmp_path / "moe")
    n_params = sum(p.numel() for p in float_model.parameters())
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "native")
    res = run_export(str(tmp_path / "moe"), str(out), format=fmt, gguf_type=gguf_type, tokenizer="tiny",
                     quant="w4a16_g128" if fmt == "native" else None)
    assert res["bytes"] > 0 and low < res["file_bits_per_param"] < high
    # the bits are the file's per parameter of the float model: every expert weight counted once, nothing twice
    assert 8 * res["bytes"] / res["file_bits_per_param"] == pytest.approx(n_params, rel=1e-3)
