"""Per-input-channel scales folded into the previous op, so the float model computes the same function.

A mapping (`qat.arch.Mapping`) names, inside one decoder block, the op that produces an input (`prev`: an RMSNorm/LayerNorm
whose weight multiplies its output, or a Linear) and the linears that consume it. Scaling the
consumers' weight columns by s and dividing the producer's output by s leaves the float output
unchanged; AWQ and SmoothQuant choose s so that the quantized weights (and activations) lose less.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch
from torch import nn

from qat.arch import ArchAdapter, Mapping, get_arch
from qat.errors import ConfigError

log = logging.getLogger(__name__)


def parse_mappings(raw: Sequence[Any] | None, owner: str = "method.mappings") -> list[Mapping] | None:
    """Validate mapping entries ({prev: str, linears: [str, ...], offset: float (optional)}); None stays None
    (the architecture's).

    Raises:
        ValueError: an entry without `prev` / `linears`, or with unknown keys.
    """
    if raw is None:
        return None
    out = []
    for i, entry in enumerate(raw):
        entry = dataclasses.asdict(entry) if isinstance(entry, Mapping) else dict(entry)
        unknown = sorted(set(entry) - {"prev", "linears", "offset"})
        if unknown or not isinstance(entry.get("prev"), str) or not entry.get("linears") or \
                not isinstance(entry.get("offset", 0.0), (int, float)):
            raise ConfigError(f"{owner}[{i}]={entry}: expected {{prev: <module name>, linears: [<module name>, ...], "
                             "offset: <number, optional: the norm computes x * (offset + weight)>}")
        out.append(Mapping(entry["prev"], tuple(entry["linears"]), float(entry.get("offset", 0.0))))
    return out


def resolve(block: nn.Module, mapping: Mapping) -> tuple[nn.Module, list[nn.Module]] | None:
    """The producer and consumer modules of `mapping` in `block`, or None when it does not apply.

    It does not apply when a module is missing, or when the producer's output width differs from the
    consumers' input width (e.g. v_proj -> o_proj under grouped-query attention).
    """
    modules = dict(block.named_modules())
    if mapping.prev not in modules or any(n not in modules for n in mapping.linears):
        return None
    prev, linears = modules[mapping.prev], [modules[n] for n in mapping.linears]
    width = out_width(prev)
    if width is None or any(getattr(m, "in_features", None) != width for m in linears):
        return None
    return prev, linears


def out_width(prev: nn.Module) -> int | None:
    """The output width of a producer: a Linear's out_features, a norm's weight length (None otherwise)."""
    if isinstance(prev, nn.Linear):
        return prev.out_features
    weight = getattr(prev, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 1:
        return weight.shape[0]
    return None


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: Sequence[nn.Module], s: torch.Tensor, offset: float = 0.0) -> None:
    """Divide `prev`'s output channels by s and multiply the consumers' input columns by s, in place.

    Args:
        offset: a norm computing x * (offset + weight) (Gemma: 1) gets weight = (offset + weight) / s - offset.
    """
    s = s.to(prev.weight.device)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
    elif offset:
        prev.weight.copy_((prev.weight + offset) / s.to(prev.weight.dtype) - offset)
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))


def arch_mappings(given: Sequence[Mapping] | None, model: nn.Module, method: str, smooth: bool = False):
    """The mappings a method folds through: `given` (method.mappings), else the model's architecture's.

    Args:
        smooth: the architecture's SmoothQuant mappings (norm -> linears only) instead of all of them.
    Raises:
        ValueError: no `given` mappings for a family `qat.arch` does not know (naming the option to set).
    """
    if given is not None:
        return list(given)
    try:
        arch: ArchAdapter = get_arch(model)
    except ValueError as err:
        raise ConfigError(f"{method}: method.mappings=null takes the norm -> linear mappings of the model's "
                         f"architecture, and {err}; or give method.mappings") from None
    if why := arch.structure_refusal(model.config):
        raise ConfigError(f"{method} on {model.config.model_type}: {why}")
    return list(arch.smooth_mappings if smooth else arch.mappings)


def applicable(block: nn.Module, mappings: Sequence[Mapping], linears: dict, method: str):
    """(mapping, prev op, linears) for each mapping that applies to `block` with all its linears quantized."""
    for mapping in mappings:
        found = resolve(block, mapping)
        if found is None or any(n not in linears for n in mapping.linears):
            log.debug("%s: mapping %s -> %s does not apply", method, mapping.prev, mapping.linears)
            continue
        yield (mapping, *found)
