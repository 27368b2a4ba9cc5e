"""Learned rotations: the Cayley SGD keeps rotations orthogonal and descends; attached rotations start at the
model's function, train jointly with QAT (gradients reach R through the fake-quantized weights), and fuse exactly."""
from __future__ import annotations

import copy

import torch

import qat
from qat.modules.hadamard import random_orthogonal
from qat.testing import tiny_model
from qat.transform.rotations.learned import CayleySGD, attach_learned_rotations, fuse_learned_rotations

IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))


def test_cayley_sgd_stays_orthogonal_and_descends():
    target, x = random_orthogonal(16, seed=1), torch.randn(64, 16, dtype=torch.float64)
    r = torch.nn.Parameter(torch.eye(16, dtype=torch.float64))
    opt = CayleySGD([r], lr=0.2, momentum=0.5)
    losses = []
    for _ in range(60):
        loss = ((x @ r - x @ target) ** 2).mean()
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.2 * losses[0]
    assert torch.allclose(r.detach() @ r.detach().T, torch.eye(16, dtype=torch.float64), atol=1e-10)


def test_learned_rotations_train_with_qat_and_fuse_exactly():
    model = tiny_model("qwen2", num_layers=2, vector_noise=0.1)
    with torch.no_grad():
        ref = model(IDS).logits
    float_copy = copy.deepcopy(model)
    attach_learned_rotations(float_copy)
    with torch.no_grad():
        assert torch.allclose(float_copy(IDS).logits, ref, atol=1e-4)  # a Hadamard start keeps the function
    prepared = qat.prepare(model, {"weight": {"bits": 4, "granularity": "per_channel"}, "ignore": ["lm_head"],
                                   "input": {"bits": 8, "granularity": "per_token", "dynamic": True}})
    rotations = attach_learned_rotations(prepared)
    assert len(rotations) == 1 + 2  # R1 and one R2 per layer
    ids_r = {id(p) for p in rotations}
    opt_w = torch.optim.AdamW([p for p in prepared.parameters() if id(p) not in ids_r], lr=1e-4)
    opt_r = CayleySGD(rotations, lr=0.5)
    before = [r.detach().clone() for r in rotations]
    for _ in range(2):
        loss = prepared(input_ids=IDS, labels=IDS).loss
        loss.backward()
        assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in rotations)
        opt_w.step(), opt_r.step()
        opt_w.zero_grad(), opt_r.zero_grad()
    assert not torch.equal(before[0], rotations[0].detach())
    eye = torch.eye(rotations[0].shape[0])
    assert torch.allclose(rotations[0].detach() @ rotations[0].detach().T, eye, atol=1e-5)
    with torch.no_grad():
        trained = prepared(IDS).logits
        fuse_learned_rotations(prepared)
        assert torch.allclose(prepared(IDS).logits, trained, atol=1e-5)
    assert not any("parametrizations" in k for k in prepared.state_dict())
    assert torch.allclose(qat.convert(prepared)(IDS).logits, trained, atol=1e-5)
