"""MXFP4 (E2M1 under an E8M0 scale per 32): rounding properties against a brute-force nearest-value search and
compressed-tensors' own FP4 rounding; converted, native, GGUF and compressed-tensors exports compute exactly what
the fake-quant model computed, decoded by gguf-py and compressed-tensors themselves."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

import qat
from qat.export import export_gguf, load_gguf, save_native
from qat.export.ggml_blocks import encode
from qat.formats import bits_per_weight, get_format, gguf_types
from qat.formats.minifloat import (E2M1_MAGNITUDES, e2m1_codes_, e2m1_doubled, e2m1_from_index, e2m1_index, e8m0_bytes,
                                   e8m0_scale, mx_scale, nearest_pow2)
from qat.formats.mxfp4 import mxfp4_spec
from qat.primitives import choose_qparams, compute_range, dequantize, fake_quantize_forward, quantize
from qat.testing import tiny_llama

ALL = torch.tensor(E2M1_MAGNITUDES)


def _e2m1(t: torch.Tensor) -> torch.Tensor:
    return e2m1_doubled(t) / 2


def _brute_force(t: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value by exhaustive search in float64, ties to the even mantissa (level index even)."""
    mag = t.double().abs().clamp(max=6.0)
    err = (mag.unsqueeze(-1) - ALL.double()).abs()
    best = err.min(-1, keepdim=True).values
    cand = err == best
    idx = torch.where(cand.sum(-1) > 1, (cand & (torch.arange(8) % 2 == 0)).int().argmax(-1), cand.int().argmax(-1))
    return (ALL[idx] * torch.where(torch.signbit(t), -1.0, 1.0)).float()


def _weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 256, generator=g) * torch.logspace(-3, 1, 24).unsqueeze(1)
    w[0, :32] = 0.0  # an all-zero block
    w[1, :32] = -0.25  # a constant block
    w[2, 32:64] = 7.5 * 2.0**-3  # amax 7.5 * 2^(e-2): the OCP scale saturates it to 6
    w[3, :32] = 1e-40  # subnormal weights
    return w


def test_e2m1_rounding_is_nearest_even_with_saturation():
    # every tie, every level, values past the largest, zero and negative zero, subnormal-size inputs
    mids = [(a + b) / 2 for a, b in zip(E2M1_MAGNITUDES, E2M1_MAGNITUDES[1:])]
    t = torch.tensor(mids + list(E2M1_MAGNITUDES) + [6.5, 7.0, 1e9, 0.0, -0.0, 1e-40, -1e-40, 0.2500001, 0.2499999])
    t = torch.cat([t, -t, torch.linspace(-8, 8, 4001)])
    got = _e2m1(t)
    assert torch.equal(got, _brute_force(t))
    assert torch.equal(torch.signbit(got), torch.signbit(t))  # -0 keeps its sign bit (code 8)
    doubled = e2m1_doubled(torch.linspace(-7, 7, 57))
    assert torch.equal(e2m1_from_index(e2m1_index(doubled)).float(), doubled)  # the 4-bit patterns round trip
    assert e2m1_index(torch.tensor([0.0, 1.0, 12.0, -1.0, -12.0])).tolist() == [0, 1, 7, 9, 15]
    assert _e2m1(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])).tolist() == \
        [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def _float32_sweep() -> torch.Tensor:
    """Float32 inputs (already divided by the scale) for the rounding: a strided walk over every bit pattern in
    [2^-3, 16), each tie and level with its neighbours 1-2 ulp away, subnormals, zeros, inf; both signs."""
    walk = torch.arange(0x3E000000, 0x41800000, 251, dtype=torch.int64).to(torch.int32).view(torch.float32)
    edges = torch.tensor([(a + b) / 2 for a, b in zip(E2M1_MAGNITUDES, E2M1_MAGNITUDES[1:])] + list(E2M1_MAGNITUDES)
                         + [6.5, 7.0, 12.0, 14.0])
    bits = edges.view(torch.int32).unsqueeze(1) + torch.arange(-2, 3, dtype=torch.int32)
    near = bits.clamp(min=0).reshape(-1).view(torch.float32)
    special = torch.tensor([0.0, 1e-45, 1e-40, 2.0**-126, 3e38, float("inf")])
    t = torch.cat([walk, near, special])
    return torch.cat([t, -t])


def test_e2m1_codes_are_the_definition_bit_for_bit():
    # the fast rounding (exponent-bit step, add/subtract C) against the brute-force nearest level, sign bits
    # included; the mask is |t| <= 7 of the undoubled input
    t = _float32_sweep()
    codes, mask = e2m1_codes_(t * 2, t, need_mask=True)
    ref = _brute_force(t) * 2
    assert torch.equal(codes.view(torch.int32), ref.view(torch.int32))
    assert torch.equal(mask, t.abs() <= 7.0)
    assert torch.equal(e2m1_doubled(t).view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("need_mask", [False, True], ids=["forward", "with-mask"])
def test_mxfp4_fake_quant_is_the_definition_bit_for_bit(need_mask):
    # fake quant of whole weights == the module docstring's formula in float64 with the brute-force E2M1:
    # X = 2^(floor(log2 amax) - 2) in E8M0's range, x^ = E2M1(x / X) * X
    spec = mxfp4_spec()
    w = torch.cat([_weights(), _float32_sweep()[:256 * 64].reshape(64, 256) * 0.01])
    out, mask = fake_quantize_forward(w, *choose_qparams(*compute_range(w, spec), spec), spec, need_mask)
    blocks = w.double().reshape(-1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=1e-300))) - 2, -127.0)
    x = torch.exp2(e.clamp(-127, 127))  # E8M0's range: the subnormal row's scale is held at 2^-127
    t = (blocks / x).float()  # exact: x is a power of two
    ref = (_brute_force(t).double() * x).float().reshape(w.shape)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
    assert mask is None if not need_mask else torch.equal(mask, (t.abs() <= 7.0).reshape(w.shape))


def test_mxfp4_fake_quant_equals_torchao_mx_floor():
    # an independent implementation where installed (torchao is not a dependency): MXTensor with the OCP FLOOR scale
    # dequantizes to exactly our fake quant
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    w = _weights()
    spec = mxfp4_spec()
    ours = fake_quantize_forward(w, *choose_qparams(*compute_range(w, spec), spec), spec)[0]
    theirs = mx.MXTensor.to_mx(w, torch.float4_e2m1fn_x2, 32, scaling_mode=ScaleCalculationMode.FLOOR)
    assert torch.equal(ours, theirs.dequantize(torch.float32))


def test_e2m1_matches_compressed_tensors_rounding():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize

    t = torch.cat([torch.linspace(-7, 7, 2801), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])])[:2784]
    args = QuantizationArgs(num_bits=4, type="float", strategy="group", group_size=32)
    theirs = ct_quantize(t.reshape(1, -1), torch.ones(1, 2784 // 32), None, args).reshape(-1).float()
    assert torch.equal(_e2m1(t), theirs)
    packed = pack_fp4_to_uint8(theirs.reshape(1, -1))
    assert torch.equal(unpack_fp4_from_uint8(packed, 1, 2784, torch.float32).reshape(-1), theirs)


def test_e8m0_scale_rule_and_range():
    amax = torch.tensor([6.0, 7.99, 8.0, 1.0, 0.0, 1e-45, 3e38, np.nextafter(np.float32(4), np.float32(0))])
    s = mx_scale(amax, 2)
    assert s.tolist()[:4] == [1.0, 1.0, 2.0, 0.25]
    assert s[4] == s[5] == 2.0**-127 and s[6] == 2.0**125 and s[7] == 0.5  # zero, underflow, largest
    e = e8m0_bytes(s)
    assert e.tolist()[:5] == [127, 127, 128, 125, 0]
    assert torch.equal(e8m0_scale(e), s)
    assert nearest_pow2(torch.tensor([0.7, 0.71, 3.0, 2.0**-140])).tolist() == [0.5, 1.0, 4.0, 2.0**-127]


def test_fake_quant_values_are_what_gguf_py_decodes():
    spec, w = mxfp4_spec(), _weights()
    scale, zp = choose_qparams(*compute_range(w, spec), spec)
    fake, mask = fake_quantize_forward(w, scale, zp, spec, need_mask=True)
    codes = quantize(w, scale, zp, spec)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 12  # doubled E2M1 values
    assert torch.equal(fake, dequantize(codes, scale, zp, spec))
    assert torch.equal(fake[2, 32:64], torch.full((32,), 0.75))  # 7.5 * 2^-3 saturates to 6 * 2^-3
    assert not bool(mask[2, 32:64].any()) and float(mask.float().mean()) > 0.9
    assert torch.equal(fake[3, :32], torch.zeros(32))
    blocks = gguf_types()["MXFP4"].blocks(codes, scale, zp)
    assert blocks.shape == (24, 256 // 32 * 17)
    assert np.array_equal(gq.dequantize(blocks.numpy(), T.MXFP4), fake.numpy())  # atol=0
    # gguf-py's own quantizer takes the same exponent (it rounds element ties toward zero, not to even), except
    # below the E8M0 range: amax 1e-40 gives floor(log2) - 2 + 127 = -8, which it wraps to 248 (2^121) where
    # OCP (and we) clamp to 0 (2^-127)
    theirs = gq.quantize(w.numpy(), T.MXFP4)[:, ::17]
    assert theirs[3, 0] == 248 and blocks[3, 0] == 0
    theirs[3, 0] = 0
    assert np.array_equal(theirs, blocks.numpy()[:, ::17])


def test_encoder_of_float_weights_is_the_grid():
    w = _weights()
    blocks, values = encode(w, "MXFP4")
    spec = mxfp4_spec()
    assert torch.equal(values, fake_quantize_forward(w, *choose_qparams(*compute_range(w, spec), spec), spec)[0])
    assert np.array_equal(gq.dequantize(blocks.numpy(), T.MXFP4), values.numpy())


def test_spec_checks_and_bits():
    assert get_format(mxfp4_spec()).name == "mxfp4"
    with pytest.raises(ValueError, match="MXFP4.*group_size=32"):
        qat.QuantSpec(bits=4, dtype="fp4_e2m1", granularity="per_group", group_size=16, grid="mx")
    with pytest.raises(ValueError, match="MXFP4.*learn 'none' or 'lsq'"):
        mxfp4_spec(learn="pact")
    assert bits_per_weight(mxfp4_spec(), (8, 256)) == 4.25


def test_learned_scale_stays_on_the_e8m0_grid_and_gets_a_gradient():
    w = _weights()[4:8].clone().requires_grad_(True)
    q = qat.modules.quantizer.TensorQuantizer(mxfp4_spec(learn="lsq"), "weight", w.detach())
    with torch.no_grad():
        q.scale.mul_(1.3)  # off the grid: the forward uses the nearest power of two
    out = q(w)
    scale = nearest_pow2(q.scale.detach())
    assert torch.equal(out.detach(), fake_quantize_forward(w.detach(), scale, None, mxfp4_spec())[0])
    out.pow(2).sum().backward()
    assert q.scale.grad is not None and bool(q.scale.grad.abs().sum() > 0) and w.grad is not None


@pytest.fixture(params=["mxfp4", "mxfp4_lsq"])
def prepared(request, token_ids):
    model = qat.prepare(tiny_llama(vocab_size=256), qat.load_recipe(request.param))
    if request.param == "mxfp4_lsq":  # a trained-looking scale, off the power-of-two grid
        with torch.no_grad():
            for _, q in qat.quantizers(model):
                q.scale.mul_(1.2)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_converted_equals_fake_quant_and_native_round_trips(prepared, token_ids, tmp_path):
    ref = _logits(prepared, token_ids)
    save_native(prepared, tmp_path / "native")
    qat.convert(prepared)
    assert torch.equal(_logits(prepared, token_ids), ref)  # atol=0
    assert qat.control.weight_bits(prepared)[0] == 4.25
    assert torch.equal(_logits(qat.export.load_native(tmp_path / "native"), token_ids), ref)


def test_gguf_export_is_format_exact(prepared, token_ids, tmp_path):
    ref = _logits(prepared, token_ids)
    path = export_gguf(prepared, tmp_path / "m.gguf", "F32")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "MXFP4"
    assert torch.equal(_logits(load_gguf(path), token_ids), ref)


def test_compressed_tensors_export_decodes_exactly(prepared, token_ids, tmp_path):
    import json

    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    from qat.export import export_compressed_tensors, load_compressed_tensors

    ref = _logits(prepared, token_ids)
    out = export_compressed_tensors(prepared, tmp_path / "ct")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "mxfp4-pack-quantized"
    group = next(iter(q["config_groups"].values()))
    scheme = QuantizationScheme(targets=["Linear"], weights=group["weights"])
    t = load_file(out / "model.safetensors")
    qat.convert(prepared)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        sd = {k.rpartition(".")[2]: v for k, v in t.items() if k.startswith(name + ".weight")}
        theirs = MXFP4PackedCompressor.decompress(sd, scheme)["weight"]
        assert torch.equal(theirs.float(), prepared.get_submodule(name).weight.float())  # atol=0
    assert torch.equal(_logits(load_compressed_tensors(out), token_ids), ref)
