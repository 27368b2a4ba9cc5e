"""Range estimators (observers), selected by name: minmax, moving_average, percentile, mse.

An observer turns tensors into a (lo, hi) range in the qparams layout of `qat.primitives`.
`range_of(x)` is stateless (used for weights and dynamic ranges); `update(x)` folds a tensor into the
held range (used for static activation ranges during calibration), and `lo` / `hi` are buffers, so
they are saved in checkpoints.

Example:
    >>> obs = build_observer(QuantSpec(bits=8, granularity="per_tensor", observer="percentile"))
    >>> obs.update(torch.randn(1000)); lo, hi = obs.lo, obs.hi
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from qat.errors import ConfigError
from qat.formats import Format, get_format
from qat.formats.common import fixed_sum_over, signed_peak
from qat.primitives import (
    reduce_dims, choose_qparams, compute_range, fake_quantize_forward, group_view, strip_leading_ones,
)
from qat.spec import SPEC_OBSERVERS

log = logging.getLogger(__name__)
OBSERVERS: dict[str, type["Observer"]] = {}


def register_observer(name: str) -> Callable[[type], type]:
    """Register an Observer class under `name` (QuantSpec.observer), for `QuantSpec`'s checks too."""
    def deco(cls: type) -> type:
        OBSERVERS[name] = cls
        SPEC_OBSERVERS[name] = build_observer  # QuantSpec checks observer_args by building one
        cls.name = name
        return cls

    return deco


def build_observer(spec, source: str = "recipe") -> "Observer":
    """The observer named by `spec.observer`, with `spec.observer_args` as its keyword arguments.

    Args:
        source: where the observer was chosen, for the hints of its warnings: "recipe" (the scheme's own) or
            "method" (a PTQ method's `method.observer` override).
    Raises:
        KeyError: an unknown observer name, listing the registered ones.
        ValueError: an observer argument it does not take.
    """
    if spec.observer not in OBSERVERS:
        raise KeyError(f"observer {spec.observer!r}; registered: {sorted(OBSERVERS)}")
    cls = OBSERVERS[spec.observer]
    try:
        observer = cls(spec, **spec.observer_args)
    except TypeError as err:
        raise ConfigError(f"observer {spec.observer!r} got bad observer_args {dict(spec.observer_args)}: {err}") from None
    observer.source = source
    return observer


class Observer(nn.Module):
    """Base: min-max combination of per-tensor estimates; subclasses change `range_of` or `combine`."""

    name = "base"
    source = "recipe"  # where it was chosen (`build_observer`)

    def __init__(self, spec) -> None:
        super().__init__()
        self.spec = spec
        self.scheme = spec.describe()  # what its warnings name (a static-global quantizer names its own scheme)
        self.register_buffer("lo", torch.empty(0))
        self.register_buffer("hi", torch.empty(0))

    @property
    def initialized(self) -> bool:
        return self.lo.numel() > 0

    def range_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return compute_range(x, self.spec)

    def combine(self, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    @torch.no_grad()
    def update(self, x: torch.Tensor, accumulate: bool = True) -> None:
        lo, hi = self.range_of(x.detach())
        if accumulate and self.initialized:
            lo, hi = self.combine(lo, hi)
        self.lo, self.hi = lo.clone(), hi.clone()

    def reset(self) -> None:
        self.lo, self.hi = torch.empty(0, device=self.lo.device), torch.empty(0, device=self.hi.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("lo", "hi"):  # held ranges are shaped by the data they saw: take the saved shape
            if prefix + key in state_dict:
                setattr(self, key, torch.empty_like(state_dict[prefix + key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_observer("minmax")
class MinMaxObserver(Observer):
    """Running minimum and maximum."""


@register_observer("moving_average")
class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max (torch.ao's MovingAverageMinMaxObserver)."""

    def __init__(self, spec, momentum: float = 0.01) -> None:
        super().__init__(spec)
        if not 0.0 < momentum <= 1.0:
            raise ConfigError(f"moving_average.momentum={momentum}; choose a value in (0, 1]")
        self.momentum = momentum

    def combine(self, lo, hi):
        m = self.momentum
        return self.lo + m * (lo - self.lo), self.hi + m * (hi - self.hi)


def _blocks_last(x: torch.Tensor, spec) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Move each block's elements into the last dim: returns [..., n] and the keepdim shape."""
    view = group_view(x, spec).float()
    dims = reduce_dims(view.ndim, spec)
    keep = [d for d in range(view.ndim) if d not in dims]
    keep_shape = tuple(view.shape[d] if d in keep else 1 for d in range(view.ndim))
    return view.permute(*keep, *dims).reshape(*[view.shape[d] for d in keep], -1), keep_shape


_NO_CLIP_WARNED: set[tuple[str, float, int, str]] = set()
# how to lower the percentile, by where the observer was chosen (`build_observer`'s source)
_CLIP_HINTS = {"recipe": "set observer_args: {percentile: 90} on that scheme in the recipe",
               "method": "qat-ptq method=rtn method.observer=percentile +method.observer_args.percentile=90"}


def reset_warnings() -> None:
    """Forget which once-only warnings were given: a job calls it when it starts, so each job of a Hydra multirun
    (one process) logs its own."""
    _NO_CLIP_WARNED.clear()


def warn_no_clip(spec, percentile: float, n: int, source: str = "recipe") -> None:  # spec: a QuantSpec or its name
    """Warn (once per scheme, percentile, block size and source, until `reset_warnings`) that `percentile` keeps
    the maximum of every block of `n` values, so the percentile observer is min-max there: 99.99 clips nothing on
    blocks of <= 5000 values, i.e. on every block format (MX / NVFP4 / GGUF blocks of 16 or 32) and most
    per-channel / per-token rows. The hint is the route that applies to `source` (the recipe, or method.observer)."""
    scheme = spec if isinstance(spec, str) else spec.describe()
    key = (scheme, percentile, n, source)
    if key in _NO_CLIP_WARNED:
        return
    _NO_CLIP_WARNED.add(key)
    log.warning("percentile observer: percentile=%g keeps the maximum of every block of %d values (%s), so it is "
                "min-max here; clip with a percentile below %.4g, e.g. %s", percentile, n, scheme,
                100.0 * (n - 0.5) / n, _CLIP_HINTS.get(source, _CLIP_HINTS["recipe"]))


@register_observer("percentile")
class PercentileObserver(Observer):
    """Range from the low and high percentiles of each block (drops outliers); running min/max across batches.
    Formats that scale from a block's signed peak get the percentile of its magnitudes, with the peak's sign."""

    def __init__(self, spec, percentile: float = 99.99) -> None:
        super().__init__(spec)
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile.percentile={percentile}; choose a value in (50, 100]")
        self.percentile = percentile

    def range_of(self, x):
        blocks, keep_shape = _blocks_last(x, self.spec)
        n = blocks.shape[-1]
        k_hi = max(1, min(n, round(n * self.percentile / 100.0)))  # exact: Python numbers
        k_lo = max(1, n + 1 - k_hi)
        if k_hi == n and self.percentile < 100.0:
            warn_no_clip(self.scheme, self.percentile, n, self.source)
        if get_format(self.spec).peak_range(self.spec):
            # formats that scale from the signed peak (Q4_0, Q3_K, Q6_K, IQ4_NL / IQ4_XS) read lo == hi == it: the
            # percentile of the magnitudes, with the peak's sign (the signed peak itself at 100)
            mag = blocks.abs().kthvalue(k_hi, dim=-1, keepdim=True).values
            peak = mag.copysign(signed_peak(blocks)).reshape(keep_shape)
            return strip_leading_ones(peak), strip_leading_ones(peak.clone())
        lo = blocks.kthvalue(k_lo, dim=-1).values.reshape(keep_shape)
        hi = blocks.kthvalue(k_hi, dim=-1).values.reshape(keep_shape)
        return strip_leading_ones(lo), strip_leading_ones(hi)


@register_observer("mse")
class MSEObserver(Observer):
    """Grid search over clipping ratios of the min-max range, per block, minimising |x - x^|^norm.

    Each candidate is quantized with the spec itself (its format's qparams: E8M0 / E4M3 block scales, GGUF
    super-block scales, FP8 128 x 128 blocks), so block grids search on their own values. Where a format derives
    qparams from several groups' ranges together (`Format.shared_error`: K-quant and IQ4_XS super-blocks, FP8
    bands of rows), the per-group choice is re-quantized jointly and compared, per such unit, with the best single
    ratio for the whole unit (min-max among the candidates): no unit ends up worse than min-max.

    Args:
        grid: number of ratios tried, evenly spaced in [1 - max_shrink, 1].
        max_shrink: the smallest ratio is 1 - max_shrink.
        norm: the error exponent (GPTQ's MSE search uses 2.4).
    """

    def __init__(self, spec, grid: int = 20, max_shrink: float = 0.5, norm: float = 2.0) -> None:
        super().__init__(spec)
        if grid < 1 or not 0.0 <= max_shrink < 1.0:
            raise ConfigError(f"mse: grid={grid} (>= 1), max_shrink={max_shrink} (in [0, 1)) out of range")
        self.grid, self.max_shrink, self.norm = grid, max_shrink, norm

    def range_of(self, x):
        lo, hi = compute_range(x, self.spec)
        x = x.detach().float()
        spec = self.spec if self.spec.learn == "none" else self.spec.replace(learn="none")  # held qparams, as given
        fmt = get_format(spec)
        group = unit = (lo, hi)  # the best range per group, and per shared unit (one ratio for the unit)
        group_err = unit_err = None
        for i in range(self.grid):
            ratio = 1.0 - self.max_shrink * i / max(self.grid - 1, 1)
            cand = (lo * ratio, hi * ratio)
            err = self._error(x, *cand, spec)
            shared = fmt.shared_error(err, spec)
            if group_err is None:
                group, unit, group_err, unit_err = cand, cand, err, shared
                continue
            better, unit_better = err < group_err, shared < unit_err
            group = tuple(torch.where(better, c, b) for c, b in zip(cand, group))
            unit = tuple(torch.where(unit_better, c, b) for c, b in zip(cand, unit))
            group_err, unit_err = torch.where(better, err, group_err), torch.where(unit_better, shared, unit_err)
        if type(fmt).shared_error is Format.shared_error:  # every group's qparams are its own: group is exact
            return group
        joint = fmt.shared_error(self._error(x, *group, spec), spec)  # the per-group choice, re-quantized together
        take = joint <= unit_err
        return tuple(torch.where(take, g, u) for g, u in zip(group, unit))

    def _error(self, x, lo, hi, spec):
        """|x - x^|^norm summed per group (qparams layout) for the range (lo, hi)."""
        x_hat, _ = fake_quantize_forward(x, *choose_qparams(lo, hi, spec), spec)
        dims = reduce_dims(group_view(x, spec).ndim, spec)
        # a ragged last group is padded with zeros here: the padding adds no error; the candidates are compared by
        # these sums, so they are added in one order on every device (fixed_sum_over)
        err = fixed_sum_over(group_view(x_hat.sub_(x).abs_().pow_(self.norm), spec, pad="zero"), dims)
        return strip_leading_ones(err)
