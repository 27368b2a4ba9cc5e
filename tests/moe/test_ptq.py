"""PTQ on tiny MoE models: RTN / GPTQ / AWQ see every expert, GPTQ solves each expert on the tokens routed to it
(or all tokens), an expert with too few tokens falls back to RTN with a warning naming it, never NaN scales."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import qat
from qat.ptq import apply
from qat.ptq.experts import block_experts, count_expert_tokens
from qat.testing import tiny_moe

N_TOKENS, TOP_K = 4 * 32, 2


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 512, (2, 32), generator=g) for _ in range(2)]


def _prepared(family="qwen3_moe"):
    return qat.prepare(tiny_moe(family, num_experts=8), "w4a16_g128")


def _scales_ok(model):
    for name, experts in block_experts(model).items():
        for w, q in experts.weight_quantizers.items():
            assert q.pinned and torch.isfinite(q.pinned_scale).all() and (q.pinned_scale > 0).all(), f"{name}.{w}"


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_methods_pin_every_expert_and_convert_exactly(family, method, batches):
    model = _prepared(family)
    apply(model, {"name": method, "min_tokens": 64}, batches, progress=False)
    _scales_ok(model)
    ids = batches[0]
    fake = model(ids).logits
    assert torch.isfinite(fake).all()
    assert torch.equal(qat.convert(copy.deepcopy(model))(ids).logits, fake)


def _expert_error(model, ref_model, batches):
    """Squared error of every MoE block's output vs the float model's on the calibration data."""
    with torch.no_grad():
        return sum((model(b).logits - ref_model(b).logits).pow(2).mean().item() for b in batches)


def test_gptq_records_tokens_per_expert_and_beats_rtn(batches):
    ref = tiny_moe("qwen3_moe", num_experts=8)
    gptq = apply(_prepared(), {"name": "gptq", "min_tokens": 64, "min_expert_tokens": 1}, batches, progress=False)
    tokens = gptq.qat_ptq["expert_tokens"]
    assert set(tokens) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert all(sum(t) == N_TOKENS * TOP_K and len(t) == 8 for t in tokens.values())
    counted = count_expert_tokens(block_experts(gptq), lambda: [gptq(b) for b in batches])
    assert counted["model.layers.0.mlp.experts"] == tokens["model.layers.0.mlp.experts"]  # the first block's inputs
    rtn = apply(_prepared(), "rtn", batches, progress=False)
    assert _expert_error(gptq, ref, batches) < _expert_error(rtn, ref, batches)


def test_route_all_gives_every_expert_every_token(batches):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RTN fallback warning
        model = apply(_prepared(), {"name": "gptq", "min_tokens": 64, "route_all_experts": True,
                                    "min_expert_tokens": N_TOKENS}, batches, progress=False)
    assert all(t == [N_TOKENS] * 8 for t in model.qat_ptq["expert_tokens"].values())
    _scales_ok(model)


def test_expert_with_too_few_tokens_falls_back_to_rtn_with_a_warning(batches):
    model = _prepared()
    before = {n: m.gate_up_proj.detach().clone() for n, m in block_experts(model).items()}
    with pytest.warns(RuntimeWarning, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj: expert\(s\) 0 \(\d+ tokens\), "
                                            r"1 \(\d+ tokens\).* fewer than min_expert_tokens=100000"):
        apply(model, {"name": "gptq", "min_tokens": 64, "min_expert_tokens": 100000}, batches, progress=False)
    _scales_ok(model)
    rtn = apply(_prepared(), "rtn", batches, progress=False)
    for n, m in block_experts(model).items():  # every expert fell back: RTN weights and qparams exactly
        assert torch.equal(m.gate_up_proj, before[n])
        other = block_experts(rtn)[n]
        for w in ("gate_up_proj", "down_proj"):
            assert torch.equal(m.weight_quantizers[w].pinned_scale, other.weight_quantizers[w].pinned_scale)


def test_gptq_refuses_dynamic_actorder_on_experts(batches):
    with pytest.raises(ValueError, match=r"mlp\.experts\.gate_up_proj: actorder with dynamic groups .* static_groups=true"):
        apply(_prepared(), {"name": "gptq", "actorder": True, "min_tokens": 64}, batches, progress=False)


def _starve_expert(model, expert: int = 0):
    """Route no token to `expert` in any layer (a forward hook on every router)."""
    def hook(module, args, out):
        logits, scores, index = out
        return logits, scores, torch.where(index == expert, (expert + 1) % 8, index)
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(hook)
    return model


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_awq_scales_every_expert_and_beats_rtn(family, batches, caplog):
    ref = tiny_moe(family, num_experts=8)
    model = _prepared(family)
    before = {n: (m.gate_up_proj.detach().clone(), m.down_proj.detach().clone()) for n, m in block_experts(model).items()}
    with caplog.at_level("DEBUG", logger="qat.ptq.awq_experts"):
        apply(model, {"name": "awq", "min_tokens": 64, "min_expert_tokens": 1}, batches, progress=False)
    _scales_ok(model)
    searched = [r.getMessage() for r in caplog.records]
    n_layers = len(block_experts(model))
    # the shared norm -> experts scale of every layer and the up -> down scale of every expert were searched
    assert sum("mlp.experts norm -> experts" in s for s in searched) == n_layers
    assert sum(f"mlp.experts expert {e} up -> down" in s for s in searched for e in range(8)) == 8 * n_layers
    for n, m in block_experts(model).items():
        gate_up, down = before[n]
        assert not torch.equal(m.gate_up_proj, gate_up) and not torch.equal(m.down_proj, down)  # scales folded
    # the float function is unchanged by the folds, the quantized one is closer to it than RTN's
    with qat.quantization_disabled(model), torch.no_grad():
        assert torch.allclose(model(batches[0]).logits, ref(batches[0]).logits, atol=1e-4)
    rtn = apply(_prepared(family), "rtn", batches, progress=False)
    assert _expert_error(model, ref, batches) < _expert_error(rtn, ref, batches)


def test_awq_with_an_expert_that_saw_no_token_stays_finite(batches):
    ref = _starve_expert(tiny_moe("qwen3_moe", num_experts=8))
    model = _starve_expert(_prepared())
    counted = count_expert_tokens(block_experts(model), lambda: [model(b) for b in batches])
    assert all(t[0] == 0 for t in counted.values())
    with pytest.warns(RuntimeWarning, match=r"mlp\.experts\.gate_up_proj: expert\(s\) 0 \(0 tokens\) received fewer"):
        apply(model, {"name": "awq", "min_tokens": 64}, batches, progress=False)
    _scales_ok(model)
    for m in block_experts(model).values():
        assert torch.isfinite(m.gate_up_proj).all() and torch.isfinite(m.down_proj).all()
    rtn = apply(_starve_expert(_prepared()), "rtn", batches, progress=False)
    assert torch.isfinite(model(batches[0]).logits).all()
    assert _expert_error(model, ref, batches) < _expert_error(rtn, ref, batches)
