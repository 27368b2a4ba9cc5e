"""Fused mixture-of-experts weights, quantized where they live.

transformers 5.x stores the experts of Qwen3-MoE, Mixtral, OLMoE (and GPT-OSS) as 3-D parameters of one
module: `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] (GPT-OSS transposed: [E, H, 2I], `is_transposed`),
run by one of transformers' experts implementations (eager loop, batched_mm, grouped_mm), chosen by
`config._experts_implementation`. These modules quantize each 3-D weight with one scale set per expert and
then call that same implementation on the quantized weights (`torch.func.functional_call`), so no family's
routing code is rewritten here.

The numerics are the dense path's: an expert weight is viewed as the 2-D matrix of its E stacked experts,
rows [E * out, in], and quantized with the recipe's spec as a Linear weight would be, so per_channel and
per_group (and every GGUF block grid) are per expert by construction. A per_tensor spec means one scale per
expert: the view is then [E, out * in] with per_channel rows (`expert_spec`).
"""
from __future__ import annotations

import copy
import math
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from qat.errors import ConfigError
from qat.formats import storage_bits
from qat.modules.quantized import QuantizedWeight
from qat.modules.quantizer import TensorQuantizer
from qat.modules.registry import register_fake_quant_rule, register_quantized
from qat.primitives import check_tensor, choose_qparams, compute_range, quant_error_db
from qat.spec import QuantSpec, TensorSchemes
from qat.ste import Requantized, lean_fake_quantize, recomputing_saved_views

EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
"""The 3-D parameter names transformers' experts implementations read."""


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers fused-experts module: 3-D expert weights named as `EXPERT_WEIGHTS` and a `num_experts`."""
    params = dict(module.named_parameters(recurse=False))
    return (hasattr(module, "num_experts") and "down_proj" in params
            and all(params[n].ndim == 3 for n in EXPERT_WEIGHTS if n in params))


def is_experts(module: nn.Module) -> bool:
    """A fused-experts module, float, fake-quant or converted: what the class-name patterns "Experts" and
    "Linear" select besides nn.Linear (fused experts are E linear layers stored batched)."""
    return isinstance(module, _ExpertsBase) or is_fused_experts(module)


def expert_weight_names(module: nn.Module) -> list[str]:
    """The names of the 3-D expert weights of `module`, in `EXPERT_WEIGHTS` order."""
    params = dict(module.named_parameters(recurse=False))
    return [n for n in EXPERT_WEIGHTS if n in params and params[n].ndim == 3]


def expert_spec(spec: QuantSpec) -> QuantSpec:
    """The spec an expert weight's 2-D view is quantized with: per_tensor becomes one scale per expert."""
    return spec.replace(granularity="per_channel", axis=0) if spec.granularity == "per_tensor" else spec


def to_rows(weight: torch.Tensor, spec: QuantSpec, transposed: bool) -> torch.Tensor:
    """The 2-D view an expert weight is quantized in: [E * out, in] (rows along the input dim), or [E, out * in]
    for a per_tensor spec. `transposed`: the weight is stored [E, in, out] (GPT-OSS)."""
    w = weight.transpose(1, 2) if transposed else weight
    e = w.shape[0]
    return w.reshape(e, -1) if spec.granularity == "per_tensor" else w.reshape(-1, w.shape[-1])


def from_rows(rows: torch.Tensor, shape: tuple[int, ...], transposed: bool) -> torch.Tensor:
    """Inverse of `to_rows`: back to the stored 3-D `shape`."""
    if transposed:
        e, i, o = shape
        return rows.reshape(e, o, i).transpose(1, 2)
    return rows.reshape(shape)


def call_tensors(module: nn.Module, skip: str, replaced: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """name -> tensor a wrapper hands its float template's forward: its parameters but those under `skip` (its
    quantizers), a parametrized one (a learned rotation's W @ R) as its computed value under its own name, except
    the `replaced` ones (the caller sets their quantized values: W @ R is not computed twice per forward)."""
    tensors = {n: p for n, p in module.named_parameters() if not n.startswith((skip, "parametrizations."))}
    if parametrize.is_parametrized(module):
        tensors.update({n: getattr(module, n) for n in module.parametrizations if n not in replaced})
    return tensors


def float_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of a float module (experts, router) whose forward is called with swapped-in tensors; the
    wrappers keep it unregistered and hold the parameters themselves, under their original names."""
    template = copy.copy(module)
    template.__dict__ = dict(module.__dict__)
    for store in ("_parameters", "_buffers", "_modules"):
        template.__dict__[store] = dict(module.__dict__[store])
    return template


class _ExpertsBase(nn.Module):
    """What the fake-quant and converted experts share: the float experts template, its forward, its tensors."""

    def _init_from(self, experts: nn.Module, schemes: TensorSchemes) -> None:
        object.__setattr__(self, "float_template", float_copy(experts))
        self.schemes = schemes
        self.transposed = bool(getattr(experts, "is_transposed", False))
        self.num_experts = experts.num_experts
        self.shapes = {n: tuple(p.shape) for n, p in experts.named_parameters(recurse=False) if p.ndim == 3}
        for name, child in experts.named_children():
            self._modules[name] = child  # add_module would see the template's attribute of that name
        self.tokens_per_expert: torch.Tensor | None = None  # counted while `count_tokens` is on (calibration)
        self.count_tokens = False

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """name -> tensor that the experts forward reads (quantized expert weights, other tensors as held)."""
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.count_tokens:
            self._count(top_k_index)
        tensors, recipes = self.forward_tensors()
        with recomputing_saved_views(recipes):  # lean STE: views of a fake-quantized weight are not kept
            return torch.func.functional_call(self.float_template, tensors, (hidden_states, top_k_index, *args),
                                              kwargs, strict=False, tie_weights=False)

    def forward_tensors(self) -> tuple[dict[str, torch.Tensor], list[Requantized]]:
        """The forward's tensors, and the recipes of those the backward recomputes (none by default)."""
        return self.expert_tensors(), []

    @torch.no_grad()
    def _count(self, top_k_index: torch.Tensor) -> None:
        counts = torch.bincount(top_k_index.reshape(-1).long(), minlength=self.num_experts)[: self.num_experts]
        counts = counts.to("cpu")
        self.tokens_per_expert = counts if self.tokens_per_expert is None else self.tokens_per_expert + counts

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # the experts module's own attributes (num_experts, config, act_fn, has_gate...) read through
            # but not its parameters: ours shadow them (a parametrization moves ours away and must not find them)
            template = self.__dict__.get("float_template")
            if template is not None and not name.startswith("_") and name not in template._parameters:
                return getattr(template, name)
            raise

    def _float_module(self, tensors: dict[str, torch.Tensor]) -> nn.Module:
        experts = float_copy(self.float_template)
        for name, value in tensors.items():
            if "." not in name:
                setattr(experts, name, value if isinstance(value, nn.Parameter) else nn.Parameter(value))
        for name, child in self.named_children():
            if name not in ("weight_quantizers", "qweights"):
                experts._modules[name] = child
        return experts


class FakeQuantExperts(_ExpertsBase):
    """A fused-experts module whose 3-D expert weights are fake-quantized, one scale set per expert.

    The parameters are the float module's own objects, under their own names (`gate_up_proj`, `down_proj`,
    biases), so optimizers and checkpoints see the same tensors; `weight_quantizers[name]` holds the
    TensorQuantizer of each expert weight (static ranges, LSQ / PACT learned scales, pinned PTQ qparams), on the
    2-D view of `to_rows`. Gradients reach the float weights (STE) and learned scales as for FakeQuantLinear.

    With `lean` on (the default; `qat.set_lean_ste`, as for FakeQuantLinear) the fake-quantized weights are not
    kept for backward: the experts implementation's saved views of them are recomputed there from the float
    weight and the qparams (`qat.ste.recomputing_saved_views`), and the STE keeps no mask; values and gradients
    are the same (tests/moe/test_lean_experts.py).

    Example:
        >>> fq = FakeQuantExperts.from_float(model.model.layers[0].mlp.experts, TensorSchemes(weight=spec))
        >>> out = fq(hidden, top_k_index, top_k_weights)
    """

    lean = True  # memory-lean STE; per module with qat.set_lean_ste(model, ...)

    @classmethod
    def from_float(cls, experts: nn.Module, schemes: TensorSchemes, name: str = "") -> "FakeQuantExperts":
        errors = cls.plan_errors(experts, schemes, name)
        if errors:
            raise ConfigError("; ".join(errors))
        module = cls()
        module._init_from(experts, schemes)
        for pname, param in experts.named_parameters(recurse=False):
            module._parameters[pname] = param  # register_parameter would see the template's
        module.weight_quantizers = nn.ModuleDict()
        if schemes.weight is not None:
            spec = expert_spec(schemes.weight)
            for pname in expert_weight_names(experts):
                rows = to_rows(getattr(experts, pname).detach(), schemes.weight, module.transposed)
                module.weight_quantizers[pname] = TensorQuantizer(spec, "weight", rows)
        return module

    @staticmethod
    def plan_errors(experts: nn.Module, schemes: TensorSchemes, name: str) -> list[str]:
        """What stops `experts` from being prepared with `schemes`, one message per problem (for `qat.plan`)."""
        name = name or "experts"
        errors = []
        if schemes.input is not None:
            errors.append(f"{name}: input (activation) quantization of fused experts is not supported (the "
                          "intermediate activation lives inside transformers' experts kernel); keep the experts "
                          "weight-only with an override {targets: [Experts], input: null}, or ignore: [Experts]")
        if schemes.weight is not None:
            for pname in expert_weight_names(experts):
                rows = to_rows(getattr(experts, pname).detach(), schemes.weight, bool(getattr(experts, "is_transposed", False)))
                try:
                    check_tensor(rows, f"{name}.{pname}", expert_spec(schemes.weight))
                except ValueError as err:
                    errors.append(str(err))
        return errors

    def quantized(self, name: str) -> torch.Tensor:
        """Expert weight `name` fake-quantized (the float weight when it has no enabled quantizer)."""
        weight = getattr(self, name)
        quantizer = self.weight_quantizers[name] if name in self.weight_quantizers else None
        if quantizer is None:
            return weight
        rows = to_rows(weight, self.schemes.weight, self.transposed)
        return from_rows(quantizer(rows), self.shapes[name], self.transposed)

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        tensors = call_tensors(self, "weight_quantizers.", self.weight_quantizers)
        tensors.update({n: self.quantized(n) for n in self.weight_quantizers})
        return tensors

    def forward_tensors(self) -> tuple[dict[str, torch.Tensor], list[Requantized]]:
        if not (self.lean and torch.is_grad_enabled()):
            return self.expert_tensors(), []
        tensors = call_tensors(self, "weight_quantizers.", self.weight_quantizers)
        recipes = []
        for name, quantizer in self.weight_quantizers.items():
            rows = self.rows(name)
            args = quantizer.fake_quant_args(rows)  # observes as quantizer(rows) does
            if args is None:  # a disabled quantizer: the float weight (under a learned rotation the W @ R just taken)
                parametrized = parametrize.is_parametrized(self, name)
                tensors[name] = from_rows(rows, self.shapes[name], self.transposed) if parametrized else getattr(self, name)
            else:
                rows_hat, recipe = lean_fake_quantize(rows, args)
                tensors[name] = from_rows(rows_hat, self.shapes[name], self.transposed)
                recipes.append(recipe)
        return tensors, recipes

    def rows(self, name: str) -> torch.Tensor:
        """The float 2-D view of expert weight `name` that its quantizer sees."""
        return to_rows(getattr(self, name), self.schemes.weight, self.transposed)

    def to_float(self) -> nn.Module:
        """The transformers experts module with the (unquantized) float weights."""
        return self._float_module(dict(self.named_parameters(recurse=False)))

    def storage(self) -> tuple[int, int] | None:
        """(storage bits, weight count) of the quantized expert weights, as `qat.control.weight_storage`."""
        if not len(self.weight_quantizers):
            return None
        bits = numel = 0
        for name, q in self.weight_quantizers.items():
            shape = tuple(to_rows(getattr(self, name), self.schemes.weight, self.transposed).shape)
            bits, numel = bits + storage_bits(q.spec, shape, q.group_index() is not None), numel + math.prod(shape)
        return bits, numel

    @torch.no_grad()
    def sqnr_db(self) -> float:
        """SQNR (dB) of all expert weights against their fake-quantized values."""
        names = list(self.weight_quantizers)
        w = torch.cat([getattr(self, n).reshape(-1) for n in names])
        return quant_error_db(w, torch.cat([self.quantized(n).reshape(-1) for n in names]))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, {self.schemes.describe()}"


register_fake_quant_rule(is_fused_experts, FakeQuantExperts)  # any transformers fused-experts class


def quantize_expert_weight(fake: FakeQuantExperts, name: str) -> QuantizedWeight:
    """Expert weight `name` of `fake` as a QuantizedWeight of its 2-D view (the codes `convert` stores)."""
    quantizer = fake.weight_quantizers[name]
    rows = fake.rows(name).detach()
    quantizer.observe(rows)
    scale, zero_point = quantizer.qparams(rows)
    zero_point = None if zero_point is None else zero_point.detach()
    return QuantizedWeight.from_tensor(rows, quantizer.spec, scale.detach(), zero_point, f"experts.{name}",
                                       quantizer.group_index())


@register_quantized(FakeQuantExperts)
class QuantizedExperts(_ExpertsBase):
    """Fused experts holding real codes: `qweights[name]` is a QuantizedWeight of the expert weight's 2-D view
    (`to_rows`); the forward dequantizes and runs the model's experts implementation, exactly as the
    fake-quant module did.

    Example:
        >>> qe = QuantizedExperts.from_fake(fake_quant_experts)
        >>> torch.equal(qe(h, idx, w), fake_quant_experts(h, idx, w))
        True
    """

    @classmethod
    def from_fake(cls, fake: FakeQuantExperts) -> "QuantizedExperts":
        module = cls()
        module._init_from(fake.float_template, fake.schemes)
        module.shapes = dict(fake.shapes)
        with torch.no_grad():
            module.qweights = nn.ModuleDict({n: quantize_expert_weight(fake, n) for n in fake.weight_quantizers})
        for pname, param in fake.named_parameters(recurse=False):
            if pname not in module.qweights:
                module._parameters[pname] = param  # register_parameter would see the template's
        return module

    @classmethod
    def empty(cls, experts: nn.Module, schemes: TensorSchemes, dtype: torch.dtype) -> "QuantizedExperts":
        """A converted module with zeroed storage for `experts` (the float module of a freshly built model), to
        load a saved state dict into (native export)."""
        module = cls()
        module._init_from(experts, schemes)
        spec = expert_spec(schemes.weight)
        module.qweights = nn.ModuleDict()
        for pname, param in experts.named_parameters(recurse=False):
            if pname in expert_weight_names(experts):
                shape = tuple(to_rows(param.detach(), schemes.weight, module.transposed).shape)
                module.qweights[pname] = QuantizedWeight(spec, shape, dtype)
            else:
                module._parameters[pname] = param  # register_parameter would see the template's
        return module

    def dequantized(self, name: str) -> torch.Tensor:
        """Expert weight `name` dequantized, in its stored 3-D shape."""
        return from_rows(self.qweights[name].dequantize(), self.shapes[name], self.transposed)

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {n: p for n, p in self.named_parameters() if not n.startswith("qweights.")}
        tensors.update({n: self.dequantized(n) for n in self.qweights})
        return tensors

    def to_float(self) -> nn.Module:
        """The transformers experts module holding the dequantized weights."""
        tensors = dict(self.named_parameters(recurse=False))
        tensors.update({n: self.dequantized(n) for n in self.qweights})
        return self._float_module(tensors)

    def storage(self) -> tuple[int, int]:
        bits = sum(q.nbits() for q in self.qweights.values())
        return bits, sum(math.prod(q.shape) for q in self.qweights.values())

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, {self.schemes.describe()}"


def expert_qparams_shape(weight: torch.Tensor, spec: QuantSpec, transposed: bool = False) -> torch.Size:
    """The scale shape of an expert weight's 2-D view under `spec` (what `set_qparams` takes)."""
    rows = to_rows(weight.detach(), spec, transposed)
    return choose_qparams(*compute_range(rows, expert_spec(spec)), expert_spec(spec))[0].shape

