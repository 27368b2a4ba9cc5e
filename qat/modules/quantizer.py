"""`TensorQuantizer`: the state of one quantized tensor role (ranges, learned scales, on/off flags)."""
from __future__ import annotations

import contextlib
import contextvars
import math

from typing import Any

import torch
from torch import nn

from qat.errors import ConfigError
from qat.formats import get_format
from qat.formats.common import divide
from qat.formats.int import half_range
from qat.observers import build_observer
from qat.primitives import choose_qparams, clip_range, compute_range, held_global_scale
from qat.spec import QuantSpec
from qat.ste import FakeQuantArgs, lsq_grad_scale, round_ste

ROLE_NAMES = ("weight", "input", "kv_cache")


_DYNAMIC_MAY_DIFFER = contextvars.ContextVar("qat_dynamic_schemes_may_differ", default=False)


@contextlib.contextmanager
def dynamic_schemes_may_differ():
    """Within it, a dynamic quantizer loads the state of a checkpoint's quantizer of another dynamic scheme (sym /
    asym, bits, group, clip_ratio): neither holds a range, so only the flags load. Held (static, learned) schemes
    must still match: qat-train's init=checkpoint starts a run under a changed activation scheme this way."""
    token = _DYNAMIC_MAY_DIFFER.set(True)
    try:
        yield
    finally:
        _DYNAMIC_MAY_DIFFER.reset(token)


def is_dynamic_scheme(scheme: str) -> bool:
    """Whether a checkpoint's recorded scheme ('int4 sym g64 dyn, fp32 scales') is a dynamic one."""
    return "dyn" in scheme.split(",")[0].split()


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor role of a module and holds the state that needs.

    State (all saved in `state_dict`, so checkpoints resume exactly):
        observer.lo / observer.hi   held ranges (static schemes);
        scale / zero_point          learned parameters (LSQ, LSQ+, PACT's clip lives in `scale` as a clip);
        enabled, observing, initialized   flags (extra state).

    Weight ranges follow the weight while `observing` (they are recomputed from the current weight each
    forward); activation ranges accumulate over batches while `observing` (calibration) and are held
    once it is switched off (frozen). Dynamic schemes compute ranges from every tensor. A `static_global`
    activation scheme (NVFP4) holds one range per tensor, the calibrated running range its global scale comes from
    (`global_scale`), and scales each tensor's blocks under that global.

    Args:
        spec: the scheme.
        role: "weight", "input" or "kv_cache".
        example: the weight itself (weights) or a tensor of the activation's trailing shape, e.g. [1, C];
            it fixes the shape of learned parameters.
    Example:
        >>> q = TensorQuantizer(QuantSpec(bits=4, granularity="per_group", group_size=32), "weight", torch.randn(8, 64))
        >>> y = q(torch.randn(8, 64))
    """

    def __init__(self, spec: QuantSpec, role: str, example: torch.Tensor) -> None:
        super().__init__()
        if role not in ROLE_NAMES:
            raise ConfigError(f"TensorQuantizer.role={role!r}; choose from {list(ROLE_NAMES)}")
        if spec.static_global and role == "weight":
            raise ConfigError(f"TensorQuantizer: static_global holds a calibrated activation global "
                              f"({spec.describe()}); a weight's global comes from the weight: leave static_global "
                              "false on weight schemes")
        self.spec, self.role = spec, role
        # its empty held range on the example's device
        self.observer = build_observer(_held_range_spec(spec)).to(example.device)
        if spec.static_global:  # its warnings name the user's scheme, not the per-tensor one it observes with
            self.observer.scheme = f"{spec.describe()} (its global's range per tensor)"
        self.enabled, self.observing, self.initialized = True, not spec.dynamic, False
        self.calibrating = False  # set by qat.calibrate: learned ranges take every batch, not just the first
        self.scale: nn.Parameter | None = None
        self.zero_point: nn.Parameter | None = None
        if spec.learn != "none":
            shape = compute_range(torch.zeros_like(example, dtype=torch.float32), spec)[0].shape
            self.scale = nn.Parameter(torch.ones(shape, device=example.device))
            if spec.learn == "lsq_plus":
                self.zero_point = nn.Parameter(torch.zeros(shape, device=example.device))
        for key in ("pinned_scale", "pinned_zero_point", "g_idx"):
            self.register_buffer(key, torch.empty(0, device=example.device))
        if role == "weight" and not spec.dynamic:
            self.initialize(example)

    # -- state -------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """A static global's range and pinned global stay float32 through a dtype cast (`model.to(torch.bfloat16)`
        after calibration): the global is one calibrated number, and rounding its range to bf16 would move it.
        Devices follow the cast as usual."""
        if not self.spec.static_global:
            return super()._apply(fn, recurse)
        held = [(self.observer, "lo"), (self.observer, "hi"), (self, "pinned_scale")]
        before = [getattr(owner, key) for owner, key in held]
        out = super()._apply(fn, recurse)
        for (owner, key), old in zip(held, before):
            new = getattr(owner, key)
            if new.dtype != old.dtype and old.dtype == torch.float32:
                setattr(owner, key, old.to(new.device))
        return out

    def get_extra_state(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "observing": self.observing, "initialized": self.initialized,
                "scheme": self.scheme()}

    def scheme(self) -> str:
        """The grid this quantizer computes on, as checkpoints record it: 'int4 sym g128, fp32 scales'."""
        return f"{self.spec.describe()}, {self.spec.scale_dtype} scales"

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.enabled, self.observing, self.initialized = state["enabled"], state["observing"], state["initialized"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._check_checkpoint(state_dict, prefix)
        for key in ("pinned_scale", "pinned_zero_point", "g_idx"):  # shaped by what was pinned
            if prefix + key in state_dict:
                setattr(self, key, torch.empty_like(state_dict[prefix + key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_checkpoint(self, state_dict, prefix: str) -> None:
        """A checkpoint of another scheme is refused here, naming the quantizer, not loaded into wrong shapes."""
        name = prefix.rstrip(".") or "quantizer"
        extra = state_dict.get(prefix + "_extra_state")
        theirs = extra.get("scheme") if isinstance(extra, dict) else None  # older checkpoints have none
        if theirs is not None and theirs != self.scheme() and not (
                _DYNAMIC_MAY_DIFFER.get() and self.spec.dynamic and is_dynamic_scheme(theirs)):
            hint = ""
            dynamic = self.spec.replace(static_global=False, dynamic=True) if self.spec.static_global else None
            if dynamic is not None and theirs == f"{dynamic.describe()}, {dynamic.scale_dtype} scales":
                hint = (" (nvfp4_w4a4's earlier dynamic form, a global per tensor: quant=nvfp4_w4a4 "
                        "quant.input.static_global=false quant.input.dynamic=true)")
            raise ConfigError(f"{name}: the checkpoint was trained with {theirs!r}, this model is prepared with "
                             f"{self.scheme()!r}; prepare the model with the checkpoint's recipe{hint}")
        scale, zero_point = state_dict.get(prefix + "pinned_scale"), state_dict.get(prefix + "pinned_zero_point")
        if scale is None or scale.numel() == 0:
            return
        expected = self.observer.lo.shape if self.observer.initialized else None
        if expected is not None and scale.shape != expected:
            raise ConfigError(f"{name}: the checkpoint's pinned scale has shape {tuple(scale.shape)}; "
                             f"{self.spec.describe()} on this model needs {tuple(expected)}")
        if zero_point is not None and (zero_point.numel() > 0) == self.spec.symmetric:
            raise ConfigError(f"{name}: the checkpoint's pinned zero-point is {'set' if zero_point.numel() else 'missing'}, "
                             f"but this model's scheme is {self.spec.describe()}")

    @property
    def pinned(self) -> bool:
        return self.pinned_scale.numel() > 0

    @torch.no_grad()
    def set_qparams(
        self, scale: torch.Tensor, zero_point: torch.Tensor | None = None, g_idx: torch.Tensor | None = None
    ) -> None:
        """Pin the qparams (from a PTQ algorithm, say); observing stops so they are held as given.

        Learned quantizers take them as the starting value of their parameters instead (PACT's clip is
        scale * half-range). A `static_global` scheme pins its global scale (one number) as `scale`. `g_idx`
        (act-order group index, per_group weights) is held either way.

        Raises:
            ValueError: a scale whose shape differs from this quantizer's qparams layout, or a
                zero-point given to (or missing from) a scheme that does (not) have one.
        """
        if self.spec.dynamic:
            raise ConfigError(f"set_qparams: a dynamic {self.role} quantizer has no held qparams")
        if (zero_point is None) != self.spec.symmetric:
            raise ConfigError(f"set_qparams: zero_point must be {'None' if self.spec.symmetric else 'given'} "
                             f"for {self.spec.describe()}")
        expected = self.observer.lo.shape if self.observer.initialized else None
        if expected is not None and scale.shape != expected:
            raise ConfigError(f"set_qparams: scale shape {tuple(scale.shape)}; expected {tuple(expected)}")
        self.g_idx = torch.empty(0, device=scale.device) if g_idx is None else g_idx.to(torch.int64).clone()
        if self.learned:
            value = scale * half_range(self.spec) if self.spec.learn == "pact" else scale
            self.scale.copy_(value)
            if self.zero_point is not None:
                self.zero_point.copy_(zero_point)
        else:
            self.pinned_scale = scale.detach().float().clone()
            self.pinned_zero_point = (torch.empty(0, device=scale.device) if zero_point is None
                                      else zero_point.detach().float().clone())
        self.observing, self.initialized = False, True

    def group_index(self) -> torch.Tensor | None:
        """The act-order group index of a per_group weight, or None for contiguous groups."""
        return self.g_idx if self.g_idx.numel() else None

    @property
    def learned(self) -> bool:
        return self.scale is not None

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set held ranges (and learned parameters) from `x`: range initialisation."""
        if self.spec.dynamic:
            return
        before = self.observer.lo, self.observer.hi
        # checked where a range is established (calibration, first batch), not on every observed training step:
        # the check costs a device sync
        check = self.role != "weight" and (self.calibrating or not self.initialized)
        self.observer.update(x, accumulate=self.role != "weight" and self.initialized)
        if check and not bool(torch.isfinite(self.observer.hi).all() & torch.isfinite(self.observer.lo).all()):
            # a held range with inf / NaN would turn every later output into NaN, silently: keep the range it had
            self.observer.lo, self.observer.hi = before
            raise ConfigError(f"{self.role} quantizer ({self.spec.describe()}): NaN/inf value(s) in a tensor being "
                             "observed for a static range; check the calibration batches (fp16 overflow?)")
        if self.learned:
            self._init_learned()
        self.initialized = True

    def _init_learned(self) -> None:
        lo, hi = self.observer.lo, self.observer.hi
        if self.spec.learn == "pact":
            clip = torch.maximum(-lo, hi) if self.spec.signed else hi.clamp(min=0)
            self.scale.copy_(clip.expand_as(self.scale))
            return
        scale, zero_point = choose_qparams(lo, hi, self.spec)
        self.scale.copy_(scale.expand_as(self.scale))
        if self.zero_point is not None:
            self.zero_point.copy_(zero_point.expand_as(self.zero_point))

    def observe(self, x: torch.Tensor) -> None:
        """The state update a forward makes before quantizing: refresh held ranges while observing.

        Learned parameters, once initialised, are left to the optimizer, except while `calibrating`
        (qat.calibrate), when they are re-initialised from the range of every batch seen so far.
        """
        held = self.initialized and (self.pinned or (self.learned and not self.calibrating))
        if self.observing and not self.spec.dynamic and not held:
            self.initialize(x)

    # -- qparams -----------------------------------------------------------------------------
    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scale and zero-point this quantizer uses for `x` now (no state changes)."""
        if self.spec.dynamic:
            return choose_qparams(*clip_range(*self.observer.range_of(x), self.spec), self.spec)
        if not self.initialized:
            raise RuntimeError(
                f"{self.role} quantizer ({self.spec.describe()}) has no range yet: calibrate it "
                "(qat.calibrate / range initialisation) or leave observing on for the first batches"
            )
        if self.spec.static_global:
            return choose_qparams(*compute_range(x, self.spec), self.spec, global_scale=self.global_scale())
        if self.learned:
            return self._learned_qparams()
        if self.pinned:
            return self.pinned_scale, (self.pinned_zero_point if self.pinned_zero_point.numel() else None)
        return choose_qparams(self.observer.lo, self.observer.hi, self.spec)

    def global_scale(self) -> torch.Tensor:
        """The held global scale of a `static_global` scheme: pinned, or from the calibrated range (NVFP4: 448 * 6 /
        amax, what compressed-tensors stores as `input_global_scale`).

        Raises:
            ConfigError: not a static_global scheme. RuntimeError: no range yet (not calibrated).
        """
        if not self.spec.static_global:
            raise ConfigError(f"{self.role} quantizer ({self.spec.describe()}) holds no global scale (static_global)")
        if not self.initialized:
            raise RuntimeError(f"{self.role} quantizer ({self.spec.describe()}) has no range yet: calibrate it "
                               "(qat.calibrate / range initialisation) or leave observing on for the first batches")
        return self.pinned_scale if self.pinned else held_global_scale(self.observer.lo, self.observer.hi, self.spec)

    def _learned_qparams(self):
        tiny = torch.finfo(self.spec.torch_scale_dtype).tiny
        if get_format(self.spec).signed_scales:  # keep the sign, keep the magnitude off zero
            scale = torch.where(self.scale < 0, self.scale.clamp(max=-tiny), self.scale.clamp(min=tiny))
        else:
            scale = self.scale.clamp(min=tiny)
        if self.spec.learn == "pact":
            scale = divide(scale, half_range(self.spec))
        scale = get_format(self.spec).learned_scale(scale.to(self.spec.torch_scale_dtype).float(), self.spec)
        zero_point = None
        if self.zero_point is not None:
            zero_point = round_ste(self.zero_point).clamp(self.spec.qmin, self.spec.qmax)
        return scale, zero_point

    def fake_quant_args(self, x: torch.Tensor) -> FakeQuantArgs | None:
        """Observe `x` (as forward does) and return how to fake-quantize it; None when it passes through
        (disabled, or an empty batch with nothing to observe or quantize). Fused modules call this."""
        if not self.enabled or x.numel() == 0:
            return None
        self.observe(x)
        scale, zero_point = self.qparams(x)
        if self.learned:
            if self.group_index() is not None:
                raise ConfigError("learned scales with an act-order g_idx are not supported; use static groups")
            mode = "pact" if self.spec.learn == "pact" else "lsq"
            rows = get_format(self.spec).learned_scale_rows(self.spec)  # rows of the layout one parameter stands for
            return FakeQuantArgs(scale, zero_point, self.spec, mode,
                                 grad_scale=lsq_grad_scale(x, scale, self.spec) / math.sqrt(rows))  # exact: floats
        return FakeQuantArgs(scale.detach(), None if zero_point is None else zero_point.detach(), self.spec,
                             g_idx=self.group_index())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = self.fake_quant_args(x)
        return x if args is None else args.apply(x)

    def extra_repr(self) -> str:
        flags = [n for n in ("enabled", "observing", "initialized") if getattr(self, n)]
        return f"role={self.role}, {self.spec.describe()}, {'/'.join(flags)}"


def _held_range_spec(spec: QuantSpec) -> QuantSpec:
    """The scheme whose ranges the observer holds: a static_global scheme's is one per tensor (its global's, taken
    by the same observer: minmax is compressed-tensors' static_minmax), the block ranges coming from each tensor."""
    if not spec.static_global:
        return spec
    return QuantSpec(bits=8, granularity="per_tensor", observer=spec.observer, observer_args=spec.observer_args)
