"""Round-to-nearest: the prepared model's weight quantizers, their qparams computed once and pinned."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from qat.observers import build_observer
from qat.primitives import choose_qparams


@dataclass
class RTNConfig:
    """Method config of RTN (configs/method/rtn.yaml).

    Args:
        observer: weight range estimator overriding the recipe's (minmax, mse, percentile, ...); None keeps it.
        observer_args: its keyword arguments.
        min_tokens: calibration tokens needed (only used when the recipe has static activation ranges).
    """

    observer: str | None = None
    observer_args: dict[str, Any] = field(default_factory=dict)
    min_tokens: int = 0

    def __post_init__(self) -> None:
        from qat.observers import OBSERVERS

        if self.observer is not None and self.observer not in OBSERVERS:
            raise ValueError(f"rtn: observer={self.observer!r}; choose from {sorted(OBSERVERS)} (or null: the recipe's)")
        if self.min_tokens < 0:
            raise ValueError(f"rtn: min_tokens={self.min_tokens} must be >= 0")


@torch.no_grad()
def pin_rtn(module, observer: str | None = None, observer_args: dict[str, Any] | None = None) -> None:
    """Compute a FakeQuantLinear's weight qparams from its current weight and pin them.

    Args:
        module: a FakeQuantLinear (or FakeQuantEmbedding) with a weight quantizer.
        observer: an observer name to use instead of the scheme's own.
    Example:
        >>> pin_rtn(model.model.layers[0].mlp.down_proj, observer="mse")
    """
    quantizer = module.weight_quantizer
    spec = quantizer.spec
    if observer is not None:
        spec = spec.replace(observer=observer, observer_args=dict(observer_args or {}))
    lo, hi = build_observer(spec).range_of(module.weight.detach())
    scale, zero_point = choose_qparams(lo, hi, spec)
    quantizer.set_qparams(scale, zero_point)


def rtn_block(cfg: RTNConfig):
    """The `solve_block` of `qat.ptq.runner.sequential` for RTN."""
    from qat.ptq.runner import quantized_linears

    def solve(name, block, inputs, is_model):
        for module in quantized_linears(block).values():
            pin_rtn(module, cfg.observer, cfg.observer_args)

    return solve
