"""Importance-aware GGUF export: with activation statistics, the K-quant fit lowers the output error."""
from __future__ import annotations

import pytest
import torch

from qat.export import export_gguf, load_gguf
from qat.export.imatrix import collect_importance
from tests.export.conftest import logits, tiny_llama


def test_imatrix_lowers_output_error_on_outlier_channels(tmp_path):
    model = tiny_llama()
    with torch.no_grad():  # outlier input channels, as trained LLMs have
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.mul_(torch.exp(torch.randn(256, generator=torch.Generator().manual_seed(3))))
    g = torch.Generator().manual_seed(5)
    imp = collect_importance(model, [torch.randint(0, 320, (4, 64), generator=g) for _ in range(3)])
    assert imp["model.layers.0.mlp.down_proj.weight"].shape == (512,)
    test = torch.randint(0, 320, (4, 64), generator=g)
    ref = logits(model, test)
    err = {}
    for tag, im in (("plain", None), ("imatrix", imp)):
        path = export_gguf(model, tmp_path / f"{tag}.gguf", "Q4_K", importance=im)
        err[tag] = float(((logits(load_gguf(path), test) - ref) ** 2).mean())
    assert err["imatrix"] < 0.9 * err["plain"]


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="no calibration batches"):
        collect_importance(tiny_llama(), [])
