"""Round-to-nearest: a weight quantizer's qparams computed once from the current weight and pinned."""
from __future__ import annotations

from typing import Any

import torch

from qat.observers import build_observer
from qat.primitives import choose_qparams


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
    source = "recipe" if observer is None else "method"  # the warnings' hints name the route that applies
    if observer is not None:
        spec = spec.replace(observer=observer, observer_args=dict(observer_args or {}))
    lo, hi = build_observer(spec, source).range_of(module.weight.detach())
    scale, zero_point = choose_qparams(lo, hi, spec)
    quantizer.set_qparams(scale, zero_point)
