"""The core API used as a library in a plain PyTorch loop: round trips and the surprises they found."""
import pytest
import torch
from torch import nn

import qat
from qat.testing import tiny_llama


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_to_float_after_kv_cache_prepare_restores_the_attention_implementation(token_ids, attn):
    # before: config._attn_implementation stayed "qat_kv" (a saved config could not be loaded without qat)
    model = tiny_llama(vocab_size=256)
    model.set_attn_implementation(attn)
    with torch.no_grad():
        ref = model(input_ids=token_ids).logits
    qat.to_float(qat.prepare(model, "w4a8_kv8"))
    assert model.config._attn_implementation == attn
    assert not any(hasattr(m, "qat_base_attention") or hasattr(m, "k_quantizer") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=token_ids).logits, ref)


def test_recipe_whose_targets_are_all_ignored_is_refused_naming_the_unsupported_layers():
    # before: GPT-2 (Conv1D blocks, lm_head the only nn.Linear and ignored) was "prepared" with nothing quantized
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(ValueError, match=r"selects no module to quantize: targets \['Linear'\] match only ignored "
                                         r"modules \['lm_head'\].*cannot quantize here: \['Conv1D'"):
        qat.prepare(model, "w4a16_g128")
    assert type(model.lm_head) is nn.Linear


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kv_cache_quantization_keeps_the_causal_and_padding_mask(token_ids, attn):
    # before: the "qat_kv" attention had no mask function, so transformers passed no mask at all: eager attention
    # attended to future tokens (logits off by ~0.9 with every quantizer disabled), sdpa ignored padding
    model = tiny_llama(vocab_size=256)
    model.set_attn_implementation(attn)
    mask = torch.ones_like(token_ids)
    mask[1, :5] = 0  # left padding in the second row
    with torch.no_grad():
        ref = model(input_ids=token_ids, attention_mask=mask).logits
    qat.prepare(model, {"targets": ["q_proj"], "weight": {"bits": 8}, "kv_cache": {"bits": 8, "granularity": "per_token"}})
    with qat.quantization_disabled(model), torch.no_grad():
        assert torch.equal(model(input_ids=token_ids, attention_mask=mask).logits, ref)
    with torch.no_grad():  # cached greedy decoding sees what a full forward sees
        cached = model.generate(token_ids[:1, :4], max_new_tokens=6, do_sample=False)
        full = model.generate(token_ids[:1, :4], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)


def _static_input_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    return qat.prepare(model, {"weight": {"bits": 8}, "input": {"bits": 8, "granularity": "per_tensor"}})


def test_a_non_finite_calibration_batch_is_refused_and_the_held_range_kept():
    # before: one inf activation made the held range inf and every later output NaN, silently
    model = _static_input_mlp()
    qat.calibrate(model, [torch.randn(4, 32)])
    quantizer = model[0].input_quantizer
    held = quantizer.observer.hi.clone()
    bad = torch.randn(4, 32)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"input quantizer \(int8 sym per_tensor\): NaN/inf value\(s\)"):
        qat.calibrate(model, [bad])
    assert torch.equal(quantizer.observer.hi, held)
    assert torch.isfinite(model(torch.randn(2, 32))).all()


def test_an_empty_batch_passes_through_a_static_quantizer():
    # before: aminmax() RuntimeError on a [0, C] input while observing
    model = _static_input_mlp()
    assert model(torch.randn(0, 32)).shape == (0, 16)


def test_set_quantizers_refuses_an_unknown_role():
    # before: roles=["inputs"] matched nothing and returned 0, so nothing was switched off
    model = _static_input_mlp()
    with pytest.raises(ValueError, match=r"unknown quantizer role\(s\) \['inputs'\]; choose from \['weight', 'input'"):
        qat.set_quantizers(model, roles=["inputs"], enabled=False)
    assert qat.set_quantizers(model, roles="input", enabled=False) == 1


def test_embedding_with_max_norm_is_refused_by_prepare_and_to_float_keeps_the_flags():
    # before: FakeQuantEmbedding with max_norm crashed in forward ("a view ... modified inplace"), and to_float
    # dropped scale_grad_by_freq / sparse / norm_type
    from qat.modules import FakeQuantEmbedding
    from qat.spec import QuantSpec, TensorSchemes

    model = nn.Sequential(nn.Embedding(10, 16, max_norm=1.0))
    with pytest.raises(ValueError, match=r"0: max_norm=1.0 renormalises the table in place"):
        qat.prepare(model, {"targets": ["Embedding"], "weight": {"bits": 8}})
    emb = nn.Embedding(10, 16, padding_idx=0, scale_grad_by_freq=True, norm_type=3.0)
    back = FakeQuantEmbedding.from_float(emb, TensorSchemes(weight=QuantSpec(bits=8))).to_float()
    assert (back.padding_idx, back.scale_grad_by_freq, back.norm_type, back.weight is emb.weight) == (0, True, 3.0, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_converted_model_can_be_cast_and_keeps_float32_scales(token_ids, dtype):
    # before: model.to(bf16) after convert crashed in forward (weights dequantized to float32 vs bf16 inputs)
    model = qat.convert(qat.prepare(tiny_llama(vocab_size=256), "w4a16_g128_asym"))
    qweight = model.model.layers[0].mlp.down_proj.qweight
    scale, weight = qweight.scale.clone(), qweight.dequantize()
    model.to(dtype)
    assert qweight.scale.dtype == torch.float32 and torch.equal(qweight.scale, scale)
    assert torch.equal(qweight.dequantize(), weight.to(dtype))
    with torch.no_grad():
        assert model(input_ids=token_ids).logits.dtype == dtype
    model.float()
    assert torch.equal(qweight.dequantize(), weight)  # codes and scales untouched: back to the exact values


@pytest.mark.parametrize("learn", ["none", "pact", "lsq"])
def test_calibrate_uses_every_batch_for_learned_activation_ranges(learn):
    # before: a PACT / LSQ input quantizer took its range from the first batch only (w8a8_static's clip came
    # from one batch whatever qat.calibrate was given)
    torch.manual_seed(0)
    model = qat.prepare(nn.Sequential(nn.Linear(32, 8)),
                        {"weight": {"bits": 8}, "input": {"bits": 8, "granularity": "per_tensor", "learn": learn}})
    batches = [torch.randn(4, 32), 10 * torch.randn(4, 32)]
    qat.calibrate(model, batches)
    quantizer = model[0].input_quantizer
    expected = torch.cat(batches).abs().max() / 127.5
    assert torch.allclose(quantizer.qparams(batches[0])[0].detach(), expected)
    assert not quantizer.calibrating
    if learn != "none":  # after calibration the optimizer owns the parameters: a new batch does not move them
        before = quantizer.scale.detach().clone()
        model(100 * torch.randn(4, 32))
        assert torch.equal(quantizer.scale.detach(), before)


def test_a_pickled_kv_cache_model_runs_in_a_fresh_process(tmp_path):
    # before: KeyError "`qat_kv_sdpa` is not a valid attention implementation" (registered only by prepare)
    import subprocess
    import sys

    model = qat.prepare(tiny_llama(vocab_size=256), "w4a8_kv8")
    path = tmp_path / "model.pt"
    torch.save(model, path)  # our own file: whole-model pickles are only for trusted files
    code = (f"import torch; m = torch.load({str(path)!r}, weights_only=False); "
            "print(tuple(m(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.shape))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert "(1, 4, 256)" in out.stdout
