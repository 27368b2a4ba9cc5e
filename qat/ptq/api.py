"""Entry points: `ptq_model(model, recipe, method, batches)` and `apply(model, method_cfg, batches)`."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from qat.control import quantizers
from qat.modules.fake import FakeQuantLinear
from qat.ptq.awq import AWQConfig, awq_block, check_specs
from qat.ptq.gptq import GPTQConfig, gptq_block
from qat.ptq.gptq import check_model as check_gptq
from qat.ptq.rtn import RTNConfig, rtn_block
from qat.ptq.runner import quantized_linears, sequential
from qat.ptq.smoothquant import SmoothQuantConfig, smoothquant_block
from qat.transform.recipe import to_plain

log = logging.getLogger(__name__)

# name -> (config class, solve_block factory, needs calibration data)
METHODS: dict[str, tuple[type, Callable, bool]] = {
    "rtn": (RTNConfig, rtn_block, False),
    "gptq": (GPTQConfig, gptq_block, True),
    "awq": (AWQConfig, awq_block, True),
    "smoothquant": (SmoothQuantConfig, smoothquant_block, True),
}


def method_config(method: Any, **overrides: Any):
    """A validated method config from a name, a mapping / DictConfig with `name`, or a config instance.

    Raises:
        KeyError: an unknown method name, listing the registered ones.
        ValueError: an unknown or out-of-range option, naming it and the valid keys.
    Example:
        >>> method_config({"name": "gptq", "actorder": True}).actorder
        True
    """
    if dataclasses.is_dataclass(method) and not isinstance(method, type):
        return dataclasses.replace(method, **overrides) if overrides else method
    data = to_plain(method)
    data = {"name": data} if isinstance(data, str) else dict(data or {})
    data.update(overrides)
    name = data.pop("name", None)
    data.pop("_target_", None)
    if name not in METHODS:
        raise KeyError(f"PTQ method {name!r}; registered: {sorted(METHODS)}")
    cls = METHODS[name][0]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"method {name}: unknown key(s) {unknown}; valid keys are {sorted(valid)}")
    _check_types(name, cls, data)
    return cls(**data)


def _check_types(name: str, cls: type, data: dict) -> None:
    """A value whose field defaults to a bool / int / float must be one (a CLI typo like alpha=abc is a str)."""
    for f in dataclasses.fields(cls):
        default = f.default
        if f.name not in data or isinstance(default, (type(None), str)) or default is dataclasses.MISSING:
            continue
        kind = type(default)
        value = data[f.name]
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else True)
        if not ok:
            raise ValueError(f"method {name}: {f.name}={value!r} must be of type {kind.__name__} "
                             f"(default {default!r})")


def method_name(cfg) -> str:
    return next(n for n, (cls, _, _) in METHODS.items() if isinstance(cfg, cls))


def count_tokens(batches: Iterable[Any]) -> int:
    """Calibration tokens in `batches` (LongTensor ids [B, T], or mappings with input_ids)."""
    total = 0
    for b in batches:
        t = b.get("input_ids") if isinstance(b, Mapping) else b
        if isinstance(t, torch.Tensor):
            total += t.numel() if not t.is_floating_point() else t[..., 0].numel()
    return total


def apply(model: nn.Module, method_cfg: Any, batches: Iterable[Any] | None = None, progress: bool = True) -> nn.Module:
    """Run a PTQ method on a prepared model: set each quantized linear's weight and pin its qparams.

    The result is an ordinary prepared model: its fake-quant forward reproduces the method's quantized
    weights, `qat.convert` stores exactly those codes, and training it further is PTQ-initialised QAT.

    Args:
        model: a model after `qat.prepare`.
        method_cfg: "gptq", {"name": "gptq", "actorder": True, ...}, a DictConfig, or a config instance.
        batches: calibration inputs: LongTensor ids [B, T] or mappings of model kwargs.
        progress: show a progress bar per block.
    Returns:
        the same model; `model.qat_ptq` records the method, its options and the wall time.
    Raises:
        ValueError: a model with no fake-quant linears, too few calibration tokens, an unsupported scheme.
    Example:
        >>> qat.ptq.apply(qat.prepare(model, qat.load_recipe("w4a16_g128")), {"name": "gptq", "actorder": True}, batches)
    """
    cfg = method_config(method_cfg)
    name = method_name(cfg)
    linears = quantized_linears(model)
    if not linears and not any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise ValueError(f"{name}: the model has no fake-quant linear layers; call qat.prepare(model, recipe) first")
    batches = list(batches or [])
    _check_calibration(name, cfg, batches, model)
    if name == "gptq":
        check_gptq(linears, cfg)  # GPTQ also solves on GGUF grids
    elif name == "awq":
        check_specs(linears, f"{name}: unsupported weight scheme(s)")
    elif name == "smoothquant" and next(quantizers(model, ["input"]), None) is None:
        raise ValueError("smoothquant: the recipe quantizes no activations (no input quantizer), and SmoothQuant "
                         "only moves activation outliers into the weights for activation quantization: use a "
                         "recipe with `input:` (w8a8, w8a8_static, w4a8_kv8, fp8_dynamic), or rtn / gptq / awq "
                         "for weight-only recipes")
    start = time.perf_counter()
    static_acts = any(not q.spec.dynamic for _, q in quantizers(model, ["input", "kv_cache"]))
    if name == "rtn" and not static_acts:  # weight-only RTN needs no data
        rtn_block(cfg)("model", model, [], False)
    else:
        sequential(model, batches, METHODS[name][1](cfg), desc=name, progress=progress)
    seconds = time.perf_counter() - start
    model.qat_ptq = {"method": name, **dataclasses.asdict(cfg), "seconds": seconds}
    log.info("%s: %d linear layers in %.1f s", name, len(linears), seconds)
    return model


def _check_calibration(name: str, cfg, batches: list, model: nn.Module) -> None:
    needs = METHODS[name][2] or any(not q.spec.dynamic for _, q in quantizers(model, ["input", "kv_cache"]))
    n_tokens = count_tokens(batches)
    minimum = max(getattr(cfg, "min_tokens", 0), 1 if needs else 0)
    if n_tokens < minimum:
        raise ValueError(f"{name}: got {n_tokens} calibration tokens in {len(batches)} batch(es); need at least "
                         f"min_tokens={minimum} (give more calibration samples, or lower method.min_tokens)")


def ptq_model(model: nn.Module, recipe: Any, method: Any, calibration_batches: Iterable[Any] | None = None,
              progress: bool = True, **args: Any) -> nn.Module:
    """Prepare `model` with `recipe` (unless already prepared) and run a PTQ method on it.

    Args:
        model: a float model (or one prepared already; `recipe` is then ignored).
        recipe: a QuantRecipe, a recipe name ("w4a16_g128") or a mapping in the configs/quant format.
        method: "rtn", "gptq", "awq", "smoothquant", or a mapping with `name`.
        calibration_batches: LongTensor ids [B, T] (or model kwargs mappings).
        **args: method options (e.g. actorder=True).
    Returns:
        the prepared model with pinned PTQ qparams (then `qat.convert` it, export it, or train it further).
    Example:
        >>> model = ptq_model(model, "w4a16_g128", "gptq", batches, actorder=True)
        >>> qat.convert(model)
    """
    import qat

    cfg = method_config(method, **args)
    if not any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        if isinstance(recipe, str):
            recipe = qat.load_recipe(recipe)
        qat.prepare(model, recipe)
    return apply(model, cfg, calibration_batches, progress=progress)
