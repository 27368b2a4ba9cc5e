"""The memory-lean straight-through estimators: the same values and gradients as `qat.ste.estimators`, but
backward recomputes x^ and its mask from x and the qparams instead of keeping them (`fake_quant_linear` for
FakeQuantLinear, `lean_fake_quantize` + `recomputing_saved_views` for kernels qat does not own: fused MoE experts).
See `qat.ste`'s docstring for the gradients.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from qat.primitives import fake_quantize_forward
from qat.ste.estimators import FakeQuantArgs, learned_grads, masked_grad


def _requantize(t: torch.Tensor, q: FakeQuantArgs | None, scale, zero_point, need_mask: bool):
    if q is None:
        return t, None
    return fake_quantize_forward(t, scale, zero_point, q.spec, need_mask, q.g_idx)


def _input_grads(grad_q, t, t_q, mask, q: FakeQuantArgs | None, scale, zero_point, in_place: bool = True):
    """(dt, dscale, dzero_point) from the gradient of the fake-quantized tensor: the same formulas as the
    unfused estimators' backward (`qat.ste.estimators`). `in_place`: grad_q is the caller's own temporary."""
    if q is None or grad_q is None:
        return grad_q, None, None
    if q.mode == "ste":  # grad_q is this backward's own temporary: masked in place, one weight-sized tensor less
        return masked_grad(grad_q, mask, in_place=in_place), None, None
    return learned_grads(grad_q, t, t_q, mask, scale, zero_point is not None, q.spec, q.mode, q.grad_scale)


class _FakeQuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, x_scale, x_zero, w_scale, w_zero, xq, wq):
        x_hat = _requantize(x, xq, x_scale, x_zero, False)[0]
        w_hat = _requantize(weight, wq, w_scale, w_zero, False)[0]
        ctx.xq, ctx.wq = xq, wq
        ctx.bias_dtype = None if bias is None else bias.dtype
        device = x.device.type
        # under autocast F.linear runs in the autocast dtype; backward repeats its casts (not kept either)
        ctx.cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.save_for_backward(x, weight, x_scale, x_zero, w_scale, w_zero)
        return F.linear(x_hat, w_hat, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, x_scale, x_zero, w_scale, w_zero = ctx.saved_tensors
        needs = ctx.needs_input_grad
        x_hat, x_mask = _requantize(x, ctx.xq, x_scale, x_zero, needs[0] or needs[3] or needs[4])
        w_hat, w_mask = _requantize(weight, ctx.wq, w_scale, w_zero, needs[1] or needs[5] or needs[6])
        # the matmuls autograd runs for F.linear (mm's backward on the folded [tokens, features] view)
        g2 = grad.reshape(-1, grad.shape[-1])
        cast = ctx.cast or g2.dtype
        grad_xq = g2.mm(w_hat.to(cast)).reshape(x.shape).to(x.dtype) if needs[0] or needs[3] or needs[4] else None
        grad_wq = (g2.t().mm(x_hat.reshape(-1, x_hat.shape[-1]).to(cast)).to(weight.dtype)
                   if needs[1] or needs[5] or needs[6] else None)
        grad_b = g2.sum(0).to(ctx.bias_dtype) if needs[2] else None
        gx, gxs, gxz = _input_grads(grad_xq, x, x_hat, x_mask, ctx.xq, x_scale, x_zero)
        gw, gws, gwz = _input_grads(grad_wq, weight, w_hat, w_mask, ctx.wq, w_scale, w_zero)
        return gx, gw, grad_b, gxs, gxz, gws, gwz, None, None


def fake_quant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      x_args: FakeQuantArgs | None, w_args: FakeQuantArgs | None) -> torch.Tensor:
    """linear(fake_quant(x), fake_quant(weight), bias) with the memory-lean STE.

    Values and gradients are those of `F.linear(x_args.apply(x), w_args.apply(weight), bias)`; backward
    recomputes the fake-quantized tensors and masks from x, weight and the qparams instead of keeping them
    (one extra fake-quant pass per tensor in backward; no weight-sized or input-sized copy held in between).
    None for either args: that tensor is used as it is.

    Example:
        >>> spec = QuantSpec(bits=4, granularity="per_tensor")
        >>> w = torch.randn(8, 16, requires_grad=True)
        >>> y = fake_quant_linear(torch.randn(2, 16), w, None, None, FakeQuantArgs(torch.tensor(0.1), None, spec))
    """
    def parts(q):
        return (None, None) if q is None else (q.scale, q.zero_point)
    return _FakeQuantLinear.apply(x, weight, bias, *parts(x_args), *parts(w_args), x_args, w_args)


class Requantized:
    """x^ and its inside-mask recomputed in backward from x and the qparams (the lean STE's recipe), once per
    backward: shared by the saved-view unpacks of `recomputing_saved_views` and by `lean_fake_quantize`'s
    backward. Released after its last use in a backward (the last saved view's unpack, or the STE's backward when
    the weight or its qparams need grad), and at the latest when that backward ends (a partial backward, say
    `torch.autograd.grad` for other inputs, skips some uses). Holds no copy of x^ between forward and backward:
    only references to x (a parameter view: alive anyway) and the qparams. `recomputations` counts the passes."""

    def __init__(self, x: torch.Tensor, args: FakeQuantArgs, need_mask: bool) -> None:
        self.x, self.args, self.need_mask = x, args, need_mask
        self.version = x._version
        self.value: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.layout: tuple | None = None  # (data_ptr, storage offset, stride, dtype) of the forward's x^
        self.keep = True  # the STE's backward uses it too (False: frozen x and qparams, no STE backward runs)
        self.packs = 0  # saved views of x^ (one use each per backward)
        self.used = 0  # uses in the current backward
        self.recomputations = 0

    def get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x^, mask), recomputed on first use after forward or after `release`."""
        if self.value is None:
            if self.x._version != self.version:
                raise RuntimeError("lean STE: a fake-quantized tensor's float source was modified in place between "
                                   "forward and backward; its recomputation would differ (set_lean_ste(model, False))")
            q = self.args
            zero = None if q.zero_point is None else q.zero_point.detach()
            with torch.no_grad():
                self.value, self.mask = fake_quantize_forward(self.x.detach(), q.scale.detach(), zero, q.spec,
                                                              self.need_mask, q.g_idx)
            self.recomputations += 1
            _at_backward_end(self.release)
        return self.value, self.mask

    def use(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`get` for one of this backward's uses; releases after the last."""
        value, mask = self.get()
        self.used += 1
        if self.used >= self.packs + self.keep:
            self.release()
        return value, mask

    def release(self) -> None:
        """Drop the recomputation (a backward's use that follows recomputes it) and start the use count anew."""
        self.value = self.mask = None
        self.used = 0


def _at_backward_end(fn) -> None:
    """Run fn when the running backward ends (torch's engine callback; nothing outside a backward)."""
    queue = getattr(getattr(torch.autograd.Variable, "_execution_engine", None), "queue_callback", None)
    if queue is None:
        return
    try:
        queue(fn)
    except RuntimeError:  # not inside a backward (a saved tensor read directly): nothing to free it at
        pass


class _LeanFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, cache):
        q = cache.args
        out = fake_quantize_forward(x, scale, zero_point, q.spec, False, q.g_idx)[0]
        cache.layout = (out.untyped_storage().data_ptr(), out.storage_offset(), out.stride(), out.dtype)
        # frozen weight and qparams: no backward of this function will run to free the recomputation
        cache.keep = any(ctx.needs_input_grad[:3])
        ctx.cache = cache
        ctx.save_for_backward(x, scale, zero_point)  # seen by outer hooks (checkpointing); x is the parameter
        return out

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        x_hat, mask = ctx.cache.use()  # the last use: every consumer of x^ ran its backward before
        gx, gs, gz = _input_grads(grad, x, x_hat, mask, ctx.cache.args, scale, zero_point, in_place=False)
        return gx, gs, gz, None


def lean_fake_quantize(x: torch.Tensor, args: FakeQuantArgs) -> tuple[torch.Tensor, Requantized]:
    """`args.apply(x)` (same values, same gradients for x and learned qparams) with the memory-lean STE: neither
    x^ nor its mask is kept for backward, which recomputes them. Returns x^ and its `Requantized` recipe, to hand
    to `recomputing_saved_views` around the code that consumes x^.

    Example:
        >>> x_hat, recipe = lean_fake_quantize(w, quantizer.fake_quant_args(w))
    """
    cache = Requantized(x, args, need_mask=True)
    if args.mode == "ste":
        return _LeanFakeQuant.apply(x, args.scale.detach(), None if args.zero_point is None else
                                    args.zero_point.detach(), cache), cache
    return _LeanFakeQuant.apply(x, args.scale, args.zero_point, cache), cache


def _storage_ptr(t: torch.Tensor) -> int | None:
    """The data pointer of t's storage; None for a wrapper subclass without one (DTensor, say): never x^."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


_warned = False


def _warn_no_saving() -> None:
    global _warned  # once per process: every experts forward would repeat it
    if not _warned:
        _warned = True
        warnings.warn(f"qat: torch {torch.__version__} lacks the saved-tensor-hook accessors that the fused experts' "
                      "lean STE uses; their kernels save the fake-quantized weights as the unfused STE does (same "
                      "gradients, no memory saving)", RuntimeWarning, stacklevel=3)


class _SavedView:
    __slots__ = ("cache", "size", "stride", "offset")

    def __init__(self, cache: Requantized, t: torch.Tensor) -> None:
        self.cache, self.size, self.stride = cache, t.size(), t.stride()
        self.offset = t.storage_offset() - cache.layout[1]
        cache.packs += 1

    def unpack(self) -> torch.Tensor:
        value = self.cache.use()[0]  # after the last use this unpack's view holds it as long as its node needs it
        if value.stride() != self.cache.layout[2]:
            raise RuntimeError(f"lean STE: the recomputed fake-quantized tensor has strides {value.stride()}, the "
                               f"forward's had {self.cache.layout[2]}; set_lean_ste(model, False) for this module")
        return value.as_strided(self.size, self.stride, value.storage_offset() + self.offset)


@contextmanager
def recomputing_saved_views(recipes: list[Requantized]):
    """Inside the block, a tensor saved for backward that is x^ of one of `recipes` (the output of
    `lean_fake_quantize`) or a view of it is kept as the recipe plus the view's geometry, and recomputed when the
    backward unpacks it; every other saved tensor goes to the hooks already active (a byte counter, activation
    checkpointing) as before. So a kernel qat does not own (transformers' experts) keeps no fake-quantized weight
    between forward and backward. x^ must be alive through the block (it is: the caller holds it) and is laid
    out in backward as in forward (same code, same strides). A no-op where grad is off.

    Example:
        >>> w_hat, recipe = lean_fake_quantize(w, args)
        >>> with recomputing_saved_views([recipe]):
        ...     y = kernel(x, w_hat)
    """
    # torch's own accessors (no public ones): the hooks active now, to chain to; whether hooks may be pushed
    # (torch.func transforms disable them: the block then saves what the kernel saves). A torch without them
    # gets the same gradients, only without the memory saving.
    autograd = torch._C._autograd
    enabled = getattr(autograd, "_saved_tensors_hooks_is_enabled", None)
    top = getattr(autograd, "_top_saved_tensors_default_hooks", None)
    if recipes and (enabled is None or top is None):
        _warn_no_saving()
    if not torch.is_grad_enabled() or not recipes or enabled is None or top is None or not enabled():
        yield
        return
    by_ptr = {r.layout[0]: r for r in recipes}
    outer = top(False)

    def pack(t):
        recipe = by_ptr.get(_storage_ptr(t)) if t.numel() else None
        if recipe is not None and t.dtype == recipe.layout[3]:
            return _SavedView(recipe, t)
        return t if outer is None else (outer[1], outer[0](t))

    def unpack(packed):
        if isinstance(packed, _SavedView):
            return packed.unpack()
        if isinstance(packed, torch.Tensor):
            return packed
        unpack_outer, inner = packed
        return unpack_outer(inner)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
