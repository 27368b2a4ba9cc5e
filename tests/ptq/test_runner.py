"""The block-by-block runner, calibration statistics, and PTQ-initialised QAT."""
from __future__ import annotations

import copy

import torch

import qat
from qat.ptq import InputStats, apply, ptq_model
from qat.ptq.methods.gptq import stages
from qat.ptq.runner import capture_inputs, find_blocks, quantized_linears

from .conftest import recipe


def test_input_stats_stream_equals_one_shot():
    x = torch.randn(300, 16)
    st = InputStats(16)
    for part in x.split(64):
        st.update(part)
    torch.testing.assert_close(st.hessian(), 2 * x.t() @ x / 300)
    torch.testing.assert_close(st.mean_abs(), x.abs().mean(0))
    assert torch.equal(st.abs_max, x.abs().amax(0))


def test_blocks_inputs_and_stages_of_a_llama(tiny_llama, llama_batches):
    model = qat.prepare(copy.deepcopy(tiny_llama), recipe(group_size=32))
    prefix, blocks = find_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 2
    inputs = capture_inputs(model, blocks, llama_batches)
    assert len(inputs) == 4 and inputs[0][0][0].shape == (2, 32, 64)
    assert "position_embeddings" in inputs[0][1]
    groups = stages(blocks[0], inputs, quantized_linears(blocks[0]), False)
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_every_linear_is_pinned_and_the_model_is_untouched_outside(tiny_llama, llama_batches):
    model = ptq_model(copy.deepcopy(tiny_llama), recipe(group_size=32), "gptq", llama_batches, progress=False)
    linears = quantized_linears(model)
    assert len(linears) == 14 and all(m.weight_quantizer.pinned for m in linears.values())
    assert torch.equal(model.lm_head.weight, tiny_llama.lm_head.weight)  # ignored by the recipe


def test_ptq_initialised_qat_trains_from_the_gptq_solution(tiny_llama, llama_batches):
    """apply() on a prepared model, then ordinary QAT steps: weights move, pinned grids are held."""
    model = qat.prepare(copy.deepcopy(tiny_llama), recipe(group_size=32))
    apply(model, {"name": "gptq", "actorder": True}, llama_batches, progress=False)
    q = model.model.layers[0].self_attn.q_proj
    scale, w0 = q.weight_quantizer.pinned_scale.clone(), q.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for batch in llama_batches[:2]:
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    assert not torch.equal(q.weight.detach(), w0)
    assert torch.equal(q.weight_quantizer.pinned_scale, scale)


def test_learned_scales_start_from_the_ptq_scales(tiny_llama, llama_batches):
    rec = recipe(group_size=32)
    rec["weight"]["learn"] = "lsq"
    model = ptq_model(copy.deepcopy(tiny_llama), rec, "gptq", llama_batches, progress=False, static_groups=True,
                      actorder=True)
    q = model.model.layers[1].mlp.down_proj
    assert q.weight_quantizer.learned
    fq = q.quantized_weight()
    assert torch.equal(fq, q.weight.detach())  # the learned scale reproduces the GPTQ weight at step 0
    model(llama_batches[0], labels=llama_batches[0]).loss.backward()
    assert q.weight_quantizer.scale.grad is not None
