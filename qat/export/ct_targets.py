"""Which layers a compressed-tensors checkpoint's config groups quantize, resolved as compressed-tensors does.

qat's writer names every layer in `targets`; other writers (llm-compressor) write class names and regexes with an
`ignore` list: `targets: ["Linear"], ignore: ["lm_head"]`, or mixed recipes (`Linear` in one group,
`re:.*down_proj` in another). compressed-tensors' rules (`utils/match.py`, `quantization/lifecycle/apply.py`,
0.20), applied here to the layers whose quantized tensors the checkpoint holds (`<m>.weight_packed`,
`<m>.weight_scale`):
    "model.layers.0.mlp.down_proj"   that module's name exactly
    "re:.*mlp.*"                     a regex, re.match against the module name
    "Linear"                         a class name: the module's class or one of its bases (vLLM's LinearBase
                                     counts as Linear); a per-expert piece of fused experts (`<experts>.3.down_proj`,
                                     a Linear in the model that wrote it) matches "Linear"
A layer `ignore` matches (names, regexes, classes; for every group) is not quantized. Each other layer takes one
group: of the targets it matches, an exact name first, then regexes, then class names (alphabetically within a
kind: `match_targets`' order), and a target string several groups list belongs to the last of them (the
target -> scheme dict compressed-tensors builds). Names are the checkpoint's (before any transformers renaming); a
name target is taken as given, so a missing layer is reported by the reader; a group that takes no layer is warned
about, naming it: its scheme is not applied.
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


def _target_list(value, where, what: str) -> list[str]:
    """A group's `targets` / the `ignore` list: strings, duplicates dropped (first place kept)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise BadFileError(where, f"{what} is {str(value)[:120]}; expected a list of strings (module names, "
                                  "'re:' regexes, class names)")
    return list(dict.fromkeys(value))


def _compile(targets: Iterable[str], where, what: str) -> dict[str, re.Pattern]:
    """{target: compiled regex} of the `re:` targets, each compiled once; a bad one named with `what`."""
    out = {}
    for t in targets:
        if t.startswith("re:"):
            try:
                out[t] = re.compile(t[3:])
            except re.error as err:
                raise BadFileError(where, f"{what}: target {t!r} is not a valid regular expression ({err})") from None
    return out


def _order(target: str) -> tuple[bool, str]:
    return "re:" in target, target  # match_targets' sort: names (and class names), then regexes, alphabetically


def group_targets(groups: dict, ignore: list[str] | None, layers: list[str],
                  classes: Callable[[str], list[str]], where) -> dict[str, str]:
    """{layer (checkpoint name): config group key} of every layer a group quantizes, one group per layer by
    compressed-tensors' precedence (the module docstring).

    Args:
        groups: the checkpoint's `config_groups`; ignore: its `ignore` list.
        layers: the checkpoint's quantized layers (`stored_layers`), which class and regex targets resolve over.
        classes: a layer name -> the class names of its module and bases ([] where the model has no such module).
        where: the file named in errors.
    Raises:
        BadFileError: targets / ignore not a list of strings, or a `re:` target that is not a valid regex, naming
            the group (or ignore) and the target.
    Example:
        >>> group_targets({"a": {"targets": ["Linear"]}, "b": {"targets": ["re:.*down_proj"]}}, ["lm_head"],
        ...               ["lm_head", "l.q_proj", "l.down_proj"], lambda n: ["Linear"], "config.json")
        {'l.down_proj': 'b', 'l.q_proj': 'a'}
    """
    ignored = _target_list(ignore, where, "ignore")
    regex = _compile(ignored, where, "ignore")
    owner: dict[str, str] = {}  # target -> the last group that lists it (compressed-tensors' target_to_scheme)
    listers: dict[str, list[str]] = {}  # target -> every group that lists it
    listed: dict[str, list[str]] = {}
    for key, group in groups.items():
        targets = _target_list(group.get("targets") if isinstance(group, dict) else None, where,
                               f"config group {key!r} targets")
        regex.update(_compile(targets, where, f"config group {key!r}"))
        listed[key] = targets
        for t in targets:
            owner[t] = key
            listers.setdefault(t, []).append(key)
    plain_ignored = {i for i in ignored if i not in regex}
    ignored_regex = [regex[i] for i in ignored if i in regex]
    group_regex = sorted((t for t in owner if t in regex), key=_order)
    named = [t for t in owner if t not in regex and "." in t]  # taken as given (a missing one: the reader says so)
    out: dict[str, str] = {}  # in the order the groups name layers (qat's writer: the model's), then sorted
    matched: set[str] = set()  # groups with a target that matches a layer, before precedence
    for n in named + sorted(set(layers).difference(named)):
        cls = classes(n)
        if n in plain_ignored or any(r.match(n) for r in ignored_regex) or any(c in plain_ignored for c in cls):
            continue
        hits = sorted(([n] if n in owner and n not in regex else []) + [t for t in group_regex if regex[t].match(n)],
                      key=_order)  # name matches: the exact name, the regexes
        hits += sorted({c for c in cls if c in owner and c not in hits}, key=_order)  # then class matches
        if hits:
            out[n] = owner[hits[0]]
            matched.update(k for t in hits for k in listers[t])
    taken = set(out.values())
    for key, targets in listed.items():
        if key not in taken:
            why = (f"takes no quantized layer of {where}: each one it matches takes another group's scheme "
                   "(compressed-tensors' precedence: an exact name, then re: regexes, then class names; a target "
                   "two groups list belongs to the later)" if key in matched
                   else f"matches no quantized layer of {where}")
            log.warning("compressed-tensors loader: config group %r (targets %s) %s; its scheme is not applied",
                        key, targets, why)
    return out


def module_classes(model: nn.Module, name: str, rename: Callable[[str], str], expert_piece: re.Pattern) -> list[str]:
    """The class names `group_targets` compares a class target with: the module's class and bases (vLLM's
    LinearBase as Linear too), or ["Linear"] for a per-expert piece of fused experts; [] where the model has no such
    module."""
    try:
        module = model.get_submodule(rename(name))
    except AttributeError:
        return ["Linear"] if expert_piece.match(name) else []
    names = [c.__name__ for c in type(module).__mro__ if issubclass(c, nn.Module)]
    return names + (["Linear"] if "LinearBase" in names else [])
