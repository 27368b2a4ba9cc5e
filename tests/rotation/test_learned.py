"""Learned rotations: the Cayley SGD keeps rotations orthogonal and descends; attached rotations start at the
model's function, train jointly with QAT (gradients reach R through the fake-quantized weights), and fuse exactly."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import parametrize

import qat
from qat.modules.hadamard import random_orthogonal
from qat.testing import tiny_llama, tiny_model
from qat.transform.rotations.learned import (CayleySGD, attach_learned_rotations, fuse_learned_rotations,
                                             learned_rotations_in, load_learned_rotations)

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


def _stiefel_sgd_step(x: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """The Cayley SGD step as SpinQuant's optimizer (after Li et al. 2020) writes it, momentum 0, from its
    formulas: the direction in the transposed frame, the step capped at 1 / ||W||_1, the Cayley transform by
    fixed-point iteration (run to convergence here)."""
    v = -grad.T
    mx = v @ x
    w_hat = mx - 0.5 * x.T @ (x @ mx)
    w = w_hat - w_hat.T
    alpha = min(lr, 1 / (float(w.abs().sum(0).max()) + 1e-8))
    y = x.T + alpha * v
    for _ in range(60):
        y = x.T + alpha * w @ (0.5 * (x.T + y))
    return y.T


@pytest.mark.parametrize("grad_scale", [0.01, 1.0, 100.0])  # uncapped, around the cap, far above it
@pytest.mark.parametrize("lr", [0.1, 1.5])
def test_cayley_sgd_step_is_the_reference_step(grad_scale, lr):
    x = random_orthogonal(24, seed=3).double()
    grad = torch.randn(24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * grad_scale
    p = torch.nn.Parameter(x.clone())
    p.grad = grad.clone()
    CayleySGD([p], lr=lr).step()
    assert torch.allclose(p.detach(), _stiefel_sgd_step(x, grad, lr), atol=1e-12, rtol=0)


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


def _ends_pair(recipe: dict):
    """The same float64 tiny Llama prepared with `recipe`, R1 / R2 attached (random orthogonal start) with the
    embedding / lm_head rotated online and, for reference, through their weights."""
    model = tiny_llama(vocab_size=512, hidden_size=64, intermediate_size=128, dtype=torch.float64)
    pair = []
    for online in (True, False):
        prepared = qat.prepare(copy.deepcopy(model), recipe)
        pair.append((prepared, attach_learned_rotations(prepared, init="random_orthogonal", online_ends=online)))
    return pair


def _stored_grads(model, rotations) -> dict[str, torch.Tensor]:
    """Gradients of the stored parameters but the rotations, by name without the parametrization's wrapping."""
    skip = {id(r) for r in rotations}
    return {n.replace("parametrizations.", "").replace(".original", ""): p.grad
            for n, p in model.named_parameters() if p.grad is not None and id(p) not in skip}


def test_online_ends_compute_the_weight_parametrized_function_and_gradients():
    """Unquantized embedding / lm_head: R1 on the looked-up rows and on lm_head's input (h R^T) gives the logits
    and every gradient (R1, R2, the stored weights, the quantizers' scales) of E @ R1, W_head @ R1: float64, 1e-10."""
    recipe = {"weight": {"bits": 4, "granularity": "per_channel", "learn": "lsq"}, "ignore": ["lm_head"],
              "input": {"bits": 8, "granularity": "per_token", "dynamic": True}}
    (online, rot_on), (weights, rot_w) = _ends_pair(recipe)
    embed, head = online.get_input_embeddings(), online.get_output_embeddings()
    assert not parametrize.is_parametrized(embed) and not parametrize.is_parametrized(head)
    assert parametrize.is_parametrized(weights.get_input_embeddings(), "weight")
    for model in (online, weights):
        model(input_ids=IDS, labels=IDS).loss.backward()
    torch.testing.assert_close(online(IDS).logits, weights(IDS).logits, atol=1e-10, rtol=1e-10)
    got, ref = _stored_grads(online, rot_on), _stored_grads(weights, rot_w)
    assert got.keys() == ref.keys() and "model.embed_tokens.weight" in got
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-10, rtol=1e-8, msg=name)
    for a, b in zip(rot_on, rot_w):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-8)


def test_online_ends_fuse_to_the_same_state_dict_and_round_trip():
    """Fusing the online ends gives the weight-parametrized fused state dict (names and values); a state dict
    taken while training loads into a fresh attach (resume) and a deepcopy carries its own R1."""
    recipe = {"weight": {"bits": 4, "granularity": "per_channel"}, "ignore": ["lm_head"]}
    (online, rot_on), (weights, rot_w) = _ends_pair(recipe)
    with torch.no_grad():
        for rotations in (rot_on, rot_w):  # as if trained: not the start
            rotations[0].copy_(random_orthogonal(64, seed=3))
    resumed = qat.prepare(tiny_llama(vocab_size=512, hidden_size=64, intermediate_size=128, dtype=torch.float64,
                                     seed=5), recipe)
    attach_learned_rotations(resumed)  # other weights, a Hadamard R1: all replaced by the state dict
    resumed.load_state_dict(online.state_dict())
    older = qat.prepare(tiny_llama(vocab_size=512, hidden_size=64, intermediate_size=128, dtype=torch.float64,
                                   seed=5), recipe)
    attach_learned_rotations(older)
    older.load_state_dict(weights.state_dict())  # a checkpoint of the weight-parametrized ends (before) resumes
    twin = copy.deepcopy(online)
    assert twin.get_input_embeddings().learned_rotation is not online.get_input_embeddings().learned_rotation
    with torch.no_grad():
        expect = online(IDS).logits
        torch.testing.assert_close(resumed(IDS).logits, expect, atol=1e-12, rtol=0)
        torch.testing.assert_close(twin(IDS).logits, expect, atol=1e-12, rtol=0)
        torch.testing.assert_close(older(IDS).logits, expect, atol=1e-10, rtol=0)
        for model in (online, weights):
            fuse_learned_rotations(model)
        torch.testing.assert_close(online(IDS).logits, expect, atol=1e-10, rtol=0)
    fused_on, fused_w = online.state_dict(), weights.state_dict()
    assert fused_on.keys() == fused_w.keys()
    assert not any("learned_rotation" in k or "parametrizations" in k for k in fused_on)
    for key in (k for k in fused_w if "quantizer" not in k):  # the weights (the observers saw other batches)
        torch.testing.assert_close(fused_on[key], fused_w[key], atol=1e-12, rtol=0, msg=key)
    for module in (online.get_input_embeddings(), online.get_output_embeddings()):
        assert not (module._forward_hooks or module._forward_pre_hooks or module._load_state_dict_pre_hooks)


def test_quantized_lm_head_keeps_the_weight_parametrization():
    """A recipe that quantizes lm_head: its weight quantizer must see W_head @ R1, so it stays parametrized."""
    (online, _), _ = _ends_pair({"weight": {"bits": 4, "granularity": "per_channel"}})
    assert parametrize.is_parametrized(online.get_output_embeddings(), "weight")
    assert not hasattr(online.get_output_embeddings(), "learned_rotation")


def test_learned_rotations_in_a_state_dict_are_named_and_load_fused():
    """Which of R1 / R2 a state dict was written with is read from its keys; `load_learned_rotations` into a fresh
    prepared model attaches those, loads and fuses: the fused source's function, to the bit."""
    recipe = {"weight": {"bits": 4, "granularity": "per_channel"}, "ignore": ["lm_head"]}
    fresh = lambda seed: qat.prepare(tiny_llama(vocab_size=512, hidden_size=64, intermediate_size=128, seed=seed), recipe)
    assert learned_rotations_in(fresh(0), fresh(0).state_dict()) is None
    for r1, r2 in ((True, True), (True, False), (False, True)):
        source = fresh(1)
        rotations = attach_learned_rotations(source, r1=r1, r2=r2)
        with torch.no_grad():
            for rotation in rotations:  # as if trained: not the start
                rotation.copy_(random_orthogonal(rotation.shape[0], seed=3))
        state = copy.deepcopy(source.state_dict())
        assert learned_rotations_in(fresh(2), state) == {"r1": r1, "r2": r2}
        target = fresh(2)
        assert load_learned_rotations(target, state) == ([], [])
        fuse_learned_rotations(source)
        assert target.state_dict().keys() == source.state_dict().keys()
        with torch.no_grad():
            assert torch.equal(target(IDS).logits, source(IDS).logits)


def test_prepare_after_attached_rotations_is_refused():
    """Learned rotations go on a prepared model: preparing after them would drop lm_head's online R1 silently."""
    import pytest

    from qat.errors import ConfigError
    from qat.lit.module import learned_rotation_errors

    model = tiny_llama(vocab_size=512, hidden_size=64, intermediate_size=128)
    attach_learned_rotations(model)
    with pytest.raises(ConfigError, match="call qat.prepare first"):
        qat.prepare(model, "w8a8")
    fuse_learned_rotations(model)
    qat.prepare(model, "w8a8")  # fused: plain weights again
    assert learned_rotation_errors(True, "module.learned_rotations")[0].startswith("module.learned_rotations=True")


def test_ptq_on_a_model_with_learned_rotations_attached_is_refused():
    """PTQ writes solved weights, but a rotated weight is W @ R computed at every access: the solve was dropped
    without a word (the stored W unchanged, the pinned qparams those of the solved weights); now refused."""
    import pytest

    from qat.errors import ConfigError
    from qat.ptq import apply

    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("w4a16_g128"))
    attach_learned_rotations(model)
    with pytest.raises(ConfigError, match=r"gptq: the model has learned rotations attached"):
        apply(model, "gptq", [torch.randint(0, 256, (4, 32))], progress=False)


def test_model_size_with_learned_rotations_attached_counts_each_weight_once():
    """qat-train's starting row measures the model with the rotations attached: a rotated weight is W @ R, and its
    stored W was counted as a float parameter beside its quantized bits (twice the model's size); now the stored W
    is the quantized weight, and only the rotation matrices add float parameters until they are fused."""
    from qat.jobs.measure import FLOAT_BITS, bits_per_weight, weight_bits

    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("w4a16_g128"))
    (q_bits, _), (bpw, mb) = bits_per_weight(model), weight_bits(model)
    rotations = attach_learned_rotations(model)
    extra = sum(r.numel() for r in rotations)
    assert bits_per_weight(model)[0] == q_bits and weight_bits(model)[0] == bpw
    assert abs(weight_bits(model)[1] - (mb + extra * FLOAT_BITS / 8 / 1e6)) < 1e-9
    fuse_learned_rotations(model)
    assert weight_bits(model) == (bpw, mb)


def test_a_bad_start_is_refused_before_any_weight_changes():
    """init names a kind per rotation ("identity" or a `rotation_matrix` kind); a partial or misspelt mapping is a
    ConfigError naming the key, raised before the norms are folded (was: KeyError 'r2' with R1 already attached)."""
    from qat.errors import ConfigError
    from qat.transform.rotations.learned import has_learned_rotations, resolve_init

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for init, match in (({"r1": "identity"}, r"init\['r2'\] missing"), ({"R1": "hadamard", "r2": "hadamard"},
                        r"unknown key\(s\) \['R1'\]"), ("eye", r"init\['r1'\]='eye'; choose one of \['identity'")):
        with pytest.raises(ConfigError, match=match):
            attach_learned_rotations(model, init=init)
    assert not has_learned_rotations(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert attach_learned_rotations(tiny_llama(), r2=False, init={"r1": "identity"})  # only the rotations attached
    recipe = qat.load_recipe("w4a4_kv4_rot").rotations  # the validated RotationConfig as well as its mapping
    assert resolve_init("auto", recipe) == resolve_init("auto", recipe.to_dict()) == {"r1": "identity", "r2": "identity"}
