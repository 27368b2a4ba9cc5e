"""Per (module, candidate) sensitivity scores: the table, its JSON file, and the registry of scoring methods.

A scoring method is one file of this package, a `Scorer` subclass registered with `@register_scorer`; it
returns {module: {candidate: score}} where a score estimates the loss increase of putting that module alone in
that candidate (0 for float). The table keeps, per module, its shape, parameter count, GGUF tensor name(s) and
every fitting candidate's storage bits (from the formats' own layouts), so that a new budget is re-solved from
the JSON file alone, without the model.

    table = score_model(model, menu, batches, "fisher")
    table.save("out/scores.json"); ScoreTable.load("out/scores.json")
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from qat.errors import BadFileError, ConfigError
from qat.io import unique_keys, write_json
from qat.modules.quantizer import TensorQuantizer
from qat.sensitivity.base import apply_context, select_base
from qat.sensitivity.menu import Candidate
from qat.spec import QuantSpec
from qat.transform import QuantRecipe, as_recipe, matches

VERSION = 1
SCORERS: dict[str, type["Scorer"]] = {}


class Scorer:
    """A sensitivity scoring method: `Config` (its options, checked in __post_init__) and `score`."""

    name = ""

    @dataclass
    class Config:
        pass

    def __init__(self, config: "Scorer.Config | None" = None) -> None:
        self.config = config or self.Config()

    def score(self, model: nn.Module, modules: dict[str, nn.Linear], menu: dict[str, Candidate],
              fits: dict[str, list[str]], batches: list[torch.Tensor]) -> dict[str, dict[str, float]]:
        """{module: {candidate: score}} for the candidates in `fits[module]`."""
        raise NotImplementedError


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Register a Scorer subclass under its `name` (a class decorator).

    Raises:
        ValueError: a name already taken by another class.
    """
    if cls.name in SCORERS and SCORERS[cls.name] is not cls:
        raise ValueError(f"scorer {cls.name!r} already registered")
    SCORERS[cls.name] = cls
    return cls


def build_scorer(options: Mapping[str, Any]) -> Scorer:
    """A scorer from {name: ..., <its options>}; unknown names and options are refused naming them. An option
    set to None is left to the scorer's default (configs/sensitivity.yaml declares every method's options null).

    Example:
        >>> build_scorer({"name": "hutchinson", "probes": 4}).config.probes
        4
    """
    options = {k: v for k, v in dict(options or {}).items() if v is not None}  # null: the scorer's default
    name = options.pop("name", None)
    if name not in SCORERS:
        raise ConfigError(f"method.name={name!r}; choose from {sorted(SCORERS)}")
    cls = SCORERS[name]
    allowed = [f.name for f in fields(cls.Config)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"method: unknown option(s) {unknown} for {name}; valid options are {allowed}")
    return cls(cls.Config(**options))


@torch.no_grad()
def quantized_weight(weight: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """`weight` as fake quant computes it under `spec` (a fresh weight quantizer: the scheme's observer, its
    format's numerics), float32; `spec` None returns the weight itself."""
    w = weight.detach().float()
    if spec is None:
        return w
    return TensorQuantizer(spec, "weight", w)(w).float()


def target_modules(model: nn.Module, targets: Iterable[str], ignore: Iterable[str]) -> dict[str, nn.Linear]:
    """The nn.Linear modules a recipe with these `targets` / `ignore` patterns would quantize, by name.

    Raises:
        ConfigError: nothing selected.
    """
    targets, ignore = list(targets), list(ignore)
    out = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)
           and any(matches(p, name, m) for p in targets) and not any(matches(p, name, m) for p in ignore)}
    if not out:
        raise ConfigError(f"targets={targets} / ignore={ignore} select no nn.Linear of the model")
    return out


@dataclass
class ModuleEntry:
    """One scored module: shape, parameter count, GGUF tensor names, and per fitting candidate its storage bits
    and score."""

    name: str
    shape: tuple[int, ...]
    bits: dict[str, int]
    scores: dict[str, float] = field(default_factory=dict)
    gguf: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return math.prod(self.shape)


@dataclass
class ScoreTable:
    """Every module's scores and costs, plus how they were made (method, tokens, model, menu) and in which
    context: `base`, the base recipe's mapping (`QuantRecipe.to_dict`) or None (float activations)."""

    modules: list[ModuleEntry]
    candidates: dict[str, dict[str, Any]]
    method: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] | None = None

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    def to_dict(self) -> dict[str, Any]:
        mods = [{"name": m.name, "shape": list(m.shape), "params": m.params, "gguf": m.gguf,
                 "bits": m.bits, "bits_per_weight": {c: b / m.params for c, b in m.bits.items()},
                 "scores": m.scores} for m in self.modules]
        return {"version": VERSION, "method": self.method, "meta": self.meta, "candidates": self.candidates,
                "candidate_order": list(self.candidates), "base": self.base,
                "modules": mods}  # JSON keys are written sorted

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON, atomically (`qat.io.write_json`)."""
        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScoreTable":
        """Read a table written by `save`; a file that is not one is refused naming it and what is wrong.

        Raises:
            FileNotFoundError: no such file. BadFileError: not JSON, or not a scores table.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(), object_pairs_hook=unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
            raise BadFileError(path, f"not a scores JSON file ({err})") from None
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise BadFileError(path, f"not a qat-sensitivity scores file ({type(err).__name__}: {err})") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ScoreTable":
        if data.get("version") != VERSION:
            raise ValueError(f"version={data.get('version')!r}; this qat reads version {VERSION}")
        modules = []
        for m in data["modules"]:
            bits = {str(c): int(b) for c, b in m["bits"].items()}
            scores = {str(c): float(s) for c, s in m["scores"].items()}
            if set(scores) - set(bits) or not bits:
                raise ValueError(f"module {m['name']!r}: scores for candidates with no bits")
            if not all(math.isfinite(s) for s in scores.values()):
                raise ValueError(f"module {m['name']!r}: a score that is not finite")
            modules.append(ModuleEntry(str(m["name"]), tuple(int(d) for d in m["shape"]), bits, scores,
                                       [str(g) for g in m.get("gguf", [])]))
        cands = dict(data["candidates"])
        order = [str(c) for c in data.get("candidate_order") or sorted(cands)]  # the menu's order: tables, ties
        if sorted(order) != sorted(cands):
            raise ValueError(f"candidate_order={order} is not an order of the candidates {sorted(cands)}")
        base = data.get("base")  # absent in files of before the base recipe: float activations
        if base is not None:
            base = QuantRecipe.from_dict(base).to_dict()  # refused here (ConfigError, a ValueError) if invalid
        return cls(modules, {c: cands[c] for c in order}, str(data.get("method", "")), dict(data.get("meta", {})),
                   base)


def fitting(modules: dict[str, nn.Linear], menu: dict[str, Candidate]) -> dict[str, list[str]]:
    """For each module, the candidates its weight can take exactly (`Candidate.misfit`).

    Raises:
        ConfigError: a module that no candidate fits, naming it and why each does not.
    """
    out, bad = {}, []
    for name, m in modules.items():
        shape = tuple(m.weight.shape)
        out[name] = [c for c, cand in menu.items() if cand.misfit(shape) is None]
        if not out[name]:
            why = "; ".join(f"{c}: {cand.misfit(shape)}" for c, cand in menu.items())
            bad.append(f"{name} {shape}: {why}")
    if bad:
        raise ConfigError("no candidate of the menu fits:\n" + "\n".join(f"  - {b}" for b in bad))
    return out


def score_model(model: nn.Module, menu: dict[str, Candidate], batches: list[torch.Tensor],
                method: Mapping[str, Any] | str = "fisher", targets: Iterable[str] = ("Linear",),
                ignore: Iterable[str] = ("lm_head",), gguf_names: Callable[[str], list[str]] | None = None,
                meta: Mapping[str, Any] | None = None, base: QuantRecipe | Mapping[str, Any] | str | None = None
                ) -> ScoreTable:
    """Score every targeted linear of `model` under every fitting candidate of `menu`.

    Args:
        model: a float Hugging Face causal LM (not prepared).
        menu: `build_menu`'s candidates.
        batches: calibration LongTensors [B, T].
        method: a scorer name or {name, <options>} (`SCORERS`: fisher, hutchinson, kl).
        gguf_names: module name -> its GGUF tensor names (kept in the table for llama-quantize arguments).
        base: a base recipe (name, path, mapping or QuantRecipe; `qat.sensitivity.base`): only the modules it
            quantizes are scored, with its input / KV schemes and rotations applied to `model` *in place* first
            (None: the float model, as is).
    Returns:
        the ScoreTable (with `base` recorded).
    Example:
        >>> table = score_model(tiny_llama(), build_menu(MENU), [torch.randint(0, 512, (2, 32))])
    """
    scorer = build_scorer({"name": method} if isinstance(method, str) else method)
    recipe = None if base is None else as_recipe(base)
    modules = target_modules(model, targets, ignore)
    if recipe is not None:
        modules = select_base(modules, recipe)
    fits = fitting(modules, menu)
    if not batches:
        raise ConfigError("calibration: no batches to score with; give calibration.samples >= 1")
    if recipe is not None:
        apply_context(model, recipe, batches)
        modules = {name: model.get_submodule(name) for name in modules}  # the fake-quant modules now there
    scores = scorer.score(model, modules, menu, fits, batches)
    entries = []
    for name, m in modules.items():
        shape = tuple(m.weight.shape)
        entries.append(ModuleEntry(name, shape, {c: menu[c].bits(shape) for c in fits[name]},
                                   {c: float(scores[name][c]) for c in fits[name]},
                                   gguf_names(name) if gguf_names else []))
    tokens = sum(int(b.numel()) for b in batches)
    return ScoreTable(entries, {c: cand.to_dict() for c, cand in menu.items()}, scorer.name,
                      {"tokens": tokens, **dict(meta or {})}, None if recipe is None else recipe.to_dict())
