"""The converted (real-integer) model computes exactly what the fake-quant model computed (atol=0)."""
import copy
import itertools

import pytest
import torch

import qat
from qat.modules import FakeQuantLinear, QuantizedLinear

GRANULARITIES = {"per_tensor": {}, "per_channel": {"axis": 0}, "per_group": {"group_size": 32}}
CASES = [
    pytest.param(bits, gran, sym, id=f"int{bits}-{gran}-{'sym' if sym else 'asym'}")
    for bits, gran, sym in itertools.product([2, 3, 4, 8], GRANULARITIES, [True, False])
]


def _check_parity(model, recipe, ids):
    qat.prepare(model, recipe)
    return _check_parity_prepared(model, ids)


@pytest.mark.parametrize("bits, granularity, symmetric", CASES)
def test_weight_parity(tiny_llama, token_ids, bits, granularity, symmetric):
    weight = {"bits": bits, "symmetric": symmetric, "granularity": granularity, **GRANULARITIES[granularity]}
    fake = _check_parity(tiny_llama, {"weight": weight, "ignore": ["lm_head"]}, token_ids)
    assert torch.isfinite(fake).all()


@pytest.mark.parametrize(
    "input_spec",
    [
        {"bits": 8, "granularity": "per_token"},
        {"bits": 4, "symmetric": False, "granularity": "per_token"},
        {"bits": 8, "dtype": "fp8_e4m3", "granularity": "per_token"},
        {"bits": 8, "granularity": "per_tensor", "learn": "pact"},
        {"bits": 8, "symmetric": False, "granularity": "per_tensor", "observer": "moving_average"},
    ],
    ids=["a8-token", "a4-token-asym", "fp8-token", "a8-static-pact", "a8-static-ema"],
)
def test_activation_parity(tiny_llama, token_ids, input_spec):
    recipe = {"weight": {"bits": 4, "granularity": "per_group", "group_size": 32}, "input": input_spec, "ignore": ["lm_head"]}
    qat.prepare(tiny_llama, recipe)
    qat.calibrate(tiny_llama, [token_ids])  # static ranges are held after this
    with torch.no_grad():
        fake = tiny_llama(token_ids).logits
    qat.convert(tiny_llama)
    with torch.no_grad():
        real = tiny_llama(token_ids).logits
    torch.testing.assert_close(real, fake, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_parity_in_model_dtype(tiny_llama, token_ids, dtype):
    tiny_llama.to(dtype)
    recipe = qat.load_recipe("w4a8_kv8")
    qat.prepare(tiny_llama, recipe)
    with torch.no_grad():
        fake = tiny_llama(token_ids).logits
    qat.convert(tiny_llama)
    with torch.no_grad():
        real = tiny_llama(token_ids).logits
    assert real.dtype == dtype
    torch.testing.assert_close(real, fake, atol=0, rtol=0)


def test_learned_scales_after_training_steps_keep_parity(tiny_llama, token_ids):
    qat.prepare(tiny_llama, qat.load_recipe("w2a16_g64"))
    opt = torch.optim.SGD(tiny_llama.parameters(), lr=1e-2)
    scales_before = [q.scale.detach().clone() for _, q in qat.quantizers(tiny_llama)]
    for _ in range(3):
        opt.zero_grad()
        tiny_llama(token_ids, labels=token_ids).loss.backward()
        opt.step()
    scales_after = [q.scale.detach() for _, q in qat.quantizers(tiny_llama)]
    assert any(not torch.equal(a, b) for a, b in zip(scales_before, scales_after))
    _ = _check_parity_prepared(tiny_llama, token_ids)


def _check_parity_prepared(model, ids):
    with torch.no_grad():
        fake = model(ids).logits
    qat.convert(model)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    with torch.no_grad():
        real = model(ids).logits
    torch.testing.assert_close(real, fake, atol=0, rtol=0)
    return real


def test_embedding_parity_and_to_float(tiny_llama, token_ids):
    reference = copy.deepcopy(tiny_llama)
    qat.prepare(tiny_llama, qat.load_recipe("w8_embed"))
    real = _check_parity_prepared(tiny_llama, token_ids)
    qat.to_float(tiny_llama)
    assert not any(hasattr(m, "qweight") for m in tiny_llama.modules())
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(token_ids).logits, real, atol=0, rtol=0)
        assert not torch.equal(reference(token_ids).logits, real)


def test_fake_quant_to_float_gives_back_the_float_model(tiny_llama, token_ids):
    with torch.no_grad():
        reference = tiny_llama(token_ids).logits
    qat.prepare(tiny_llama, qat.load_recipe("w4a16_g128_mixed"))
    qat.to_float(tiny_llama)
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(token_ids).logits, reference, atol=0, rtol=0)


def test_packed_storage_is_smaller(tiny_llama):
    qat.prepare(tiny_llama, qat.load_recipe("w4a16_g128"))
    qat.convert(tiny_llama)
    layer = tiny_llama.model.layers[0].mlp.down_proj
    assert layer.qweight.packed.dtype == torch.uint8
    assert layer.qweight.packed.numel() == layer.in_features * layer.out_features // 2  # two codes a byte
    rows = qat.summary(tiny_llama)
    assert all(abs(r["bits_per_weight"] - 4.25) < 1e-9 for r in rows)  # 4 bits + fp32 scale per 128
