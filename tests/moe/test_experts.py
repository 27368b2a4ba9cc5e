"""FakeQuantExperts / QuantizedExperts on tiny Qwen3-MoE, Mixtral and OLMoE models: what prepare selects,
parity of convert (atol=0) under every experts implementation, gradients, a QAT step, the float round trip."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import qat
from qat.control import weight_bits
from qat.modules import FakeQuantExperts, QuantizedExperts
from qat.spec import QuantSpec, TensorSchemes
from qat.testing import MOE_FAMILIES, tiny_moe

IMPLS = ("eager", "batched_mm", "grouped_mm")


def _router_embed_norm_lm_head(model) -> int:
    skip = 0
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight") or "embed_tokens" in name or name.startswith("lm_head") or "norm" in name:
            skip += p.numel()
    return skip


def test_w4a16_quantizes_all_but_router_embeddings_lm_head_norms():
    model = tiny_moe("qwen3_moe", num_experts=8)
    total = sum(p.numel() for p in model.parameters())
    attention = sum(p.numel() for n, p in model.named_parameters() if "self_attn" in n and n.endswith("proj.weight"))
    assert attention / total < 0.12  # what w4a16_g128 quantized before fused experts were supported
    qat.prepare(model, "w4a16_g128")
    bits, n = weight_bits(model)
    assert n == total - _router_embed_norm_lm_head(model)
    assert n / total > 0.85 and bits == pytest.approx(4.25)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, FakeQuantExperts) and set(experts.weight_quantizers) == {"gate_up_proj", "down_proj"}
    assert type(model.model.layers[0].mlp.gate).__name__ == "Qwen3MoeTopKRouter"  # the router stays float
    rows = {r["module"]: r for r in qat.summary(model)}
    assert rows["model.layers.0.mlp.experts"]["type"] == "FakeQuantExperts"
    assert 10 < rows["model.layers.0.mlp.experts"]["sqnr_db"] < 40


def test_experts_pattern_selects_only_experts():
    model = tiny_moe("mixtral", num_experts=4)
    qat.prepare(model, {"name": "experts_only", "targets": ["Experts"], "weight": {"bits": 4, "granularity": "per_channel"}})
    kinds = {type(m).__name__ for m in model.modules() if hasattr(m, "schemes")}
    assert kinds == {"FakeQuantExperts"}
    by_name = qat.prepare(tiny_moe("olmoe", num_experts=4), {"name": "by_name", "targets": ["mlp.experts"],
                                                             "weight": {"bits": 4, "granularity": "per_channel"}})
    assert sorted(n for n, m in by_name.named_modules() if hasattr(m, "schemes")) == [
        "model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("impl", IMPLS)
def test_convert_equals_fake_quant(family, impl, moe_ids):
    model = tiny_moe(family, num_experts=4, experts_implementation=impl)
    ref = model(moe_ids).logits
    qat.prepare(model, "w4a16_g128")
    fake = model(moe_ids).logits
    assert (fake - ref).abs().max() > 1e-3  # the experts really are quantized
    qat.convert(model)
    assert isinstance(model.model.layers[1].mlp.experts, QuantizedExperts)
    assert torch.equal(model(moe_ids).logits, fake)


SPECS = {
    "int4_g32_asym": QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=32),
    "int8_channel": QuantSpec(bits=8, granularity="per_channel"),
    "fp8_per_expert": QuantSpec(bits=8, dtype="fp8_e4m3", granularity="per_tensor"),
    "q4_k": QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=32, grid="ggml_k", scale_dtype="fp16"),
}


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_formats_per_expert_parity(spec, moe_ids):
    model = tiny_moe("qwen3_moe", num_experts=4, hidden_size=256, expert_size=256)
    schemes = TensorSchemes(weight=spec)
    experts = model.model.layers[0].mlp.experts
    fake = FakeQuantExperts.from_float(experts, schemes, "experts")
    w = experts.down_proj.detach()
    q = fake.quantized("down_proj").detach()
    for e in range(w.shape[0]):  # one scale set per expert: expert e alone quantizes to the same values
        alone = qat.prepare(torch.nn.Sequential(torch.nn.Linear(w.shape[2], w.shape[1], bias=False)),
                            {"name": "x", "targets": ["Linear"], "weight": spec.to_dict()})[0]
        alone.weight.data.copy_(w[e])
        if spec.granularity == "per_tensor":
            continue  # a Linear's per_tensor is the same grid with its own single scale: checked below
        assert torch.equal(alone.quantized_weight().detach(), q[e])
    if spec.granularity == "per_tensor":
        amax = w.abs().flatten(1).amax(1)
        assert torch.equal(fake.weight_quantizers["down_proj"].qparams(fake.rows("down_proj"))[0].flatten(),
                           (amax / 448.0).float())
    h = torch.randn(10, 256)
    idx = torch.randint(0, 4, (10, 2))
    wts = torch.rand(10, 2)
    assert torch.equal(QuantizedExperts.from_fake(fake)(h, idx, wts), fake(h, idx, wts))


def test_ste_and_lsq_gradients_reach_float_weights_and_scales(moe_ids):
    model = tiny_moe("olmoe", num_experts=4)
    qat.prepare(model, "w4a16_g128_lsq")
    model(moe_ids, labels=moe_ids).loss.backward()
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.grad is not None and experts.gate_up_proj.grad.abs().sum() > 0
    scale = experts.weight_quantizers["down_proj"].scale
    assert scale.grad is not None and scale.grad.abs().sum() > 0


def test_qat_step_lowers_the_loss(moe_ids):
    torch.manual_seed(0)
    model = tiny_moe("qwen3_moe", num_experts=4).train()
    qat.prepare(model, "w4a16_g128")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        loss = model(moe_ids, labels=moe_ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_to_float_deepcopy_pickle_and_switching_implementation(moe_ids):
    model = tiny_moe("qwen3_moe", num_experts=4, experts_implementation="eager")  # equal only within one kernel
    ref = model(moe_ids).logits
    qat.prepare(model, "w4a16_g128")
    fake = model(moe_ids).logits
    assert torch.equal(copy.deepcopy(model)(moe_ids).logits, fake)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(moe_ids).logits, fake)
    model.set_experts_implementation("batched_mm")
    assert torch.allclose(model(moe_ids).logits, fake, atol=1e-5)
    model.set_experts_implementation("eager")
    qat.to_float(model)
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    assert torch.equal(model(moe_ids).logits, ref)


def test_input_schemes_on_experts_are_refused_with_the_way_out():
    model = tiny_moe("qwen3_moe", num_experts=4)
    with pytest.raises(ValueError, match=r"mlp.experts\): input \(activation\) quantization of fused experts"):
        qat.prepare(model, "w8a8")
    # the way the message offers works
    recipe = qat.load_recipe("w8a8").to_dict()
    recipe["overrides"] = [{"targets": ["Experts"], "input": None}]
    qat.prepare(model, recipe)
    assert model.model.layers[0].mlp.experts.schemes.input is None


def test_group_size_that_does_not_divide_names_the_expert_weight():
    model = tiny_moe("qwen3_moe", num_experts=4, expert_size=96)
    with pytest.raises(ValueError, match=r"mlp.experts.down_proj\): group_size=128 does not divide"):
        qat.prepare(model, "w4a16_g128")


def test_gpt_oss_transposed_experts_group_along_the_input_dim(moe_ids):
    """GPT-OSS stores experts transposed ([E, in, out], with biases): groups still run along the input dim."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=512, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).eval()
    qat.prepare(model, "w4a16_g128")
    experts = model.model.layers[0].mlp.experts
    assert experts.transposed and set(experts.weight_quantizers) == {"gate_up_proj", "down_proj"}
    w = experts.down_proj.detach()  # [E, I, H]: rows of the Linear are w[e].T
    lin = qat.prepare(torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[2], bias=False)), "w4a16_g128")[0]
    lin.weight.data.copy_(w[1].t())
    assert torch.equal(experts.quantized("down_proj").detach()[1], lin.quantized_weight().detach().t())
    fake = model(moe_ids).logits
    qat.convert(model)
    assert torch.equal(model(moe_ids).logits, fake)


def test_router_stays_float_unless_a_recipe_names_it(tmp_path, moe_ids):
    from qat.export.native import load_native, save_native
    from qat.modules import FakeQuantRouter, QuantizedRouter

    recipe = qat.load_recipe("w4a16_g128").to_dict()
    recipe["targets"] = ["Linear", "mlp.gate"]
    recipe["overrides"] = [{"targets": ["mlp.gate"], "weight": {"bits": 8, "granularity": "per_channel"}}]
    model = qat.prepare(tiny_moe("qwen3_moe", num_experts=4), recipe)
    router = model.model.layers[0].mlp.gate
    assert isinstance(router, FakeQuantRouter) and router.weight_quantizer.spec.bits == 8
    fake = model(moe_ids).logits
    save_native(model, tmp_path / "n")
    assert torch.equal(load_native(tmp_path / "n")(moe_ids).logits, fake)
    qat.convert(model)
    assert isinstance(model.model.layers[0].mlp.gate, QuantizedRouter)
    assert torch.equal(model(moe_ids).logits, fake)


@pytest.mark.parametrize("name", ["w4a16_g128", "w4a16_g128_lsq"])
def test_expert_gradients_equal_the_explicit_ste(name):
    """The experts' STE gradients (`torch.where` masking) equal, atol=0, the straight-through formula written
    out: grad of the fake-quantized weight times the inside mask, under every experts implementation."""
    from qat.primitives import fake_quantize_forward
    from qat.ste import learned_grads

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batched_mm's weight gradient sums in a thread-dependent order; the STE does not
    try:
        _check_expert_gradients(name, fake_quantize_forward, learned_grads)
    finally:
        torch.set_num_threads(threads)


def _check_expert_gradients(name, fake_quantize_forward, learned_grads):
    for impl in IMPLS:
        model = tiny_moe("qwen3_moe", num_experts=4, hidden_size=128, expert_size=128, experts_implementation=impl)
        fake = qat.prepare(model, name).model.layers[0].mlp.experts
        torch.manual_seed(0)
        h = torch.randn(12, 128, requires_grad=True)
        idx, wts, go = torch.randint(0, 4, (12, 2)), torch.rand(12, 2), torch.randn(12, 128)
        fake(h, idx, wts).backward(go)
        # the reference: the float experts on the fake-quantized weights as leaves, then the STE by hand
        hats, masks = {}, {}
        for wname, q in fake.weight_quantizers.items():
            scale, zero = q.qparams(fake.rows(wname))
            rows, mask = fake_quantize_forward(fake.rows(wname).detach(), scale.detach(), zero, q.spec, True)
            hats[wname] = rows.reshape(fake.shapes[wname]).requires_grad_()
            masks[wname] = mask.reshape(fake.shapes[wname])
        h_ref = h.detach().clone().requires_grad_()
        torch.func.functional_call(fake.float_template, hats, (h_ref, idx, wts), strict=False).backward(go)
        assert torch.equal(h.grad, h_ref.grad)
        for wname, q in fake.weight_quantizers.items():
            weight, g_hat = getattr(fake, wname), hats[wname].grad
            assert torch.equal(weight.grad, g_hat * masks[wname]), (impl, wname)
            if q.learned:  # LSQ: the scale gradient of the same formula
                rows = fake.rows(wname).detach()
                scale = q.qparams(rows)[0].detach()
                expected = learned_grads(g_hat.reshape(rows.shape), rows, hats[wname].detach().reshape(rows.shape),
                                         masks[wname].reshape(rows.shape), scale, False, q.spec, "lsq",
                                         qat.ste.lsq_grad_scale(rows, scale, q.spec))[1]
                assert torch.equal(q.scale.grad, expected), (impl, wname)


def test_model_size_counts_fused_experts_once():
    """qat-compare's size_mb / bits per weight: quantized experts count at their storage bits, not again as float
    (a 4-bit MoE came out larger than the float model)."""
    from qat.jobs.measure import bits_per_weight, weight_bits as size_bits

    model = tiny_moe("qwen3_moe", num_experts=8)
    float_mb = size_bits(model)[1]
    qat.prepare(model, "w4a16_g128")
    bits, n = weight_bits(model)
    rest = sum(p.numel() for p in model.parameters()) - n
    quant_bpw, mb = size_bits(model)
    assert quant_bpw == pytest.approx(4.25)
    assert mb == pytest.approx((bits * n + 16 * rest) / 8 / 1e6)
    assert mb < float_mb / 2
    assert bits_per_weight(model)[1] == pytest.approx((bits * n + 32 * rest) / (n + rest))  # float32 model
