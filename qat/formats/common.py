"""Helpers the formats share: division by a constant on every device, the signed peak of a block, llama.cpp's
roundf, fp16 bytes."""
from __future__ import annotations

import torch

HALF_DOWN = 0.5 - 2.0**-25  # the float32 just below 0.5
"""trunc(t + HALF_DOWN * sign(t)) is roundf(t) (half away from zero) for every float32 t, checked exhaustively
(t + 0.5 would round up at t = 0.49999997). torch's trunc, where and argmax are slow scalar loops on CPU;
float -> int8 conversion truncates and is vectorised, so the grids are written with it."""


def divide(x: torch.Tensor, d: float) -> torch.Tensor:
    """x / d for a Python number d, the same bits on every device: the one way the formats divide by a constant.

    On the CPU `x / d` divides (d rounded to x's compute type: float32 for float32, bfloat16 and float16, float64
    for float64; the quotient rounded once to x's dtype). On CUDA torch computes `tensor / python_number` as
    x * (1 / d), two roundings, one bit off at times (seen on an H200: scales amax / 7.5 one ulp apart, so
    fake-quantized weights differed from the CPU's); a 0-dim divisor on x's device makes it divide as the CPU does.

    Example:
        >>> divide(torch.tensor([1.0, 3.0]), 7.5)
        tensor([0.1333, 0.4000])
    """
    if x.device.type == "cpu" or not x.is_floating_point():
        return x / d
    return divide_by_tensor(x, d)


def fixed_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension, kept, added in one fixed order on every device: pairwise, the first half plus
    the second (an odd element carried to the next round), so each step is an element-wise IEEE addition.

    `torch.sum` adds in an order each device (and vector width) chooses, so block sums differ in the last bits
    between the CPU and CUDA, and a search that compares candidates by such sums (the K-quant and IQ4 scale
    searches) can pick another candidate. float32 in, float32 out: callers upcast lower precisions first.

    Example:
        >>> fixed_sum(torch.tensor([[1.0, 2.0, 3.0]]))
        tensor([[6.]])
    """
    if x.shape[-1] <= 1:  # nothing to add: a new tensor all the same (callers write into their inputs' buffers)
        return x.clone() if x.shape[-1] else x.new_zeros(*x.shape[:-1], 1)
    while x.shape[-1] > 1:
        n = x.shape[-1]
        h = n // 2
        head = x[..., :h] + x[..., h:2 * h]
        x = torch.cat([head, x[..., 2 * h:]], -1) if n % 2 else head
    return x


def fixed_sum_over(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """`fixed_sum` over several dimensions, kept (as `x.sum(dims, keepdim=True)`): they are moved last and
    flattened, then added in `fixed_sum`'s one order."""
    dims = tuple(d % x.ndim for d in dims)
    keep = [d for d in range(x.ndim) if d not in dims]
    flat = x.permute(*keep, *dims).reshape(*[x.shape[d] for d in keep], -1)
    return fixed_sum(flat).reshape([1 if d in dims else x.shape[d] for d in range(x.ndim)])


def mean_square(x: torch.Tensor) -> torch.Tensor:
    """mean(x^2) over the last dimension, kept: `fixed_sum` divided by the count (`divide`), the same bits on every
    device (CUDA's `mean` also multiplies the sum by 1 / count rather than dividing)."""
    return divide(fixed_sum(x * x), x.shape[-1])


def divide_by_tensor(x: torch.Tensor, d: float) -> torch.Tensor:
    """`divide` off the CPU: x / d with d a 0-dim tensor of x's compute type on x's device, which every device
    divides (tests/unit/test_divide.py: equal to the CPU's `x / d`, bit for bit, for each float dtype)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    # torch.full, not torch.tensor: a host-to-device copy of a Python number would synchronise the stream
    return (x.to(compute) / torch.full((), d, dtype=compute, device=x.device)).to(x.dtype)


def signed_peak(view: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude with its sign, per block of `view` [..., n] -> [..., 1]: the first
    one when +m and -m tie (and the first zero of an all-zero block, keeping its sign), as
    `view.gather(-1, view.abs().argmax(-1, keepdim=True))` (numpy's and llama.cpp's choice), ~10x faster.

    Example:
        >>> signed_peak(torch.tensor([[1.0, -3.0, 3.0]]))
        tensor([[-3.]])
    """
    hi, lo = view.amax(-1, keepdim=True), view.amin(-1, keepdim=True)
    peak = torch.where(hi > -lo, hi, lo)
    tie = hi == -lo
    if not view.is_meta and bool(tie.any()):  # only these blocks need the first index (meta: shapes only)
        rows = view[tie.squeeze(-1)]
        peak[tie] = rows.gather(-1, rows.abs().argmax(-1, keepdim=True)).squeeze(-1)
    return peak


def safe_inverse(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, and 0 where the scale is 0 (as gguf-py)."""
    return torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)


def half_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp16 bytes of a [..., 1] float tensor: [..., 2] uint8."""
    return t.to(torch.float16).contiguous().view(torch.uint8)


def block_range(view: torch.Tensor, peak: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) per block of `view` [..., n_blocks, group]: the signed peak twice (`peak`), else min and max;
    what `qat.primitives.compute_range` gives on that view."""
    if peak:
        p = signed_peak(view)
        return p, p.clone()
    return view.amin(-1, keepdim=True), view.amax(-1, keepdim=True)


def run_sums(err: torch.Tensor, per: int) -> torch.Tensor:
    """Per-group values [..., n_groups, 1] -> each group given the sum over its run of `per` consecutive groups (a
    super-block; a shorter last run where `per` does not divide n_groups), same shape: what a range search
    compares when the format derives the run's qparams together (`qat.formats.base.Format.shared_error`)."""
    n = err.shape[-2]
    flat = err.reshape(*err.shape[:-2], n)
    pad = -n % per
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    sums = fixed_sum(flat.unflatten(-1, (-1, per))).expand(*flat.shape[:-1], -1, per)
    return sums.reshape(*flat.shape[:-1], n + pad)[..., :n].reshape(err.shape)


def encode_rows(fmt, spec, w: torch.Tensor, block: int, pack, values: bool = True):
    """A GGUF type's encoder for a block format quantizing rows of `w` in blocks of `block` with scales from each
    block's range: (`pack(codes, scale)`, and when `values` the values the blocks mean)."""
    view = w.reshape(w.shape[0], -1, block)
    scale = fmt.qparams(view.amin(-1, keepdim=True), view.amax(-1, keepdim=True), spec)[0]
    codes, _ = fmt.codes(view, scale, None, spec)
    blocks = pack(codes.reshape(w.shape), scale)
    return blocks, fmt.values(codes, scale, None, spec).reshape(w.shape) if values else None
