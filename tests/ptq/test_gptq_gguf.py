"""GPTQ constrained to GGUF grids (ggml legacy blocks, K-quant super-blocks): the solve stays on the grid,
beats plain block quantization and the imatrix fit, and exports to GGUF with zero additional error."""
from __future__ import annotations

import gguf
import pytest
import torch

from qat.export import export_gguf, load_gguf
from qat.formats.ggml import ggml_spec
from qat.formats.kquant import fitted_range, kquant_spec
from qat.primitives import choose_qparams, compute_range, fake_quantize_forward
from qat.ptq import gptq_quantize, ptq_model
from tests.export.conftest import logits, tiny_llama

from .conftest import gptq_problem as _problem, output_error as _err


def _spec(name):
    return kquant_spec(name) if name.endswith("_K") else ggml_spec(name)


def _plain(w, spec, importance=None):
    """Block quantization as the GGUF exporter does it from float weights (imatrix-weighted with importance)."""
    rng = fitted_range(w, spec, importance) if spec.grid == "ggml_k" else compute_range(w, spec)
    return fake_quantize_forward(w, *choose_qparams(*rng, spec), spec)[0]


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K", "Q2_K"])
def test_grid_gptq_is_on_the_grid_and_beats_block_quantization(name):
    spec = _spec(name)
    x, w, gram = _problem()
    res = gptq_quantize(w, 2 * gram / x.shape[0], spec)
    again, _ = fake_quantize_forward(res.weight, res.scale, res.zero_point, spec)
    assert torch.equal(again, res.weight)  # the codes the GGUF blocks will hold
    plain = _err(w, _plain(w, spec), gram)
    imatrix = _err(w, _plain(w, spec, torch.diag(gram)), gram)
    assert _err(w, res.weight, gram) < 0.8 * min(plain, imatrix)


def test_k_quant_super_block_qparams_are_fitted_on_the_error_updated_weights():
    """The first super-block's qparams come from the original columns; later ones from updated columns
    (fitting them all on the original weight is what static groups do, and differs)."""
    spec = kquant_spec("Q4_K")
    x, w, gram = _problem()
    h = 2 * gram / x.shape[0]
    dynamic = gptq_quantize(w, h, spec, importance_fit=False)
    static = gptq_quantize(w, h, spec, static_groups=True, importance_fit=False)
    first, _ = choose_qparams(*compute_range(w[:, :256], spec), spec)
    assert torch.equal(dynamic.scale[:, :8], first)
    assert torch.equal(static.scale, choose_qparams(*compute_range(w, spec), spec)[0])
    assert not torch.equal(dynamic.scale[:, 8:], static.scale[:, 8:])


def test_actorder_with_dynamic_groups_is_refused_on_a_gguf_grid():
    x, w, gram = _problem()
    with pytest.raises(ValueError, match="static_groups=true"):
        gptq_quantize(w, gram, kquant_spec("Q4_K"), actorder=True)
    res = gptq_quantize(w, gram, kquant_spec("Q4_K"), actorder=True, static_groups=True)
    assert res.g_idx is None
    with pytest.raises(ValueError, match=r"(?s)blocks of this format \(ggml_k grid\).*static_groups=true"):
        ptq_model(tiny_llama(), "gguf_q4_k", "gptq", [torch.randint(0, 320, (4, 64))], progress=False,
                  actorder=True)


@pytest.mark.parametrize("recipe", ["gguf_q4_k", *[pytest.param(r, marks=pytest.mark.slow) for r in ("gguf_q4_0", "gguf_q6_k")]])
def test_gptq_on_gguf_grid_exports_with_zero_additional_error(recipe, tmp_path):
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    calib = [torch.randint(0, 320, (4, 64), generator=torch.Generator().manual_seed(2))]
    model = ptq_model(tiny_llama(), recipe, "gptq", calib, progress=False)
    ref = logits(model, ids)
    path = export_gguf(model, tmp_path / "m.gguf", "F32")  # quantized layers keep their grid's type
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.1.ffn_down.weight"] == recipe.removeprefix("gguf_").upper()
    assert torch.equal(logits(load_gguf(path), ids), ref)
