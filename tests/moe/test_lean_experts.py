"""The memory-lean STE of fused experts (`FakeQuantExperts.lean`, `qat.set_lean_ste`): the same loss, weight
gradients and scale gradients as the unfused path (torch.equal) under every experts implementation, with
activation checkpointing too; and no fake-quantized copy of an expert weight saved for backward."""
from __future__ import annotations


import pytest
import torch

import qat
from qat import ste
from qat.jobs.measure import saved_for_backward_bytes
from qat.modules import FakeQuantExperts
from qat.modules import experts as experts_module
from qat.testing import tiny_moe

IMPLS = ("eager", "batched_mm", "grouped_mm")
RECIPES = {"ste": "w4a16_g128", "lsq": "w4a16_g128_lsq",
           "lsq_plus": {"name": "w4_g64_lsq_plus", "targets": ["Linear"], "ignore": ["lm_head"],
                        "weight": {"bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 64,
                                   "learn": "lsq_plus"}}}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batched_mm's weight gradient sums in a thread-dependent order
    yield
    torch.set_num_threads(threads)


def _prepared(impl: str, recipe: str, lean: bool, ckpt: bool = False):
    model = tiny_moe("qwen3_moe", num_experts=4, experts_implementation=impl).train()
    qat.prepare(model, recipe)
    assert qat.set_lean_ste(model, lean) == 4 * 2 + 2  # q, k, v, o and the experts of both layers
    if ckpt:  # as QATModule(gradient_checkpointing=True)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def _loss_and_grads(model, ids, ckpt: bool):
    calls = []
    hook = model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda *a: calls.append(1))
    loss = model(ids, labels=ids).loss
    loss.backward()
    hook.remove()
    assert len(calls) == 1 + ckpt  # checkpointing really recomputes (into) the experts in backward
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(RECIPES))
def test_lean_equals_unfused(impl, kind, moe_ids, one_thread):
    results = {}
    for lean in (False, True):
        for ckpt in (False, True):
            results[lean, ckpt] = _loss_and_grads(_prepared(impl, RECIPES[kind], lean, ckpt), moe_ids, ckpt)
    loss, grads = results[False, False]
    expert_grads = [n for n in grads if "experts." in n]
    assert any(n.endswith("gate_up_proj") for n in expert_grads)
    if kind != "ste":
        assert any(n.endswith("weight_quantizers.down_proj.scale") for n in expert_grads)
    if kind == "lsq_plus":
        assert any(n.endswith("weight_quantizers.down_proj.zero_point") for n in expert_grads)
    for key, (got_loss, got) in results.items():
        assert torch.equal(got_loss, loss), key
        assert got.keys() == grads.keys(), key
        for name in grads:
            assert torch.equal(got[name], grads[name]), (key, name)


def _saved_bytes(model, ids) -> int:
    """Bytes of distinct storages saved for backward in one forward (parameters excluded), as the benchmark."""
    return saved_for_backward_bytes(model, lambda: model(ids, labels=ids).loss)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["ste", "lsq"])
def test_lean_saves_no_fake_quantized_expert_weight(impl, kind, moe_ids):
    saved = {lean: _saved_bytes(_prepared(impl, RECIPES[kind], lean), moe_ids) for lean in (False, True)}
    model = _prepared(impl, RECIPES[kind], True)
    weights = sum(getattr(m, n).numel() * 4 for m in model.modules() if isinstance(m, FakeQuantExperts)
                  for n in m.weight_quantizers)
    # unfused: the STE's bool mask of every expert weight (1 byte an element), and for LSQ and for the kernels that
    # save the weight itself (eager, grouped_mm; batched_mm saves its own gathered copy) the fp32 x^ (4 bytes)
    expected = weights // 4 + (weights if kind == "lsq" or impl != "batched_mm" else 0)
    assert saved[False] - saved[True] >= expected, (saved, weights)
    # lean: what the float model saves plus the qparams (fp32, one per 128 weights here)
    fp = _saved_bytes(tiny_moe("qwen3_moe", num_experts=4, experts_implementation=impl).train(), moe_ids)
    assert fp <= saved[True] <= fp + weights / 32, (saved, fp, weights)


@pytest.mark.parametrize("impl", IMPLS)
def test_lean_equals_unfused_on_transposed_experts_with_biases(impl, moe_ids, one_thread):
    """GPT-OSS: experts stored [E, in, out] with biases; its rows view is a copy, which lean keeps (as the recipe's
    x) instead of x^ and the mask."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=512, hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["full_attention"])
    grads = {}
    for lean in (False, True):
        torch.manual_seed(0)
        model = GptOssForCausalLM(config).train()
        model.set_experts_implementation(impl)
        qat.prepare(model, "w4a16_g128_lsq")
        qat.set_lean_ste(model, lean)
        loss = model(moe_ids, labels=moe_ids).loss
        loss.backward()
        grads[lean] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(grads[True][0], grads[False][0])
    assert grads[True][1].keys() == grads[False][1].keys()
    assert "model.layers.0.mlp.experts.weight_quantizers.gate_up_proj.scale" in grads[True][1]
    for name, g in grads[False][1].items():
        assert torch.equal(grads[True][1][name], g), name


@pytest.fixture
def recipes(monkeypatch):
    """The `Requantized` recipes the experts' forwards create, in order."""
    made = []

    def recording(x, args):
        out, recipe = ste.lean_fake_quantize(x, args)
        made.append(recipe)
        return out, recipe

    monkeypatch.setattr(experts_module, "lean_fake_quantize", recording)
    return made


def _assert_released(recipes):
    assert recipes and all(r.value is None and r.mask is None for r in recipes)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("frozen", [True, False])
def test_lean_recomputes_each_expert_weight_once_per_backward(impl, frozen, moe_ids, one_thread, recipes):
    """Expert weights frozen (static scales: no STE backward runs) or trained: each fake-quantized expert weight is
    recomputed once per backward, however many slices of it the kernel saved (eager: one per expert with tokens),
    and released after its last use; the gradients equal the unfused path's."""
    grads = {}
    for lean in (False, True):
        model = _prepared(impl, "w4a16_g128", lean)
        for m in model.modules():
            if isinstance(m, FakeQuantExperts):
                m.gate_up_proj.requires_grad_(not frozen)
                m.down_proj.requires_grad_(not frozen)
        grads[lean] = _loss_and_grads(model, moe_ids, False)
    assert len(recipes) == 2 * 2  # gate_up_proj, down_proj of both layers, one forward
    assert [r.recomputations for r in recipes] == [1] * 4
    if impl == "eager":
        assert all(r.packs > 1 for r in recipes)  # a slice per expert with tokens
    _assert_released(recipes)
    assert torch.equal(grads[True][0], grads[False][0])
    assert grads[True][1].keys() == grads[False][1].keys()
    assert any("experts." in n for n in grads[True][1]) != frozen
    for name, g in grads[False][1].items():
        assert torch.equal(grads[True][1][name], g), name


def test_lean_recomputes_once_per_backward_with_retained_graph(moe_ids, recipes):
    model = _prepared("eager", "w4a16_g128", True)
    loss = model(moe_ids, labels=moe_ids).loss
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss.backward()
    assert [r.recomputations for r in recipes] == [2] * 4
    _assert_released(recipes)
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, first[n]), n


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_lean_partial_grad_holds_no_recomputed_weight(impl, moe_ids, recipes):
    """torch.autograd.grad for the embedding only: the kernels' nodes unpack the saved views but the STE's backward
    does not run; no recomputed weight (or mask) stays referenced while the loss (and its graph) lives."""
    model = _prepared(impl, "w4a16_g128_lsq", True)
    embed = model.get_input_embeddings().weight
    loss = model(moe_ids, labels=moe_ids).loss
    (got,) = torch.autograd.grad(loss, [embed], retain_graph=True)
    assert [r.recomputations for r in recipes] == [1] * 4
    _assert_released(recipes)
    unfused = _prepared(impl, "w4a16_g128_lsq", False)
    (want,) = torch.autograd.grad(unfused(moe_ids, labels=moe_ids).loss, [unfused.get_input_embeddings().weight])
    assert torch.equal(got, want)
    loss.backward()  # the retained graph: a full backward recomputes each once more
    assert [r.recomputations for r in recipes] == [2] * 4
    _assert_released(recipes)


@pytest.mark.parametrize("impl", IMPLS)
def test_lean_equals_unfused_under_bf16_autocast(impl, moe_ids, one_thread):
    """Under autocast the kernels save bf16 casts of the fake-quantized weights, not views of it: still equal
    gradients, and lean saves no more than the float model under autocast."""
    results = {}
    for lean in (False, True):
        model = _prepared(impl, "w4a16_g128_lsq", lean)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(moe_ids, labels=moe_ids).loss
        loss.backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            saved = _saved_bytes(_prepared(impl, "w4a16_g128_lsq", lean), moe_ids)
        results[lean] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, saved
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp = _saved_bytes(tiny_moe("qwen3_moe", num_experts=4, experts_implementation=impl).train(), moe_ids)
    assert torch.equal(results[True][0], results[False][0])
    for name, g in results[False][1].items():
        assert torch.equal(results[True][1][name], g), name
    assert results[True][2] <= fp < results[False][2], (results[True][2], fp, results[False][2])
