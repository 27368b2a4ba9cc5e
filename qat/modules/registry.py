"""Registries: float module type -> fake-quant type (prepare), fake-quant type -> real-integer type (convert)."""
from __future__ import annotations

from typing import Callable

from torch import nn

FAKE_QUANT: dict[type[nn.Module], type[nn.Module]] = {}
QUANTIZED: dict[type[nn.Module], type[nn.Module]] = {}
FAKE_QUANT_RULES: list[tuple[Callable[[nn.Module], bool], type[nn.Module]]] = []
"""(predicate, fake-quant type) for module kinds that are not one class: transformers' fused experts are a
different class per family (Qwen3MoeExperts, MixtralExperts, ...) with one layout."""


def register_fake_quant(float_type: type[nn.Module]) -> Callable[[type], type]:
    """Class decorator: `@register_fake_quant(nn.Linear)` makes prepare swap nn.Linear for the class."""

    def deco(cls: type) -> type:
        FAKE_QUANT[float_type] = cls
        return cls

    return deco


def register_fake_quant_rule(predicate: Callable[[nn.Module], bool], cls: type[nn.Module]) -> None:
    """Make prepare swap every module for which `predicate(module)` holds (and whose exact type is not
    registered) for `cls`, e.g. `register_fake_quant_rule(is_fused_experts, FakeQuantExperts)`."""
    FAKE_QUANT_RULES.append((predicate, cls))


def register_quantized(fake_type: type[nn.Module]) -> Callable[[type], type]:
    """Class decorator: `@register_quantized(FakeQuantLinear)` makes convert swap it for the class."""

    def deco(cls: type) -> type:
        QUANTIZED[fake_type] = cls
        return cls

    return deco


def fake_quant_type(module: nn.Module) -> type[nn.Module] | None:
    """The fake-quant class registered for exactly this module's type (subclasses are not assumed), or the
    class of the first rule that takes it."""
    exact = FAKE_QUANT.get(type(module))
    if exact is not None or type(module) in QUANTIZED or type(module) in QUANTIZED.values():
        return exact
    return next((cls for predicate, cls in FAKE_QUANT_RULES if predicate(module)), None)
