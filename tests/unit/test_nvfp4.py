"""NVFP4 (E2M1, E4M3 scale per 16, fp32 global per tensor): the two-level scale grid against a brute-force E4M3
search; converted, native and compressed-tensors exports compute exactly the fake-quant model (compressed-tensors'
own NVFP4 decompressor decodes our tensors to exactly our weights); W4A4 fake quant runs and converts exactly."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import qat
from qat.export import export_compressed_tensors, load_compressed_tensors, save_native
from qat.formats import bits_per_weight, get_format
from qat.formats.minifloat import e4m3_scale_grid
from qat.formats.nvfp4 import nvfp4_spec, split_scales
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
    ref = _logits(prepared, token_ids)
    with caplog.at_level(logging.WARNING):
        out = export_compressed_tensors(prepared, tmp_path / "ct")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "nvfp4-pack-quantized"
    group = next(iter(q["config_groups"].values()))
    assert group["weights"]["strategy"] == "tensor_group" and group["input_activations"] is None
    loaded = load_compressed_tensors(out)
    if w4a4:  # the dynamic fp4 activations have no place there: said, naming the layers
        assert "dynamic 4-bit float activations" in caplog.text and "q_proj" in caplog.text
        qat.convert(prepared)
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            assert torch.equal(loaded.get_submodule(name).weight, prepared.get_submodule(name).weight)
    else:
        assert torch.equal(_logits(loaded, token_ids), ref)


def test_w4a4_activations_are_fake_quantized_per_block():
    lin = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe("nvfp4_w4a4")).model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, lin.in_features)
    y = lin.input_quantizer(x)
    spec = nvfp4_spec(dynamic=True)
    assert torch.equal(y, fake_quantize_forward(x, *choose_qparams(*compute_range(x, spec), spec), spec)[0])
    assert len(torch.unique(y[0, 0, :16].abs())) <= 8  # E2M1 magnitudes under one block scale


@pytest.mark.parametrize("recipe", ["nvfp4_w4a8", "mxfp4_w4a4"])
def test_activation_variants_convert_exactly_and_export_what_fits(recipe, token_ids, tmp_path, caplog):
    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe(recipe))
    ref = _logits(model, token_ids)
    with caplog.at_level(logging.WARNING):
        out = export_compressed_tensors(model, tmp_path / "ct")
    group = next(iter(json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()))
    if recipe == "nvfp4_w4a8":  # fp8 per-token activations: a scheme compressed-tensors holds
        assert group["input_activations"]["type"] == "float" and group["input_activations"]["strategy"] == "token"
    else:
        assert group["input_activations"] is None and "dynamic 4-bit float activations" in caplog.text
    assert torch.equal(_logits(qat.convert(model), token_ids), ref)
