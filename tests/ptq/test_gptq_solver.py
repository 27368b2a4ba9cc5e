"""GPTQ solver internals: group qparams are fitted on the fully error-updated weights, whatever the lazy
block size (a group that straddles a lazy block must still see the updates of the block's columns)."""
from __future__ import annotations

import pytest
import torch

import qat.ptq.gptq as gptq_mod
from qat.ptq import gptq_quantize
from qat.spec import QuantSpec

from .conftest import correlated_inputs


def _fitted_groups(monkeypatch, w, h, spec, blocksize):
    seen = []
    real = gptq_mod.fit_qparams

    def record(ahead, *args, **kwargs):
        seen.append(ahead.clone())
        return real(ahead, *args, **kwargs)

    monkeypatch.setattr(gptq_mod, "fit_qparams", record)
    gptq_quantize(w, h, spec, blocksize=blocksize)
    return seen


@pytest.mark.parametrize("blocksize", [48, 40])
def test_group_straddling_a_lazy_block_is_fitted_on_updated_weights(monkeypatch, blocksize):
    x = correlated_inputs(1024, 128, seed=1)
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(7))
    h = 2 * x.t() @ x / x.shape[0]
    spec = QuantSpec(bits=4, granularity="per_group", group_size=32)
    whole = _fitted_groups(monkeypatch, w, h, spec, blocksize=128)  # one lazy block: nothing pending
    lazy = _fitted_groups(monkeypatch, w, h, spec, blocksize=blocksize)
    # group 1 (columns 32..63) straddles the first lazy block; before it, both solves did the same work
    assert torch.allclose(lazy[1], whole[1], rtol=0, atol=1e-4 * float(w.abs().max()))
    assert not torch.allclose(lazy[1], w[:, 32:64])
