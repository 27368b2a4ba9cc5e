"""`qat.formats.common.divide`: the formats' division by a constant gives the CPU's bits on every device.

CUDA computes `tensor / python_number` as a multiplication by the number's reciprocal (seen on an H200: int4
scales amax / 7.5 one ulp off the CPU's); `divide` hands CUDA a 0-dim divisor instead, which it divides by. The
path it takes off the CPU is checked here against the CPU's own `x / d`; tests/gpu/test_cuda.py runs it on CUDA.
"""
import math

import pytest
import torch

from qat.formats.common import divide, divide_by_tensor

DIVISORS = [7.5, 15, 127, -8, 448.0, 6.0, -127, 3, math.sqrt(12), 0.95, 1e-3, 2 ** -20]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_tensor_divisor_path_equals_the_cpu_division(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, generator=g) * torch.logspace(-4, 4, 4096)).to(dtype)
    for d in DIVISORS:
        want = x / d
        got = divide_by_tensor(x, d)
        assert got.dtype == want.dtype == dtype
        assert torch.equal(got, want), (dtype, d, int((got != want).sum()))


def test_divide_keeps_cpu_results_and_gradients():
    x = torch.randn(64, 32, requires_grad=True)
    y = divide(x, 7.5)
    assert torch.equal(y, x.detach() / 7.5)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 1 / 7.5))
    assert divide(torch.tensor([7, 9]), 2).tolist() == [3.5, 4.5]  # integer input: true division, as `/`


def test_divide_off_the_cpu_keeps_shape_and_dtype():
    x = torch.empty(3, 5, dtype=torch.bfloat16, device="meta")
    y = divide(x, 7.5)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device.type == "meta"


def test_fixed_sum_adds_pairwise_in_one_order():
    from qat.formats.common import fixed_sum, mean_square
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 7, 16, 32, 33, 256):
        ints = torch.randint(-1000, 1000, (5, n), generator=g).float()
        assert torch.equal(fixed_sum(ints), ints.sum(-1, keepdim=True)), n  # exact sums: any order agrees
        x = torch.randn(64, n, generator=g) * torch.logspace(-4, 4, n)
        assert torch.allclose(fixed_sum(x), x.double().sum(-1, keepdim=True).float(), rtol=1e-5, atol=1e-3)
    x = torch.tensor([[1.0, 1e8, -1e8, 1.0]])  # float32: (x0 + x2) + (x1 + x3) = -1e8 + 1e8 = 0, not left to right's 1
    assert fixed_sum(x).item() == 0.0 and ((x[0, 0] + x[0, 1]) + x[0, 2] + x[0, 3]).item() == 1.0
    x = torch.randn(8, 32, generator=g)
    assert torch.allclose(mean_square(x), (x * x).mean(-1, keepdim=True), rtol=1e-6)
    assert torch.equal(mean_square(x), fixed_sum(x * x) / 32)


def test_kquant_search_is_float32_for_lower_precision_weights():
    """A bfloat16 weight gets the float32 search (its sums are not rounded to 8 bits): the same qparams as the
    float32 copy of it."""
    from qat.formats.kquant import fitted_range, kquant_spec
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(0)).bfloat16()
    spec = kquant_spec("Q4_K")
    for a, b in zip(fitted_range(w, spec), fitted_range(w.float(), spec)):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_fixed_sum_over_dims_and_edge_lengths():
    from qat.formats.common import fixed_sum, fixed_sum_over
    x = torch.randint(-50, 50, (3, 4, 5, 6)).float()  # integers: exact sums in any order
    for dims in [(3,), (1, 3), (0, 1, 2, 3), (-1, -3), (0,)]:
        assert torch.equal(fixed_sum_over(x, dims), x.sum(dims, keepdim=True)), dims
    empty = torch.zeros(2, 0)
    assert fixed_sum(empty).shape == (2, 1) and not fixed_sum(empty).any()
    one = torch.ones(2, 1)
    assert torch.equal(fixed_sum(one), one) and fixed_sum(one).data_ptr() != one.data_ptr()  # never the input itself


def test_mse_observer_error_is_the_fixed_order_sum_per_group():
    """The MSE range search compares candidates by `fixed_sum_over` sums: the kept shape of `.sum(dims)` and its
    value (float64 reference) for per-tensor, per-channel and ragged per-group specs."""
    from qat.observers import MSEObserver
    from qat.primitives import choose_qparams, compute_range, fake_quantize_forward, group_view, reduce_dims
    from qat.primitives import strip_leading_ones
    from qat.spec import QuantSpec
    w = torch.randn(64, 200, generator=torch.Generator().manual_seed(3))
    for spec in (QuantSpec(bits=4, granularity="per_tensor"), QuantSpec(bits=4, granularity="per_channel"),
                 QuantSpec(bits=3, granularity="per_group", group_size=32, symmetric=False, ragged=True)):
        lo, hi = compute_range(w, spec)
        err = MSEObserver(spec)._error(w, lo * 0.9, hi * 0.9, spec)
        x_hat, _ = fake_quantize_forward(w, *choose_qparams(lo * 0.9, hi * 0.9, spec), spec)
        view = group_view((x_hat - w).double().pow(2), spec, pad="zero")
        want = strip_leading_ones(view.sum(reduce_dims(view.ndim, spec), keepdim=True))
        assert err.shape == want.shape, spec
        assert torch.allclose(err.double(), want, rtol=1e-5), spec
