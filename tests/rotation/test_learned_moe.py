"""Learned rotations on fused-expert MoE models (Qwen3-MoE, Mixtral, OLMoE): R1 acts on the experts as the
offline R1 does (gate_up_proj's input side, down_proj's output side, per expert; the router's input), so a float
model keeps its logits, a QAT step moves R1 through the fake-quantized experts, and fusing keeps the function."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import parametrize

import qat
from qat.testing import MOE_FAMILIES, tiny_moe
from qat.transform.rotations.learned import (CayleySGD, attach_learned_rotations, fuse_learned_rotations,
                                             load_learned_rotations)

IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
W4 = {"weight": {"bits": 4, "granularity": "per_channel"}, "ignore": ["lm_head"]}


def _moe(family, dtype=torch.float64, implementation="eager"):
    """float64 with the eager experts loop (grouped_mm has no float64 kernel): float tolerance is tight."""
    return tiny_moe(family, hidden_size=64, expert_size=32, num_experts=4, num_layers=2,
                    experts_implementation=implementation, dtype=dtype)


def _r1_readers_and_writers(model, r1):
    """Every block's router, experts' gate_up_proj and down_proj read R1 through a parametrization."""
    for layer in model.model.layers:
        mlp = layer.mlp
        for module, name in ((mlp.gate, "weight"), (mlp.experts, "gate_up_proj"), (mlp.experts, "down_proj")):
            assert parametrize.is_parametrized(module, name), (type(module).__name__, name)
            assert getattr(module.parametrizations, name)[0].rotation.weight is r1


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("init", ["identity", "hadamard", "random_orthogonal"])
def test_learned_rotations_keep_the_float_moe_logits(family, init):
    model = _moe(family)
    with torch.no_grad():
        ref = model(IDS).logits
    rotations = attach_learned_rotations(model, init="hadamard" if init == "identity" else init)
    if init == "identity":  # only the norms folded into the router, experts and attention
        with torch.no_grad():
            for r in rotations:
                r.copy_(torch.eye(r.shape[0], dtype=r.dtype))
    _r1_readers_and_writers(model, rotations[0])
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_learned_rotations_train_through_fake_quant_experts_and_fuse_exactly(family):
    """Prepared (W4 experts, and for Mixtral an 8-bit router too): one step moves R1 (its gradient reaches it
    through the fake-quantized expert weights), R1 stays orthogonal; fused == unfused logits; convert agrees."""
    recipe = copy.deepcopy(W4)
    if family == "mixtral":
        recipe |= {"targets": ["Linear", "mlp.gate"],
                   "overrides": [{"targets": ["mlp.gate"], "weight": {"bits": 8, "granularity": "per_channel"}}]}
    prepared = qat.prepare(_moe(family), recipe)
    experts = prepared.model.layers[0].mlp.experts
    assert type(experts).__name__ == "FakeQuantExperts"
    assert (type(prepared.model.layers[0].mlp.gate).__name__ == "FakeQuantRouter") == (family == "mixtral")
    plain_keys = set(prepared.state_dict())
    rotations = attach_learned_rotations(prepared, init="random_orthogonal")
    _r1_readers_and_writers(prepared, rotations[0])
    ids_r = {id(p) for p in rotations}
    opt_w = torch.optim.AdamW([p for p in prepared.parameters() if id(p) not in ids_r], lr=1e-4)
    opt_r = CayleySGD(rotations, lr=0.5)
    before = rotations[0].detach().clone()
    prepared(input_ids=IDS, labels=IDS).loss.backward()
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in rotations)
    assert experts.parametrizations.gate_up_proj.original.grad.abs().sum() > 0  # the float expert weights train
    opt_w.step(), opt_r.step()
    r1 = rotations[0].detach()
    assert not torch.equal(before, r1)
    torch.testing.assert_close(r1 @ r1.T, torch.eye(r1.shape[0], dtype=r1.dtype), atol=1e-12, rtol=0)
    with torch.no_grad():
        trained = prepared(IDS).logits
        fuse_learned_rotations(prepared)
        torch.testing.assert_close(prepared(IDS).logits, trained, atol=1e-10, rtol=0)
    assert set(prepared.state_dict()) == plain_keys  # the usual names again: export as usual
    with torch.no_grad():
        torch.testing.assert_close(qat.convert(prepared)(IDS).logits, trained, atol=1e-10, rtol=0)


def test_learned_rotations_on_the_default_experts_kernel_in_float32():
    """transformers' default experts implementation (grouped_mm, float32) with the lean STE: the same path."""
    model = _moe("qwen3_moe", torch.float32, None)
    with torch.no_grad():
        ref = model(IDS).logits
    prepared = qat.prepare(model, W4)
    rotations = attach_learned_rotations(prepared)  # a Hadamard start: the float function, quantizers off
    with torch.no_grad(), qat.quantization_disabled(prepared):
        torch.testing.assert_close(prepared(IDS).logits, ref, atol=1e-4, rtol=0)
    prepared(input_ids=IDS, labels=IDS).loss.backward()
    assert rotations[0].grad.abs().sum() > 0
    with torch.no_grad():
        unfused = prepared(IDS).logits
        fuse_learned_rotations(prepared)
        torch.testing.assert_close(prepared(IDS).logits, unfused, atol=1e-5, rtol=0)
    assert not torch.equal(unfused, ref)  # quantized: not the float model


def test_a_moe_checkpoint_with_learned_rotations_loads_fused():
    """A state dict taken while training (rotations unfused on the experts) loads into a fresh prepared MoE:
    `load_learned_rotations` attaches, loads and fuses; the source's fused function, to the bit."""
    source = qat.prepare(_moe("qwen3_moe"), W4)
    rotations = attach_learned_rotations(source)
    with torch.no_grad():
        for i, r in enumerate(rotations):  # as if trained: not the start
            r.copy_(torch.linalg.qr(torch.randn(r.shape, dtype=r.dtype, generator=torch.Generator().manual_seed(i)))[0])
    state = copy.deepcopy(source.state_dict())
    assert any(".experts.parametrizations.gate_up_proj.original" in k for k in state)
    target = qat.prepare(tiny_moe("qwen3_moe", hidden_size=64, expert_size=32, num_experts=4, num_layers=2,
                                  experts_implementation="eager", dtype=torch.float64, seed=5), W4)
    assert load_learned_rotations(target, state) == ([], [])
    fuse_learned_rotations(source)
    with torch.no_grad():
        assert torch.equal(target(IDS).logits, source(IDS).logits)


def test_each_rotated_expert_and_router_weight_is_computed_once_per_forward(monkeypatch):
    """W @ R of a fused expert weight is an [E, 2I, H] x [H, H] product: the fake-quant experts and router take it
    once per forward (was: twice, the float value computed and dropped for the quantized one), on the lean
    path, without grad, and with the quantizers off (the float function then)."""
    import contextlib

    from qat.transform.rotations import learned

    model = _moe("mixtral")
    with torch.no_grad():
        ref = model(IDS).logits
    prepared = qat.prepare(model, copy.deepcopy(W4) | {"targets": ["Linear", "mlp.gate"]})
    attach_learned_rotations(prepared)
    layer = prepared.model.layers[0].mlp
    assert type(layer.gate).__name__ == "ParametrizedFakeQuantRouter"  # quantized, its weight rotated
    watched = {tuple(layer.experts.shapes["gate_up_proj"]), tuple(layer.experts.shapes["down_proj"]),
               tuple(layer.gate.weight.shape)}
    shapes = []
    for cls in (learned._In, learned._Out):
        monkeypatch.setattr(cls, "forward", lambda self, w, _f=cls.forward: shapes.append(tuple(w.shape)) or _f(self, w))
    for grad, quantize in ((True, True), (False, True), (True, False)):
        shapes.clear()
        off = contextlib.nullcontext() if quantize else qat.quantization_disabled(prepared)
        with torch.set_grad_enabled(grad), off:
            out = prepared(IDS).logits
        for shape in watched:
            assert shapes.count(shape) == len(prepared.model.layers), (grad, quantize, shape, shapes)
        if not quantize:
            torch.testing.assert_close(out.detach(), ref, atol=1e-6, rtol=1e-6)
            out.sum().backward()
            assert layer.experts.parametrizations.down_proj.original.grad.abs().sum() > 0
