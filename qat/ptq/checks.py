"""Pre-flight checks shared by the PTQ methods: each names the offending option, module or count, and lists
every offender at once, before any long work starts."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from qat.control import quantizers
from qat.errors import ConfigError, module_lines
from qat.modules.experts import FakeQuantExperts
from qat.modules.fake import FakeQuantLinear
from qat.ptq.gptq import check_spec


def check_ranges(method: str, checks: dict[str, tuple[object, bool, str]]) -> None:
    """Raise one error naming only the options out of range: {option: (value, ok, "rule")}.

    Raises:
        ValueError: e.g. "gptq: percdamp=-1 must be in [0, 1)".
    Example:
        >>> check_ranges("gptq", {"blocksize": (0, 0 >= 1, ">= 1")})  # ValueError: gptq: blocksize=0 must be >= 1
    """
    bad = [f"{name}={value!r} must be {rule}" for name, (value, ok, rule) in checks.items() if not ok]
    if bad:
        raise ConfigError(f"{method}: " + "; ".join(bad))


def check_option_types(method: str, cls: type, data: dict) -> None:
    """A value whose field defaults to a bool / int / float must be one (a CLI typo like alpha=abc is a str).

    Raises:
        ValueError: naming the option, its value, the type and the default.
    """
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
            raise ConfigError(f"method {method}: {f.name}={value!r} must be of type {kind.__name__} "
                             f"(default {default!r})")


def check_prepared(model: nn.Module, linears: dict, method: str) -> None:
    """The model holds fake-quant linears (it went through `qat.prepare`).

    Raises:
        ValueError: naming the method and what to call first.
    """
    if not linears and not any(isinstance(m, (FakeQuantLinear, FakeQuantExperts)) for m in model.modules()):
        raise ConfigError(f"{method}: the model has no fake-quant linear layers; call qat.prepare(model, recipe) first")


def has_static_activations(model: nn.Module) -> bool:
    """Whether any input / KV-cache quantizer has a static range (which calibration data must set)."""
    return any(not q.spec.dynamic for _, q in quantizers(model, ["input", "kv_cache"]))


def count_tokens(batches: Iterable[Any]) -> int:
    """Calibration tokens in `batches` (LongTensor ids [B, T], or mappings with input_ids)."""
    total = 0
    for b in batches:
        t = b.get("input_ids") if isinstance(b, Mapping) else b
        if isinstance(t, torch.Tensor):
            total += t.numel() if not t.is_floating_point() else t[..., 0].numel()
    return total


def check_calibration(method: str, needs_data: bool, min_tokens: int, batches: list, model: nn.Module) -> None:
    """Enough calibration tokens for the method (and for the recipe's static activation ranges).

    Raises:
        ValueError: how many tokens came, how many are needed, and which option lowers it.
    """
    needs = needs_data or has_static_activations(model)
    n_tokens = count_tokens(batches)
    minimum = max(min_tokens, 1 if needs else 0)
    if n_tokens < minimum:
        raise ConfigError(f"{method}: got {n_tokens} calibration tokens in {len(batches)} batch(es); need at least "
                         f"min_tokens={minimum} (give more calibration samples, or lower method.min_tokens)")


def check_weight_schemes(linears: dict, owner: str, grids: bool = False) -> None:
    """Refuse weight schemes AWQ / GPTQ cannot solve, listing every offender (`grids`: GPTQ's GGUF grids too).

    Raises:
        ValueError: "<owner>:" then one line per offending module.
    """
    errors = []
    for n, m in linears.items():
        try:
            check_spec(m.weight_quantizer.spec, n, grids)
        except ValueError as err:
            errors.append((n, str(err).removeprefix(f"{n}: ")))
    if errors:
        raise ConfigError(f"{owner}:\n" + "\n".join(f"  - {e}" for e in module_lines(errors)))


def check_fold(name: str, before: list, after: list) -> None:
    """Folding scales into the producers left the float block output unchanged (relative 1e-3).

    Raises:
        ValueError: naming the block, the change, and the option that fixes it (method.mappings).
    """
    for a, b in zip(before, after):
        rel = float((a - b).abs().max() / a.abs().max().clamp(min=1e-12))
        if not math.isfinite(rel) or rel > 1e-3:
            raise ConfigError(f"{name}: folding scales into the previous ops changed the float block output "
                             f"(relative {rel:.3g}); a producer is not a plain channel scale (e.g. a (1 + weight) "
                             "norm): give method.mappings for this architecture (offset: 1 for a (1 + weight) norm)")
