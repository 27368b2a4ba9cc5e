"""The staged true-sequential GPTQ passes (`qat.ptq.staged`) give bit for bit the weights of the reference path
(one full block forward per stage), with far fewer linear calls."""
from __future__ import annotations

import pytest
import torch

from qat import testing
from qat.modules.fake import FakeQuantLinear
from qat.ptq import apply
from qat.transform import prepare
from qat.transform.recipe import load_recipe


def _batches(n=4, rows=2, seq=32, vocab=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (rows, seq), generator=g) for _ in range(n)]


def _quantized(state):
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and ("quantizer" in k or k.endswith("proj.weight"))}


def _counted(fn, counter):
    def counted(*args, **kwargs):
        counter.append(1)
        return fn(*args, **kwargs)
    return counted


def _run(recipe, stage_cache, counter=None, **opts):
    model = testing.tiny_llama(num_layers=2)
    prepare(model, load_recipe(recipe))
    if counter is not None:  # count the linears' forwards, hence matmuls (a replayed output skips the module's forward)
        for m in model.modules():
            if isinstance(m, FakeQuantLinear):
                m.forward = _counted(m.forward, counter)
    apply(model, {"name": "gptq", "min_tokens": 64, "stage_cache": stage_cache, **opts}, _batches(), progress=False)
    return model


@pytest.mark.parametrize("recipe,opts", [
    ("w4a16_g128_ragged", {}),
    ("w4a16_g128", {"actorder": True}),
    ("w4a8_kv8", {}),  # activation quantizers: the block outputs are recomputed, the stages still staged
], ids=["ragged", "actorder", "w4a8_kv8"])
def test_staged_gptq_equals_reference_path(recipe, opts):
    fast_calls, slow_calls = [], []
    fast = _run(recipe, True, fast_calls, **opts).state_dict()
    slow = _run(recipe, False, slow_calls, **opts).state_dict()
    assert fast.keys() == slow.keys()
    for k in _quantized(slow):
        assert torch.equal(fast[k], slow[k]), k
    assert len(fast_calls) * 2 < len(slow_calls)  # linear calls, hence matmuls: each runs about once


def test_staged_outputs_equal_plain_forward():
    """The logits of the quantized model are those of the reference path (the block outputs fed on are equal)."""
    ids = _batches(1, rows=1, seed=7)[0]
    fast, slow = (_run("w4a16_g128_ragged", s) for s in (True, False))
    assert torch.equal(fast(ids).logits, slow(ids).logits)
