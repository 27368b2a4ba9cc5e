"""NVFP4 (E2M1, E4M3 scale per 16, fp32 global per tensor): the two-level scale grid against a brute-force E4M3
search; converted, native and compressed-tensors exports compute exactly the fake-quant model (compressed-tensors'
own NVFP4 decompressor decodes our tensors to exactly our weights); W4A4 fake quant runs and converts exactly, its
static global (compressed-tensors' input_global_scale) is written and reloaded exactly and compressed-tensors' own
activation quantization under it equals ours."""
from __future__ import annotations

import json
import logging

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

import qat
from qat.errors import ConfigError
from qat.export import export_compressed_tensors, export_gguf, load_compressed_tensors, load_gguf, save_native
from qat.export.compressed_fp import NVFP4_INPUT
from qat.export.ggml_blocks import encode
from qat.formats import bits_per_weight, get_format, gguf_types
from qat.formats.minifloat import e4m3_scale_grid
from qat.formats.nvfp4 import nvfp4_spec, split_scales
from qat.io import load_safetensors
from qat.primitives import choose_qparams, compute_range, dequantize, fake_quantize_forward, quantize
from qat.testing import tiny_llama

E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3 = E4M3[torch.isfinite(E4M3) & (E4M3 >= 0)].unique()  # 0 .. 448, subnormals included


def _nearest_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Nearest non-negative E4M3 value by exhaustive search (float64), ties to the even code."""
    err = (x.double().unsqueeze(-1) - E4M3.double()).abs()
    best = err.min(-1, keepdim=True).values
    cand = err == best
    codes = torch.arange(len(E4M3))  # sorted values: code parity == mantissa parity
    even = cand & (codes % 2 == 0)
    return E4M3[torch.where(cand.sum(-1) > 1, even.int().argmax(-1), cand.int().argmax(-1))]


def _weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 128, generator=g) * torch.logspace(-4, 0, 16).unsqueeze(1)
    w[0, :16] = 0.0  # an all-zero block
    w[1, :16] = 1e-9  # a block far below the largest: its E4M3 scale is subnormal or zero
    return w


def test_scale_grid_is_e4m3_under_a_power_of_two_global():
    s = torch.rand(4, 8, 1, generator=torch.Generator().manual_seed(2)) * torch.logspace(-6, 0, 8).reshape(1, 8, 1)
    on_grid, g = e4m3_scale_grid(s)
    assert float(torch.log2(g)) == int(torch.log2(g)) and 224 < float(s.max() * g) <= 448
    assert torch.equal(on_grid * g, _nearest_e4m3(s * g))
    again, _ = e4m3_scale_grid(on_grid)
    assert torch.equal(again, on_grid)  # idempotent
    assert torch.equal(e4m3_scale_grid(torch.zeros(3))[0], torch.zeros(3))
    blocks, g2 = split_scales(on_grid)
    assert blocks.dtype == torch.float8_e4m3fn and torch.equal(blocks.float() / g2, on_grid)


def test_fake_quant_convert_and_bits():
    spec, w = nvfp4_spec(), _weights()
    scale, zp = choose_qparams(*compute_range(w, spec), spec)
    fake, mask = fake_quantize_forward(w, scale, zp, spec, need_mask=True)
    codes = quantize(w, scale, zp, spec)
    assert codes.dtype == torch.int8 and torch.equal(fake, dequantize(codes, scale, zp, spec))
    # amax / 6 maps a block's peak onto 6; an E4M3 scale rounded down leaves it up to 1/16 above, which rounds
    # to 6 inside the STE's range (up to 7, half a step past the last level)
    assert bool(mask.all())
    ratio = (w.reshape(16, -1, 16) / torch.where(scale == 0, 1.0, scale)).abs()
    assert float(ratio.max()) <= 6 * (1 + 1 / 16)
    assert torch.equal(fake[0, :16], torch.zeros(16))
    qw = qat.modules.quantized.QuantizedWeight.from_tensor(w, spec)
    assert torch.equal(qw.dequantize(), fake)
    assert bits_per_weight(spec, (16, 128)) == 4.5 + 32 / (16 * 128)
    assert get_format(spec).name == "nvfp4"
    with pytest.raises(ValueError, match="NVFP4.*group_size=16"):
        qat.QuantSpec(bits=4, dtype="fp4_e2m1", granularity="per_group", group_size=32, grid="nvfp4")


def test_compressed_tensors_decompresses_our_tensors_exactly():
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from qat.export.compressed_fp import fp_linear_tensors, fp_weights_args

    spec, w = nvfp4_spec(), _weights()
    qw = qat.modules.quantized.QuantizedWeight.from_tensor(w, spec)
    sd = {k.rpartition(".")[2]: v for k, v in fp_linear_tensors("m", qw).items()}
    scheme = QuantizationScheme(targets=["Linear"], weights=fp_weights_args(spec))
    theirs = NVFP4PackedCompressor.decompress(sd, scheme)["weight"]
    assert theirs.dtype == torch.bfloat16 and torch.equal(theirs.float(), qw.dequantize())  # atol=0


@pytest.fixture(params=["nvfp4_w4a16", "nvfp4_w4a4"])
def prepared(request):
    return qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe(request.param))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_converted_equals_fake_quant_and_native_round_trips(prepared, token_ids, tmp_path):
    ref = _logits(prepared, token_ids)
    save_native(prepared, tmp_path / "native")
    qat.convert(prepared)
    assert torch.equal(_logits(prepared, token_ids), ref)  # atol=0
    assert torch.equal(_logits(qat.export.load_native(tmp_path / "native"), token_ids), ref)


def test_compressed_tensors_export_round_trips(prepared, token_ids, tmp_path, caplog):
    w4a4 = prepared.model.layers[0].self_attn.q_proj.input_quantizer is not None
    ref = _logits(prepared, token_ids)  # W4A4: the first batch calibrates the static activation globals
    with caplog.at_level(logging.WARNING):
        out = export_compressed_tensors(prepared, tmp_path / "ct")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "nvfp4-pack-quantized"
    group = next(iter(q["config_groups"].values()))
    assert group["weights"]["strategy"] == "tensor_group"
    assert group["input_activations"] == (NVFP4_INPUT if w4a4 else None)  # W4A4: the preset's activations, written
    assert "without an input scheme" not in caplog.text
    stored = load_safetensors(out / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        g = stored.get(f"{name}.input_global_scale")
        if w4a4:  # the held global itself: 448 * 6 / the calibrated amax (compressed-tensors' divisor)
            held = prepared.get_submodule(name).input_quantizer
            assert g.dtype == torch.float32 and g.shape == (1,) and float(g) == float(held.global_scale())
            assert float(g) == float(2688.0 / torch.maximum(-held.observer.lo, held.observer.hi))
        else:
            assert g is None
    assert torch.equal(_logits(load_compressed_tensors(out), token_ids), ref)  # atol=0, W4A4 too


def test_w4a4_activations_are_fake_quantized_per_block():
    lin = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("nvfp4_w4a4")).model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, lin.in_features)
    y = lin.input_quantizer(x)  # the recipe's static global, calibrated on x (the first batch)
    spec = nvfp4_spec(static_global=True)
    g = 2688.0 / x.abs().max()  # as compressed-tensors' generate_gparam computes it: torch's 2688 * (1 / amax)
    assert lin.input_quantizer.spec == spec and torch.equal(lin.input_quantizer.global_scale(), g)
    assert torch.equal(y, fake_quantize_forward(x, *choose_qparams(*compute_range(x, spec), spec, global_scale=g),
                                                spec)[0])
    assert len(torch.unique(y[0, 0, :16].abs())) <= 8  # E2M1 magnitudes under one block scale
    # the global per tensor as it comes (input.dynamic=true): block scales and a power-of-two global from x itself
    dynamic = qat.modules.quantizer.TensorQuantizer(nvfp4_spec(dynamic=True), "input", x[:1, :1])
    spec = nvfp4_spec(dynamic=True)
    assert torch.equal(dynamic(x), fake_quantize_forward(x, *choose_qparams(*compute_range(x, spec), spec), spec)[0])


def test_static_global_activations_are_compressed_tensors_own():
    """The held global is compressed-tensors' generate_gparam of the running range (calibrated over batches, held
    once observing stops), and compressed-tensors' own activation quantization (compute_dynamic_scales_and_zp +
    fake_quantize on the written input_activations, under the stored global) gives exactly our activations: an
    all-zero block, a block whose E4M3 scale underflows, values past the calibrated amax (saturating), E2M1 ties."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp, generate_gparam

    q = qat.modules.quantizer.TensorQuantizer(nvfp4_spec(static_global=True), "input", torch.zeros(1, 128))
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(2, 3, 128, generator=gen) * s for s in (1.0, 3.0, 0.5)]
    for x in batches:
        q(x)
    q.observing = False  # frozen: what the export writes
    lo, hi = torch.aminmax(torch.stack(batches))
    g = q.global_scale()
    assert torch.equal(g.reshape(1), generate_gparam(lo, hi)) and float(g) == float(2688.0 / hi.abs().max(lo.abs()))
    args = QuantizationArgs(**NVFP4_INPUT)
    x = torch.randn(4, 8, 128, generator=gen) * torch.logspace(-3, 0.7, 8).reshape(1, 8, 1)  # up to 5x the amax
    x[0, 0, :16], x[0, 1, :16] = 0.0, 1e-6
    scale, _ = compute_dynamic_scales_and_zp(x, args, module=None, global_scale=g.reshape(1))
    step = (scale.float() / g).repeat_interleave(16, -1)  # each element's block scale S_b in compressed-tensors
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5])
    x[1, :, 1::4] = ties[torch.randint(0, 8, x[1, :, 1::4].shape, generator=gen)] * step[1, :, 1::4]
    scale, zero_point = compute_dynamic_scales_and_zp(x, args, module=None, global_scale=g.reshape(1))
    theirs = fake_quantize(x, scale, zero_point, args, global_scale=g.reshape(1))
    ours = q(x)
    assert torch.equal(ours, theirs) and torch.equal(q.global_scale(), g)  # atol=0; the global held
    assert torch.equal(ours[0, :2, :16], torch.zeros(2, 16)) and float(ours.abs().max()) < float(x.abs().max())


def test_static_global_export_refusals_name_the_module(token_ids, tmp_path):
    """NVFP4 activations with a global per tensor have no compressed-tensors form: refused, naming the module and
    the valid form (before anything is written; they were written weights-only with a warning); a static global
    with no range yet is refused too."""
    base = qat.load_recipe("nvfp4_w4a4").to_dict()
    dynamic = {**base, "input": {**base["input"], "static_global": False, "dynamic": True}}
    model = qat.prepare(tiny_llama(vocab_size=256), qat.transform.as_recipe(dynamic))
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj has NVFP4 activations .*"
                                              r"static_global: true, dynamic: false"):
        export_compressed_tensors(model, tmp_path / "dyn")
    with pytest.raises(ConfigError, match=r"q_proj has NVFP4 activations"):
        qat.export.compressed.check_schemes(qat.TensorSchemes(input=qat.QuantSpec(**dynamic["input"])), "q_proj")
    save_native(model, tmp_path / "native")  # the dynamic form's export
    assert not (tmp_path / "dyn" / "config.json").exists()
    fresh = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("nvfp4_w4a4"))
    with pytest.raises(ConfigError, match=r"q_proj has a static-global input scheme .* no range yet; calibrate"):
        export_compressed_tensors(fresh, tmp_path / "fresh")
    qat.calibrate(fresh, [token_ids])
    assert torch.equal(_logits(load_compressed_tensors(export_compressed_tensors(fresh, tmp_path / "ct")), token_ids),
                       _logits(fresh, token_ids))
    with pytest.raises(ValueError, match="static_global=True holds a calibrated global: it needs dynamic=False"):
        nvfp4_spec(static_global=True, dynamic=True)
    with pytest.raises(ValueError, match=r"formats with one: \['nvfp4'\], not 'mxfp4'"):
        qat.QuantSpec(bits=4, dtype="fp4_e2m1", granularity="per_group", group_size=32, grid="mx", static_global=True)
    with pytest.raises(ConfigError, match="leave static_global false on weight schemes"):
        qat.modules.quantizer.TensorQuantizer(nvfp4_spec(static_global=True), "weight", torch.zeros(4, 16))


def test_w4a4_qat_calibrates_the_global_in_its_first_steps_then_holds_it(tmp_path):
    """QAT on nvfp4_w4a4: while observing (the first steps) the global follows the running amax of the inputs (as
    llm-compressor's static_minmax), the STE passes gradients through the activations; frozen, it holds while
    training goes on, and the export after training reloads with the trained model's logits (atol=0)."""
    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("nvfp4_w4a4"))
    q = model.model.layers[0].self_attn.q_proj.input_quantizer
    seen = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(6)
    batches = [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(4)]
    for i, ids in enumerate(batches):
        if i == 2:
            qat.set_quantizers(model, roles=["input"], observing=False)  # freeze_ranges_after=2
            held = q.global_scale().clone()
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
        opt.step()
        if i == 1:
            assert float(q.global_scale()) == float(2688.0 / torch.stack([x.abs().max() for x in seen]).max())
    handle.remove()
    assert torch.equal(q.global_scale(), held)  # held through the last two steps
    ref = _logits(model, batches[0])
    assert torch.equal(_logits(load_compressed_tensors(export_compressed_tensors(model, tmp_path / "ct")),
                              batches[0]), ref)


def test_transformers_loads_the_w4a4_export_with_our_global(token_ids, tmp_path):
    """transformers + compressed-tensors (an independent reader, bf16 on CPU) load the W4A4 export: each linear gets
    our input_global_scale, and compressed-tensors' forward_quantize on the loaded module quantizes fp32 inputs
    exactly as our frozen quantizer does. (On bf16 inputs it divides amax_b by 6 in bf16 first: docs/export.md.)"""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from transformers import AutoModelForCausalLM

    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("nvfp4_w4a4"))
    qat.calibrate(model, [token_ids])
    hf = AutoModelForCausalLM.from_pretrained(export_compressed_tensors(model, tmp_path / "ct"), dtype=torch.bfloat16)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(5)) * 4
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        ours, theirs = model.get_submodule(name).input_quantizer, hf.get_submodule(name)
        assert torch.equal(theirs.input_global_scale.reshape(()), ours.global_scale())
        with torch.no_grad():
            assert torch.equal(forward_quantize(theirs, x, "input", theirs.quantization_scheme.input_activations),
                               ours(x))


@pytest.mark.parametrize("recipe", ["nvfp4_w4a8", "mxfp4_w4a4"])
def test_activation_variants_convert_exactly_and_export_what_fits(recipe, token_ids, tmp_path, caplog):
    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe(recipe))
    ref = _logits(model, token_ids)
    with caplog.at_level(logging.WARNING):
        out = export_compressed_tensors(model, tmp_path / "ct")
    group = next(iter(json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()))
    if recipe == "nvfp4_w4a8":  # fp8 per-token activations: a scheme compressed-tensors holds
        assert group["input_activations"]["type"] == "float" and group["input_activations"]["strategy"] == "token"
    else:  # MXFP4 A4: compressed-tensors' MXFP4 preset's dynamic group-32 E8M0 activations (#12: it was dropped)
        assert group["input_activations"] == {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group",
                                              "group_size": 32, "dynamic": True, "scale_dtype": "torch.uint8",
                                              "zp_dtype": "torch.uint8"}
        # written, with the warning that a compressed-tensors runtime computes the E8M0 scales its own way
        assert "MXFP4 activations of" in caplog.text and "computes their E8M0 scales its own way" in caplog.text
    assert torch.equal(_logits(qat.convert(model), token_ids), ref)


def test_gguf_blocks_decode_in_gguf_py_to_our_values_times_the_global():
    spec, w = nvfp4_spec(), _weights()
    scale, _ = choose_qparams(*compute_range(w, spec), spec)
    fake = fake_quantize_forward(w, scale, None, spec)[0]
    t = gguf_types()["NVFP4"]
    blocks = t.blocks(quantize(w, scale, None, spec), scale, None)
    assert blocks.shape == (16, 128 // 64 * 36)
    m = t.tensor_scale(scale)
    assert float(m) == 1 / float(split_scales(scale)[1])  # 1 / g: a power of two
    assert np.array_equal(gq.dequantize(blocks.numpy(), T.NVFP4) * m.numpy(), fake.numpy())  # atol=0
    enc_blocks, values = encode(w, "NVFP4")
    assert torch.equal(enc_blocks, blocks) and torch.equal(values, fake)
    # layout: 4 UE4M3 bytes, then byte j of sub-block k = pattern[16k + j] | pattern[16k + j + 8] << 4
    one = torch.tensor([[0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -6.0] * 2 + [0.0] * 48])
    b = gguf_types()["NVFP4"].blocks(one * 2, torch.ones(1, 4, 1), None)[0]  # doubled codes, scale 1: g = 256
    assert b[:4].tolist() == [torch.tensor(256.0).to(torch.float8_e4m3fn).view(torch.uint8).item()] * 4
    assert b[4:12].tolist() == [1 | 1 << 4, 2 | 2 << 4, 3 | 3 << 4, 4 | 4 << 4, 5 | 5 << 4, 6 | 6 << 4, 7 | 7 << 4,
                                15 | 15 << 4]


@pytest.mark.parametrize("recipe", ["nvfp4_w4a16", "nvfp4_w4a16_lsq"])
def test_gguf_export_is_format_exact(recipe, token_ids, tmp_path):
    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe(recipe))
    ref = _logits(model, token_ids)
    path = export_gguf(model, tmp_path / "m.gguf", "F32")
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "NVFP4"
    assert types["blk.0.attn_q.scale"] == "F32" and "output.scale" not in types  # lm_head stays float
    assert torch.equal(_logits(load_gguf(path), token_ids), ref)  # atol=0


def test_gguf_nvfp4_of_a_float_model_keeps_the_embedding_in_f16(tmp_path, caplog):
    model = tiny_llama(vocab_size=256)
    path = export_gguf(model, tmp_path / "m.gguf", "NVFP4")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == "F16" and types["output.weight"] == types["blk.0.ffn_up.weight"] == "NVFP4"
    assert "output.scale" in types and "token_embd.scale" not in types
    assert "token_embd.weight is written in F16, not NVFP4" in caplog.text
    up = load_gguf(path).model.layers[0].mlp.up_proj.weight.detach()
    assert torch.equal(up, encode(model.model.layers[0].mlp.up_proj.weight.detach(), "NVFP4")[1])


def test_lsq_recipe_trains_the_block_scale_and_exports_exactly(token_ids, tmp_path):
    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("nvfp4_w4a16_lsq"))
    q = model.model.layers[0].mlp.down_proj.weight_quantizer
    before = q.scale.detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):  # QAT steps: the loss moves the weights and the learned block scales
        opt.zero_grad()
        model(token_ids, labels=token_ids).loss.backward()
        assert bool(q.scale.grad.isfinite().all()) and bool(q.scale.grad.abs().sum() > 0)
        opt.step()
    assert not torch.equal(q.scale.detach(), before)
    assert not torch.equal(e4m3_scale_grid(q.scale.detach())[0], e4m3_scale_grid(before)[0])  # the grid moved too
    ref = _logits(model, token_ids)
    out = export_compressed_tensors(model, tmp_path / "ct")
    assert torch.equal(_logits(load_compressed_tensors(out), token_ids), ref)
    path = export_gguf(model, tmp_path / "m.gguf", "F32")
    assert torch.equal(_logits(load_gguf(path), token_ids), ref)
    assert torch.equal(_logits(qat.convert(model), token_ids), ref)
    assert 4.5 < qat.control.weight_bits(model)[0] < 4.51  # 4.5 + a 32-bit global per tensor
