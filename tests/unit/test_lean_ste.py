"""The memory-lean STE (`qat.ste.fake_quant_linear`, FakeQuantLinear.lean): the same outputs and the same
gradients (atol=0) as the unfused path for every estimator, and nothing weight-sized saved for backward."""
import warnings

import pytest
import torch
from torch import nn

import qat
from qat.modules.fake import FakeQuantLinear
from qat.spec import QuantSpec, TensorSchemes

W4G = dict(bits=4, granularity="per_group", group_size=16)
CASES = {
    "w4_g16_ste": TensorSchemes(weight=QuantSpec(**W4G)),
    "w4_g16_asym_ste": TensorSchemes(weight=QuantSpec(**W4G, symmetric=False)),
    "w4_ragged_ste": TensorSchemes(weight=QuantSpec(bits=4, granularity="per_group", group_size=24, ragged=True)),
    "w4_g16_lsq": TensorSchemes(weight=QuantSpec(**W4G, learn="lsq")),
    "w4_lsq_plus": TensorSchemes(weight=QuantSpec(**W4G, symmetric=False, learn="lsq_plus")),
    "w4_channel_lsq": TensorSchemes(weight=QuantSpec(bits=4, learn="lsq")),
    "w4a8_dynamic_token": TensorSchemes(weight=QuantSpec(**W4G),
                                        input=QuantSpec(bits=8, granularity="per_token", dynamic=True)),
    "w4a8_static_pact": TensorSchemes(weight=QuantSpec(**W4G, learn="lsq"),
                                      input=QuantSpec(bits=8, granularity="per_tensor", learn="pact")),
    "a8_static_lsq_asym": TensorSchemes(input=QuantSpec(bits=8, granularity="per_tensor", symmetric=False,
                                                        learn="lsq_plus")),
    "w8_fp8": TensorSchemes(weight=QuantSpec(bits=8, dtype="fp8_e4m3", granularity="per_channel")),
}


def run(schemes, lean: bool, x_shape, bias: bool):
    torch.manual_seed(0)
    linear = nn.Linear(48, 40, bias=bias)
    fq = FakeQuantLinear.from_float(linear, schemes)
    fq.lean = lean
    x = (torch.randn(*x_shape) * 2).requires_grad_()
    fq(x)  # a first batch initialises static input ranges (as range initialisation would)
    y = fq(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()  # a gradient that differs per output
    grads = {n: p.grad for n, p in fq.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("x_shape", [(6, 48), (2, 5, 48)], ids=["2d", "3d"])
@pytest.mark.parametrize("name", list(CASES))
def test_lean_matches_unfused_exactly(name, x_shape, bias):
    y0, dx0, g0 = run(CASES[name], False, x_shape, bias)
    y1, dx1, g1 = run(CASES[name], True, x_shape, bias)
    assert torch.equal(y0, y1)
    assert torch.equal(dx0, dx1)
    assert g0.keys() == g1.keys() and "weight" in g0
    for key in g0:
        assert torch.equal(g0[key], g1[key]), key


@pytest.mark.parametrize("name", ["w4_g16_lsq", "w4a8_dynamic_token", "w4a8_static_pact"])
def test_lean_matches_unfused_under_bf16_autocast(name):
    """bf16-mixed training: backward repeats autocast's casts, so the gradients are still those of the unfused path."""
    out = []
    for lean in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.append(run(CASES[name], lean, (2, 5, 48), True))
    (y0, dx0, g0), (y1, dx1, g1) = out
    assert y0.dtype == torch.bfloat16 and torch.equal(y0, y1) and torch.equal(dx0, dx1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)


def saved_bytes(lean: bool) -> int:
    """Bytes of the tensors autograd keeps for backward, counted once each, parameters excluded."""
    fq = FakeQuantLinear.from_float(nn.Linear(256, 256, bias=False), CASES["w4a8_dynamic_token"])
    fq.lean = lean
    params = {p.data_ptr() for p in fq.parameters()}
    x = torch.randn(4, 256, requires_grad=True)
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params and t.data_ptr() != x.data_ptr():
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fq(x).sum().backward()
    return sum(seen.values())


def test_lean_keeps_no_fake_quantized_copy():
    assert saved_bytes(False) >= 256 * 256 * 4  # the fake-quantized weight (fp32) and its mask
    assert saved_bytes(True) == 256 * (256 // 16) * 4 + 4 * 4  # only the qparams: per-group, per-token scales


def test_set_lean_ste_switches_every_linear():
    model = qat.prepare(qat.testing.tiny_llama(num_layers=1), qat.load_recipe("w4a16_g128").to_dict())
    n = qat.set_lean_ste(model, False)
    assert n > 0 and not any(m.lean for m in model.modules() if isinstance(m, FakeQuantLinear))
    assert qat.set_lean_ste(model, True) == n


def _recipe():
    spec = QuantSpec(bits=4, granularity="per_channel")
    w = torch.randn(8, 16, requires_grad=True)
    args = qat.ste.FakeQuantArgs(w.detach().abs().amax(1, keepdim=True) / 7, None, spec)
    return w, args


class _NoStorage(torch.Tensor):
    """A wrapper-like tensor subclass whose storage cannot be read (as DTensor's)."""

    def untyped_storage(self):
        raise RuntimeError("no storage")


def test_recomputing_saved_views_passes_storage_less_tensors_on():
    """A saved tensor without an accessible storage is not a view of x^: it goes to the outer hook, unchanged."""
    w, args = _recipe()
    w_hat, recipe = qat.ste.lean_fake_quantize(w, args)
    other = torch.randn(8, 16).as_subclass(_NoStorage)
    outer = []

    def pack(t):
        outer.append(type(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with qat.ste.recomputing_saved_views([recipe]):
            loss = (w_hat * other).sum() + (w_hat * w_hat).sum()
    assert _NoStorage in outer and recipe.packs == 2  # w_hat * w_hat: both saved as the recipe
    loss.backward()
    want = args.apply(w)
    ref_w = w.detach().clone().requires_grad_(True)
    ((args.apply(ref_w) * other.as_subclass(torch.Tensor)).sum() + (args.apply(ref_w) ** 2).sum()).backward()
    assert torch.equal(w.grad, ref_w.grad) and torch.equal(w_hat, want)
    assert recipe.recomputations == 1 and recipe.value is None


def test_recomputing_saved_views_warns_once_without_the_hook_accessors(monkeypatch):
    """A torch without the private accessors: same gradients, the kernel's own saving, and one warning a process."""
    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    monkeypatch.setattr(qat.ste.lean, "_warned", False)  # the warn-once flag lives beside the hook
    w, args = _recipe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            w_hat, recipe = qat.ste.lean_fake_quantize(w, args)
            with qat.ste.recomputing_saved_views([recipe]):
                loss = (w_hat * w_hat).sum()
            assert recipe.packs == 0
            loss.backward()
    assert [str(c.message) for c in caught if "no memory saving" in str(c.message)] == [str(caught[0].message)]
    assert len(caught) == 1
