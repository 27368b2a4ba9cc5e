"""Property tests of the one numerics (Hypothesis) and of the straight-through estimators."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat.packing import pack, packed_numel, unpack
from qat.primitives import choose_qparams, compute_range, dequantize, fake_quantize_forward, quantize
from qat.spec import QuantSpec
from qat.ste import fake_quantize, learned_fake_quantize

SETTINGS = settings(max_examples=60, deadline=None)

int_specs = st.builds(
    lambda bits, sym, gran: QuantSpec(
        bits=bits, symmetric=sym, granularity=gran, group_size=8 if gran == "per_group" else None
    ),
    st.sampled_from([2, 3, 4, 5, 6, 8]),
    st.booleans(),
    st.sampled_from(["per_tensor", "per_channel", "per_group"]),
)


def _tensor(seed: int, scale: float, shape=(6, 32)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


@SETTINGS
@given(spec=int_specs, seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_roundtrip_within_half_step_inside_range(spec, seed, scale):
    x = _tensor(seed, scale)
    s, z = choose_qparams(*compute_range(x, spec), spec)
    x_hat = dequantize(quantize(x, s, z, spec), s, z, spec)
    # every x lies inside its block's range here, so the error is at most half a step (plus fp rounding)
    step = s.expand_as(x.unflatten(-1, (-1, 8))).reshape(x.shape) if spec.granularity == "per_group" else s.expand_as(x)
    assert torch.all((x_hat - x).abs() <= step / 2 * (1 + 1e-5) + 1e-6 * scale)


@SETTINGS
@given(spec=int_specs, seed=st.integers(0, 2**16))
def test_fake_quantize_is_exactly_dequantize_of_quantize(spec, seed):
    x = _tensor(seed, 3.0)
    s, z = choose_qparams(*compute_range(x, spec), spec)
    fused, _ = fake_quantize_forward(x, s, z, spec)
    assert torch.equal(fused, dequantize(quantize(x, s, z, spec), s, z, spec))


@SETTINGS
@given(bits=st.sampled_from([2, 3, 4, 5, 6, 8]), gran=st.sampled_from(["per_tensor", "per_channel", "per_group"]),
       seed=st.integers(0, 2**16))
def test_zero_is_exact_in_symmetric_schemes(bits, gran, seed):
    spec = QuantSpec(bits=bits, granularity=gran, group_size=8 if gran == "per_group" else None)
    x = _tensor(seed, 1.0)
    x[:, ::3] = 0.0
    s, z = choose_qparams(*compute_range(x, spec), spec)
    assert z is None
    codes = quantize(x, s, z, spec)
    assert torch.all(codes[:, ::3] == 0)
    assert torch.all(dequantize(codes, s, z, spec)[:, ::3] == 0)


@SETTINGS
@given(bits=st.sampled_from([2, 3, 4, 5, 6, 8]), seed=st.integers(0, 2**16))
def test_zero_is_exact_in_asymmetric_schemes_too(bits, seed):
    spec = QuantSpec(bits=bits, symmetric=False, granularity="per_channel")
    x = _tensor(seed, 1.0).abs() + 0.5  # all positive: the range is widened to include 0
    x[:, 0] = 0.0
    s, z = choose_qparams(*compute_range(x, spec), spec)
    assert torch.all(dequantize(quantize(x, s, z, spec), s, z, spec)[:, 0] == 0)


@SETTINGS
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_pack_unpack_is_identity(bits, n, seed):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.numel() == packed_numel(n, bits)
    assert torch.equal(unpack(packed, bits, n), codes)


def test_pack_bit_order_is_documented():
    assert pack(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21, 0, 0, 0]
    assert pack(torch.tensor([3, 0, 1, 2], dtype=torch.uint8), 2).tolist() == [0b10010011, 0]
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 7\]"):
        pack(torch.tensor([8], dtype=torch.uint8), 3)


@SETTINGS
@given(spec=int_specs, seed=st.integers(0, 2**16))
def test_ste_gradient_is_identity_inside_zero_outside(spec, seed):
    x = _tensor(seed, 1.0)
    lo, hi = compute_range(x, spec)
    s, z = choose_qparams(lo * 0.5, hi * 0.5, spec)  # a tight range: some elements fall outside
    x = x.requires_grad_()
    fake_quantize(x, s, z, spec).backward(torch.ones_like(x))
    view = x.detach().unflatten(-1, (-1, 8)) if spec.granularity == "per_group" else x.detach()
    t = torch.round(view / s) + (0 if z is None else z)
    inside = ((t >= spec.qmin) & (t <= spec.qmax)).reshape(x.shape).float()
    assert torch.equal(x.grad, inside)
    assert 0 < inside.sum() < inside.numel() or spec.bits == 8 or inside.sum() == inside.numel()


def test_ste_backward_keeps_only_a_bool_mask():
    spec = QuantSpec(bits=4, granularity="per_group", group_size=32)
    x = torch.randn(64, 128, requires_grad=True)
    s, z = choose_qparams(*compute_range(x, spec), spec)
    saved = []

    def pack_hook(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        fake_quantize(x, s, z, spec)
    assert saved == [(torch.bool, x.numel())]


@pytest.mark.parametrize("mode", ["lsq", "pact"])
def test_learned_parameters_receive_gradients(mode):
    spec = QuantSpec(bits=4, granularity="per_channel")
    x = torch.randn(8, 64, requires_grad=True)
    lo, hi = compute_range(x, spec)
    s0, _ = choose_qparams(lo, hi, spec)
    param = (s0 * 0.6 if mode == "lsq" else torch.maximum(-lo, hi) * 0.6).clone().requires_grad_()
    scale = param if mode == "lsq" else param / 7.5
    y = learned_fake_quantize(x, scale, None, spec, mode)
    (y - x.detach()).pow(2).sum().backward()
    assert param.grad is not None and param.grad.shape == param.shape
    assert torch.all(torch.isfinite(param.grad)) and param.grad.abs().sum() > 0
    # the learned forward is exactly the plain numerics
    assert torch.equal(y.detach(), fake_quantize_forward(x.detach(), scale.detach(), None, spec)[0])


def test_lsq_gradient_matches_its_definition():
    spec = QuantSpec(bits=3, granularity="per_tensor")
    x = torch.tensor([0.05, 0.26, -0.33, 2.0, -5.0])
    s = torch.tensor(0.1, requires_grad=True)
    learned_fake_quantize(x, s, None, spec, "lsq").sum().backward()
    q = torch.clamp(torch.round(x / 0.1), -4, 3)
    inside = (torch.round(x / 0.1) >= -4) & (torch.round(x / 0.1) <= 3)
    expected = torch.where(inside, q - x / 0.1, q).sum() / math.sqrt(5 * 3)
    assert torch.allclose(s.grad, expected, atol=1e-5)


def test_lsq_plus_zero_point_gets_gradient():
    from qat.modules import TensorQuantizer

    spec = QuantSpec(bits=2, symmetric=False, granularity="per_group", group_size=16, learn="lsq_plus")
    w = torch.randn(4, 32)
    q = TensorQuantizer(spec, "weight", w)
    with torch.no_grad():
        q.scale.mul_(0.5)  # a tighter range clips some elements: LSQ+'s offset learns from those
    w = w.requires_grad_()
    (q(w) - 1.0).pow(2).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0
    assert q.zero_point.grad is not None and q.zero_point.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_roundtrip(dtype):
    spec = QuantSpec(dtype=dtype, granularity="per_token", dynamic=True)
    x = torch.randn(4, 64) * 10
    s, z = choose_qparams(*compute_range(x, spec), spec)
    codes = quantize(x, s, z, spec)
    assert codes.dtype == (torch.float8_e4m3fn if dtype == "fp8_e4m3" else torch.float8_e5m2)
    x_hat = dequantize(codes, s, z, spec)
    assert torch.equal(x_hat, fake_quantize_forward(x, s, z, spec)[0])
    rel = ((x_hat - x).abs() / x.abs().clamp(min=1e-3)).median()
    assert rel < (0.07 if dtype == "fp8_e4m3" else 0.13)


def test_scale_dtype_rounds_scales():
    spec = QuantSpec(bits=4, granularity="per_channel", scale_dtype="fp16")
    s, _ = choose_qparams(*compute_range(torch.randn(8, 16), spec), spec)
    assert s.dtype == torch.float32 and torch.equal(s, s.half().float())
