"""Round-to-nearest (configs/method/rtn.yaml): the recipe's weight quantizers, qparams computed once and pinned."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import nn

from qat.errors import ConfigError
from qat.observers import OBSERVERS
from qat.ptq.checks import has_static_activations
from qat.ptq.experts import block_experts, pin_rtn_experts
from qat.ptq.methods.base import PTQMethod, register_method
from qat.ptq.rtn import pin_rtn
from qat.ptq.runner import BlockContext, block_context


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
        if self.observer is not None and self.observer not in OBSERVERS:
            raise ConfigError(f"rtn: observer={self.observer!r}; choose from {sorted(OBSERVERS)} (or null: the recipe's)")
        if self.min_tokens < 0:
            raise ConfigError(f"rtn: min_tokens={self.min_tokens} must be >= 0")


@register_method
class RTN(PTQMethod):
    """Round-to-nearest; weight-only recipes need no data, static activation ranges are calibrated by blocks."""

    name = "rtn"
    Config = RTNConfig
    needs_calibration = False

    def solve_block(self, ctx: BlockContext) -> None:
        for module in ctx.linears.values():
            pin_rtn(module, self.config.observer, self.config.observer_args)
        for experts in block_experts(ctx.block).values():
            pin_rtn_experts(experts, self.config.observer, self.config.observer_args)

    def run(self, model: nn.Module, batches: Iterable[Any], progress: bool = True) -> None:
        if has_static_activations(model):
            super().run(model, batches, progress)
        else:  # weight-only: the whole model at once, no data
            self.solve_block(block_context("model", model, [], False, model))
