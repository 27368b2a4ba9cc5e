"""Which layers a compressed-tensors checkpoint's config groups quantize, resolved as compressed-tensors does.

qat's writer names every layer in `targets`; other writers (llm-compressor) write class names and regexes with an
`ignore` list: `targets: ["Linear"], ignore: ["lm_head"]`. compressed-tensors' `is_match` rules, applied here to
the layers whose quantized tensors the checkpoint holds (`<m>.weight_packed`, `<m>.weight_scale`):
    "model.layers.0.mlp.down_proj"   that module's name exactly
    "re:.*mlp.*"                     a regex, re.match against the module name
    "Linear"                         a class name: the module's class or one of its bases (vLLM's LinearBase
                                     counts as Linear); a per-expert piece of fused experts (`<experts>.3.down_proj`,
                                     a Linear in the model that wrote it) matches "Linear"
and a layer a group targets but `ignore` matches is not quantized. Names are the checkpoint's (before any
transformers renaming); a name target is taken as given, so a missing layer is reported by the reader; a group
that matches no layer is warned about, naming it.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

from torch import nn

from qat.errors import BadFileError

log = logging.getLogger(__name__)
QUANTIZED_TENSORS = (".weight_packed", ".weight_scale")  # a layer holding either is a quantized layer


def stored_layers(keys: Iterable[str]) -> list[str]:
    """The checkpoint names of the layers that hold quantized tensors (`QUANTIZED_TENSORS`), sorted."""
    return sorted({k[: -len(s)] for k in keys for s in QUANTIZED_TENSORS if k.endswith(s)})


def _is_pattern(target: str) -> bool:
    return target.startswith("re:") or "." not in target


def _matches(name: str, target: str, classes: Callable[[str], list[str]]) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target in classes(name)


def group_targets(groups: dict, ignore: Iterable[str], layers: list[str],
                  classes: Callable[[str], list[str]], where) -> dict[str, str]:
    """{layer (checkpoint name): config group key} of every layer a group quantizes.

    Args:
        groups: the checkpoint's `config_groups`; ignore: its `ignore` list.
        layers: the checkpoint's quantized layers (`stored_layers`), which class and regex targets resolve over.
        classes: a layer name -> the class names of its module and bases ([] where the model has no such module).
        where: the file named in errors.
    Raises:
        BadFileError: a layer two groups target.
    Example:
        >>> group_targets({"g": {"targets": ["Linear"]}}, ["lm_head"], ["lm_head", "a.q_proj"],
        ...               lambda n: ["Linear"], "config.json")
        {'a.q_proj': 'g'}
    """
    ignore = list(ignore or ())
    out: dict[str, str] = {}
    for key, group in groups.items():
        targets = list(group.get("targets") or ())
        named = [t for t in targets if not _is_pattern(t)]
        found = named + [n for n in layers if n not in named and any(_matches(n, t, classes)
                                                                      for t in targets if _is_pattern(t))]
        kept = [n for n in found if not any(_matches(n, i, classes) for i in ignore)]
        if not kept:
            log.warning("compressed-tensors loader: config group %r (targets %s) matches no quantized layer of %s",
                        key, targets, where)
        for n in kept:
            if n in out:
                raise BadFileError(where, f"layer {n!r} is the target of two config_groups ({out[n]!r}, {key!r})")
            out[n] = key
    return out


def module_classes(model: nn.Module, name: str, rename: Callable[[str], str], expert_piece: re.Pattern) -> list[str]:
    """The class names `_matches` compares a class target with: the module's class and bases (vLLM's LinearBase as
    Linear too), or ["Linear"] for a per-expert piece of fused experts; [] where the model has no such module."""
    try:
        module = model.get_submodule(rename(name))
    except AttributeError:
        return ["Linear"] if expert_piece.match(name) else []
    names = [c.__name__ for c in type(module).__mro__ if issubclass(c, nn.Module)]
    return names + (["Linear"] if "LinearBase" in names else [])
