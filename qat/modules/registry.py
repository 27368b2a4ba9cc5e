"""Registries: float module type -> fake-quant type (prepare), fake-quant type -> real-integer type (convert)."""
from __future__ import annotations

from typing import Callable

from torch import nn

FAKE_QUANT: dict[type[nn.Module], type[nn.Module]] = {}
QUANTIZED: dict[type[nn.Module], type[nn.Module]] = {}


def register_fake_quant(float_type: type[nn.Module]) -> Callable[[type], type]:
    """Class decorator: `@register_fake_quant(nn.Linear)` makes prepare swap nn.Linear for the class."""

    def deco(cls: type) -> type:
        FAKE_QUANT[float_type] = cls
        return cls

    return deco


def register_quantized(fake_type: type[nn.Module]) -> Callable[[type], type]:
    """Class decorator: `@register_quantized(FakeQuantLinear)` makes convert swap it for the class."""

    def deco(cls: type) -> type:
        QUANTIZED[fake_type] = cls
        return cls

    return deco


def fake_quant_type(module: nn.Module) -> type[nn.Module] | None:
    """The fake-quant class registered for exactly this module's type (subclasses are not assumed)."""
    return FAKE_QUANT.get(type(module))
