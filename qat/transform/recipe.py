"""`QuantRecipe`: which modules, which tensor roles, which schemes, with per-module overrides.

A recipe is what a `configs/quant/*.yaml` file holds:

    name: w4a16_g128
    targets: [Linear]            # class names, module names, or "re:<regex>" on module names
    ignore: [lm_head]
    weight: {bits: 4, granularity: per_group, group_size: 128}
    input: null                  # input-activation scheme
    kv_cache: null               # key / value scheme for attention modules
    rotations: null              # {r1, r2, r3, r4, kv_cache, seed}: qat.transform.rotations.RotationConfig
    gguf_fallback: false         # true: rows a GGUF super-block cannot hold train on llama.cpp's fallback type
    overrides:                   # later entries win; keys merge into the base scheme
      - targets: ["re:.*down_proj"]
        weight: {bits: 6}
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

from qat.errors import ConfigError, UserError
from qat.formats import gguf_fallback, gguf_types
from qat.recipes import read_recipe
from qat.spec import QuantSpec, TensorSchemes, check_keys, check_scheme
from qat.transform.rotations.base import RotationConfig

ROLE_KEYS = ("weight", "input", "kv_cache")


def to_plain(obj: Any) -> Any:
    """Mappings and sequences (an OmegaConf DictConfig / ListConfig included: reading a value resolves its
    interpolation) -> plain dicts and lists; anything else as it is. The core needs no omegaconf for this."""
    if isinstance(obj, Mapping):
        return {key: to_plain(value) for key, value in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [to_plain(value) for value in obj]
    return obj


@dataclass(frozen=True)
class Override:
    """Scheme changes for the modules matching `targets`; a role set to None turns that role off."""

    targets: tuple[str, ...]
    changes: Mapping[str, Mapping[str, Any] | None]

    def apply(self, schemes: TensorSchemes, owner: str) -> TensorSchemes:
        out = {role: getattr(schemes, role) for role in ROLE_KEYS}
        for role, change in self.changes.items():
            if change is None:
                out[role] = None
                continue
            base = out[role].to_dict() if out[role] is not None else {}
            check_scheme(f"{owner}.{role}", change)
            check_keys(f"{owner}.{role}", change, [f.name for f in fields(QuantSpec)])
            merged = {**base, **change}
            if "granularity" in change and change["granularity"] != "per_group" and "group_size" not in change:
                merged["group_size"] = None
                merged.pop("ragged", None)
            out[role] = QuantSpec.from_dict(merged, owner=f"{owner}.{role}")
        return TensorSchemes(**out)


@dataclass(frozen=True)
class QuantRecipe:
    """A validated quantization recipe. Build it with `QuantRecipe.from_dict` (or `load_recipe`).

    Example:
        >>> r = QuantRecipe.from_dict({"name": "w8", "weight": {"bits": 8}})
        >>> r.base.weight.bits
        8
    """

    name: str = "custom"
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()
    base: TensorSchemes = field(default_factory=TensorSchemes)
    overrides: tuple[Override, ...] = ()
    description: str = ""
    rotations: RotationConfig | None = None
    gguf_fallback: bool = False

    KEYS = ("name", "description", "targets", "ignore", *ROLE_KEYS, "overrides", "rotations", "gguf_fallback")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | "QuantRecipe") -> "QuantRecipe":
        """Validate a mapping (YAML node), or load a recipe by name (`qat.load_recipe`). Unknown keys anywhere
        and bad values raise ConfigError (a ValueError) naming them."""
        try:
            return cls._from_dict(data)
        except UserError:
            raise
        except ValueError as err:  # QuantSpec's own checks: qat.spec imports no qat module, so they raise ValueError
            raise ConfigError(str(err)) from err

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any] | "QuantRecipe") -> "QuantRecipe":
        if isinstance(data, QuantRecipe):
            return data
        if isinstance(data, str):
            raise TypeError(f"QuantRecipe.from_dict({data!r}): a recipe name or YAML path is loaded by "
                            "qat.load_recipe (or qat.transform.as_recipe, which takes either)")
        data = dict(to_plain(data) or {})
        data.pop("_target_", None)
        check_keys("quant", data, cls.KEYS)
        roles = {r: None if data.get(r) is None else QuantSpec.from_dict(data[r], owner=f"quant.{r}") for r in ROLE_KEYS}
        if all(v is None for v in roles.values()):
            raise ConfigError(f"quant: recipe {data.get('name', '?')!r} quantizes nothing; set one of {list(ROLE_KEYS)}")
        _check_weight_global(roles.get("weight"), "quant.weight")
        overrides = []
        for i, raw in enumerate(data.get("overrides") or []):
            if not isinstance(raw, Mapping):
                raise ConfigError(f"quant.overrides[{i}]={raw!r}: an override is a mapping of targets and the "
                                  f"schemes it changes ({', '.join(ROLE_KEYS)}), e.g. {{targets: [re:.*down_proj], "
                                  "weight: {bits: 8}}")
            raw = dict(raw)
            check_keys(f"quant.overrides[{i}]", raw, ("targets", *ROLE_KEYS))
            if not raw.get("targets"):
                raise ConfigError(f"quant.overrides[{i}]: 'targets' is required (a list of module patterns)")
            changes = {r: raw[r] for r in ROLE_KEYS if r in raw}
            override = Override(tuple(_as_list(raw["targets"], f"quant.overrides[{i}].targets")), changes)
            applied = override.apply(TensorSchemes(**roles), f"quant.overrides[{i}]")  # validate now, not mid-model
            _check_weight_global(applied.weight, f"quant.overrides[{i}].weight")
            overrides.append(override)
        fallback = data.get("gguf_fallback", False)
        if not isinstance(fallback, bool):
            raise ConfigError(f"quant.gguf_fallback={fallback!r}; use true or false")
        if fallback:
            _check_gguf_fallback(TensorSchemes(**roles), overrides)
        return cls(
            name=str(data.get("name", "custom")),
            targets=tuple(_as_list(data.get("targets", ["Linear"]), "quant.targets")),
            ignore=tuple(_as_list(data.get("ignore") or [], "quant.ignore")),
            base=TensorSchemes(**roles),
            overrides=tuple(overrides),
            description=str(data.get("description", "")),
            rotations=RotationConfig.from_dict(data.get("rotations")),
            gguf_fallback=fallback,
        )

    def static_activation_roles(self) -> list[str]:
        """The activation roles ("input", "kv_cache") some module of this recipe quantizes with held (static,
        calibrated) ranges, base scheme or override: what needs range calibration before any evaluation."""
        schemes = [self.base] + [o.apply(self.base, f"quant.overrides[{i}]") for i, o in enumerate(self.overrides)]
        return [role for role in ("input", "kv_cache")
                if any(getattr(s, role) is not None and not getattr(s, role).dynamic for s in schemes)]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "description": self.description, "targets": list(self.targets),
                               "ignore": list(self.ignore)}
        for role in ROLE_KEYS:
            spec = getattr(self.base, role)
            out[role] = None if spec is None else spec.to_dict()
        out["overrides"] = [{"targets": list(o.targets), **o.changes} for o in self.overrides]
        if self.rotations is not None:
            out["rotations"] = self.rotations.to_dict()
        if self.gguf_fallback:
            out["gguf_fallback"] = True
        return out


def _check_gguf_fallback(base: TensorSchemes, overrides: list[Override]) -> None:
    """gguf_fallback=true needs a weight scheme (the base or an override's) on a GGUF grid whose type has a
    fallback (the super-block types); refused at load, naming the grids it applies to."""
    owners = {"quant.weight": base.weight}
    owners |= {f"quant.overrides[{i}].weight": o.apply(base, f"quant.overrides[{i}]").weight
               for i, o in enumerate(overrides) if "weight" in o.changes}
    if any(spec is not None and gguf_fallback(spec) for spec in owners.values()):
        return
    grids: dict[str, list[str]] = {}
    for name, t in gguf_types().items():
        if t.fallback:
            grids.setdefault(t.spec().describe(), []).append(f"{name} -> {t.fallback}")
    applies = "; ".join(f"{spec} ({', '.join(types)})" for spec, types in grids.items())
    given = ", ".join(f"{owner}: {'none' if s is None else s.describe()}" for owner, s in owners.items())
    raise ConfigError(f"quant.gguf_fallback=true trains the rows a GGUF super-block type cannot hold on llama.cpp's "
                      f"fallback type; it applies to weights on the grids {applies}, and this recipe has none "
                      f"({given}): remove the key or use such a grid (a ternary grid is GGUF TQ2_0 at group_size 256)")


def _check_weight_global(spec: QuantSpec | None, owner: str) -> None:
    """static_global holds a calibrated activation global; on a weight scheme it is refused here, before any
    model loads (TensorQuantizer refuses it too, for specs built by hand)."""
    if spec is not None and spec.static_global:
        raise ConfigError(f"{owner}.static_global=true: a static global is calibrated from activations; a weight's "
                          "global comes from the weight itself: leave static_global false on weight schemes "
                          "(set it on quant.input)")


def _as_list(value: Any, owner: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{owner}={value!r}; expected a list of strings")
    return list(value)


def load_recipe(name_or_path: str | os.PathLike) -> QuantRecipe:
    """Load a recipe by name ("w4a16_g128", from configs/quant/) or from a YAML file path.

    Raises:
        FileNotFoundError: neither a known name nor an existing file, listing the known names.
        ValueError: an invalid recipe, naming the key.
    Example:
        >>> load_recipe("w4a16_g128").base.weight.group_size
        128
    """
    return QuantRecipe.from_dict(read_recipe(name_or_path))


def as_recipe(recipe: Any) -> QuantRecipe:
    """A QuantRecipe from a recipe, a recipe name or YAML path (`load_recipe`), or a mapping (a YAML node).

    Example:
        >>> as_recipe("w8a8") == load_recipe("w8a8")
        True
    """
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe)
    return QuantRecipe.from_dict(recipe)
