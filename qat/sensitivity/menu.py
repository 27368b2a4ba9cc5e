"""The menu of candidate formats a sensitivity analysis scores and a solver chooses from.

A menu maps a candidate name to where its weight scheme comes from: a recipe of `configs/quant/` (its base
weight scheme: `{recipe: gguf_q4_k}`), an inline scheme (`{weight: {bits: 4, group_size: 64, ...}}`) or none
(`{weight: null}`: keep the module in float). Nothing here knows a format by name: every number (the bits a
weight of a given shape takes, the GGUF type a scheme stores exactly, its block) is asked of `qat.formats`,
so a format added there (IQ4_XS, say) is one more menu line.

    menu = build_menu({"int4_g64": {"weight": {"bits": 4, "granularity": "per_group", "group_size": 64}},
                       "Q4_K": {"recipe": "gguf_q4_k"}, "float": {"weight": None}})
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from qat.errors import ConfigError
from qat.formats import get_format, gguf_types, storage_bits
from qat.spec import QuantSpec
from qat.transform import load_recipe
from qat.transform.recipe import to_plain

ENTRY_KEYS = ("recipe", "weight")


@dataclass(frozen=True)
class Candidate:
    """One format a module may take: `spec` None keeps the weight in float (at `float_bits` per weight)."""

    name: str
    spec: QuantSpec | None
    float_bits: int = 16

    @property
    def gguf_type(self) -> str | None:
        """The GGUF tensor type that stores this candidate exactly (F16 / F32 for float), else None."""
        if self.spec is None:
            return {16: "F16", 32: "F32"}.get(self.float_bits)
        return get_format(self.spec).gguf_type(self.spec)

    @property
    def gguf_only(self) -> bool:
        """True when GGUF is the only file format that stores this candidate (a GGUF block / K- / I-quant type:
        a format with GGUF types that no other file format holds); False for float and for MXFP4 / NVFP4 /
        MXFP8, which other formats (compressed-tensors) store together with an activation scheme."""
        if self.spec is None:
            return False
        fmt = get_format(self.spec)
        return bool(fmt.gguf) and not fmt.holds

    def misfit(self, shape: tuple[int, ...]) -> str | None:
        """Why a weight of `shape` cannot take this candidate exactly (None when it can)."""
        if self.spec is None:
            return None
        spec, cols = self.spec, shape[-1]
        if spec.granularity == "per_group" and not spec.ragged and cols % spec.group_size:
            return f"group_size={spec.group_size} does not divide {cols} columns"
        gguf = self.gguf_type
        if gguf is not None and cols % gguf_types()[gguf].block:
            return f"{gguf} needs rows that are a multiple of {gguf_types()[gguf].block} (llama.cpp would fall back)"
        return None

    def bits(self, shape: tuple[int, ...]) -> int:
        """Storage bits of a weight of `shape` in this candidate (codes, scales, zero-points: the format's own)."""
        if self.spec is None:
            return self.float_bits * math.prod(shape)
        return storage_bits(self.spec, tuple(shape))

    def to_dict(self) -> dict[str, Any]:
        return {"weight": None if self.spec is None else self.spec.to_dict(), "gguf_type": self.gguf_type}


def build_menu(entries: Mapping[str, Any], float_bits: int = 16) -> dict[str, Candidate]:
    """Candidates from a menu mapping (see the module docstring), checked now: every bad entry in one error.

    Raises:
        ConfigError: an empty menu, an entry that is not a mapping of `recipe` or `weight`, an unknown recipe,
            a bad scheme, float_bits other than 16 / 32; each naming `menu.<name>`.
    Example:
        >>> build_menu({"Q8_0": {"recipe": "gguf_q8_0"}})["Q8_0"].gguf_type
        'Q8_0'
    """
    entries = to_plain(entries)
    if float_bits not in (16, 32):
        raise ConfigError(f"float_bits={float_bits!r}; choose 16 or 32 (the float weight kept)")
    if not isinstance(entries, Mapping) or not entries:
        raise ConfigError(f"menu={entries!r}; give a mapping of candidate name -> {{recipe: <name>}} or "
                          "{weight: <scheme or null>}")
    menu, errors = {}, []
    for name, entry in entries.items():
        try:
            menu[str(name)] = Candidate(str(name), _entry_spec(str(name), entry), float_bits)
        except (ConfigError, ValueError, FileNotFoundError) as err:
            errors.append(str(err) if str(err).startswith(f"menu.{name}") else f"menu.{name}: {err}")
    if errors:
        raise ConfigError("bad menu:\n" + "\n".join(f"  - {e}" for e in errors))
    return menu


def _entry_spec(name: str, entry: Any) -> QuantSpec | None:
    owner = f"menu.{name}"
    if not isinstance(entry, Mapping) or len(entry) != 1 or next(iter(entry)) not in ENTRY_KEYS:
        raise ConfigError(f"{owner}={entry!r}; give exactly one of {{recipe: <configs/quant name>}} or "
                          "{weight: <scheme or null for float>}")
    if "recipe" in entry:
        try:
            spec = load_recipe(str(entry["recipe"])).base.weight
        except FileNotFoundError as err:
            raise ConfigError(f"{owner}.recipe: {err.args[0] if err.args else err}") from None
        if spec is None:
            raise ConfigError(f"{owner}.recipe={entry['recipe']!r} has no weight scheme")
        return spec
    if entry["weight"] is None:
        return None
    spec = QuantSpec.from_dict(entry["weight"], owner=f"{owner}.weight")
    if spec.dynamic or spec.granularity == "per_token":
        raise ConfigError(f"{owner}.weight: a weight scheme is static; got {spec.describe()}")
    return spec
