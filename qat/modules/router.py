"""MoE routers (`Qwen3MoeTopKRouter`, `MixtralTopKRouter`, ...): float by default; a recipe that names one
(`targets: [Linear, mlp.gate]`) gets its weight fake-quantized, its own forward (top-k, normalisation) unchanged."""
from __future__ import annotations

import torch
from torch import nn

from qat.errors import ConfigError
from qat.modules.experts import call_tensors, float_copy
from qat.modules.quantized import QuantizedWeight
from qat.modules.quantizer import TensorQuantizer
from qat.modules.registry import register_fake_quant_rule, register_quantized
from qat.primitives import check_tensor
from qat.spec import TensorSchemes


def is_router(module: nn.Module) -> bool:
    """transformers' MoE router (`Qwen3MoeTopKRouter`, `MixtralTopKRouter`, ...): a 2-D `weight` [E, H] it applies
    as a linear map before its top-k. Not selected by `Linear`: a recipe quantizes it only by naming it."""
    weight = getattr(module, "_parameters", {}).get("weight")
    return type(module).__name__.endswith("TopKRouter") and weight is not None and weight.ndim == 2


class FakeQuantRouter(nn.Module):
    """An MoE router whose weight is fake-quantized; its own forward (top-k, normalisation) runs on it.

    Example:
        >>> fq = FakeQuantRouter.from_float(model.model.layers[0].mlp.gate, TensorSchemes(weight=QuantSpec(bits=8)))
    """

    @classmethod
    def from_float(cls, router: nn.Module, schemes: TensorSchemes, name: str = "") -> "FakeQuantRouter":
        errors = cls.plan_errors(router, schemes, name)
        if errors:
            raise ConfigError("; ".join(errors))
        module = cls()
        object.__setattr__(module, "float_template", float_copy(router))
        module.schemes = schemes
        for pname, param in router.named_parameters(recurse=False):
            module.register_parameter(pname, param)
        module.weight_quantizer = None
        if schemes.weight is not None:
            module.weight_quantizer = TensorQuantizer(schemes.weight, "weight", router.weight.detach())
        return module

    @staticmethod
    def plan_errors(router: nn.Module, schemes: TensorSchemes, name: str) -> list[str]:
        """What stops `router` from being prepared with `schemes` (for `qat.plan`)."""
        name = name or "router"
        errors = [f"{name}: input quantization of an MoE router is not supported; quantize its weight only"
                  ] if schemes.input is not None else []
        if schemes.weight is not None:
            try:
                check_tensor(router.weight.detach(), f"{name}.weight", schemes.weight)
            except ValueError as err:
                errors.append(str(err))
        return errors

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def forward(self, *args, **kwargs):
        tensors = call_tensors(self, "weight_quantizer.", ("weight",))
        tensors["weight"] = self.quantized_weight()
        return torch.func.functional_call(self.float_template, tensors, args, kwargs, strict=False, tie_weights=False)

    def to_float(self) -> nn.Module:
        router = float_copy(self.float_template)
        for name, param in self.named_parameters(recurse=False):
            router._parameters[name] = param
        return router

    def extra_repr(self) -> str:
        return f"{type(self.float_template).__name__}, {self.schemes.describe()}"


register_fake_quant_rule(is_router, FakeQuantRouter)


@register_quantized(FakeQuantRouter)
class QuantizedRouter(nn.Module):
    """An MoE router holding its weight as codes (`qweight`); forward equals the fake-quant router's."""

    def __init__(self, template: nn.Module, qweight: QuantizedWeight, schemes: TensorSchemes | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "float_template", float_copy(template))
        self.qweight = qweight
        self.schemes = schemes or TensorSchemes(weight=qweight.spec)
        for pname, param in template.named_parameters(recurse=False):
            if pname != "weight":
                self._parameters[pname] = param

    @classmethod
    def from_fake(cls, fake: FakeQuantRouter) -> "QuantizedRouter":
        quantizer = fake.weight_quantizer
        weight = fake.weight.detach()
        quantizer.observe(weight)
        scale, zero_point = quantizer.qparams(weight)
        qweight = QuantizedWeight.from_tensor(weight, quantizer.spec, scale.detach(),
                                              None if zero_point is None else zero_point.detach())
        module = cls(fake.float_template, qweight, fake.schemes)
        for pname, param in fake.named_parameters(recurse=False):
            if pname != "weight":
                module._parameters[pname] = param
        return module

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.dequantize()

    def forward(self, *args, **kwargs):
        tensors = {n: p for n, p in self.named_parameters()}
        tensors["weight"] = self.qweight.dequantize()
        return torch.func.functional_call(self.float_template, tensors, args, kwargs, strict=False, tie_weights=False)

    def to_float(self) -> nn.Module:
        router = float_copy(self.float_template)
        router._parameters["weight"] = nn.Parameter(self.qweight.dequantize())
        for name, param in self.named_parameters(recurse=False):
            router._parameters[name] = param
        return router
