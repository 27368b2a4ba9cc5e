"""What to simulate: `QuantSpec` for one tensor, `TensorSchemes` for the roles of one module.

Every field is checked when the dataclass is built, and a bad value names the field and the
values that would be valid. `QuantSpec.from_dict` refuses unknown keys, so a misspelt YAML key
fails instead of being ignored.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Protocol

import torch

GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")
LEARN_MODES = ("none", "lsq", "lsq_plus", "pact")
SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROLES = ("weight", "input", "kv_cache")


class FormatRules(Protocol):
    """What a QuantSpec asks the format of its (grid, dtype): `qat.formats.Format` implements it."""

    name: str
    is_float: bool

    def check(self, spec: "QuantSpec") -> None: ...

    def default_signed(self, spec: "QuantSpec") -> bool: ...

    held_global: bool


SPEC_FORMATS: dict[tuple[str, str], FormatRules] = {}
"""(grid, dtype) -> the format that owns such specs, filled by `qat.formats.register_format`. This module
imports no format (the formats import it), so the layers stay formats -> spec."""

SPEC_OBSERVERS: dict[str, Callable[["QuantSpec"], Any]] = {}
"""observer name -> its builder (raises ValueError on bad observer_args), filled by
`qat.observers.register_observer` (observers sit above this module)."""


def _check_choice(owner: str, name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name}={value!r}; choose from {list(choices)}")


def _check_int(owner: str, name: str, value: Any) -> int:
    # bool is an int in Python (True == 1) and 4.0 == 4: both would slip through a membership test
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{owner}.{name}={value!r}; expected an integer")
    return int(value)


def _check_bool(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    # a quoted YAML "false" is a non-empty string, hence truthy: refuse it instead of reading it as True
    if not isinstance(value, bool) and not (allow_none and value is None):
        raise ValueError(f"{owner}.{name}={value!r}; use true or false" + (" (or null for the default)" if allow_none else ""))


def check_keys(owner: str, given: Mapping[str, Any], allowed) -> None:
    """Raise one error naming every unknown key in `given` and the keys that are valid."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"{owner}: unknown key(s) {unknown}; valid keys are {sorted(allowed)}")


def grid_names() -> list[str]:
    """The grids of the registered formats ("uniform" first): what `QuantSpec.grid` chooses from."""
    return sorted({g for g, _ in SPEC_FORMATS}, key=lambda g: (g != "uniform", g))


def check_scheme(owner: str, value: Any) -> None:
    """A scheme (a recipe's weight / input / kv_cache, an override's change of one) is a mapping of QuantSpec fields:
    a name there (`weight: mxfp4`) is refused in one line naming the key, with the grids a format is chosen by.

    Example:
        >>> check_scheme("quant.weight", "mxfp4")   # ValueError: quant.weight='mxfp4': a scheme is a mapping ...
    """
    if not isinstance(value, Mapping):
        what = "a name" if isinstance(value, str) else f"a {type(value).__name__}"
        raise ValueError(f"{owner}={value!r}: a scheme is a mapping of QuantSpec fields (null: none), not {what}; a "
                         f"number format is chosen by its grid, one of {grid_names()}, and dtype (a whole recipe: "
                         "quant=<recipe name>)")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Args:
        bits: integer width 2..8 (8 for the fp8 dtypes).
        dtype: "int", "fp8_e4m3" or "fp8_e5m2".
        symmetric: zero-point fixed at 0 (True) or fitted (False, integer only).
        signed: code range; defaults to signed for symmetric, unsigned for asymmetric.
        granularity: "per_tensor", "per_channel" (along `axis`), "per_group" (groups of
            `group_size` along the last, input dimension) or "per_token" (one range per row of
            the last dimension; always dynamic).
        axis: the channel axis for per_channel.
        group_size: elements per group for per_group.
        ragged: per_group only. False (the default): a group size that does not divide the row is an
            error. True: rows are split into ceil(I / group_size) groups and the last one is shorter,
            as GPTQ and compressed-tensors checkpoints store them (SmolLM2's 576-wide rows at g128:
            four groups of 128 and one of 64).
        dynamic: ranges recomputed from every tensor (True) or estimated and held (False).
        observer: range estimator for static ranges: minmax, moving_average, percentile, mse.
        observer_args: keyword arguments of that observer (e.g. {"percentile": 99.9}).
        scale_dtype: storage dtype of scales, "fp32", "fp16" or "bf16"; scales are rounded to it.
        learn: "none", "lsq" (learned step), "lsq_plus" (learned step and offset) or "pact"
            (learned clipping).
        grid: "uniform" (the default numerics above) or the grid of another format registered in
            `qat.formats` (the format checks the fields it needs): "ggml" (llama.cpp's legacy blocks
            Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1), "ggml_k" (the K-quants Q2_K..Q6_K with two-level scales), ...
            so that fake quant equals the GGUF blocks bit for bit. See `qat.formats.ggml` / `kquant`.
        clip_ratio: dynamic schemes on the uniform grid only: the range each tensor takes is its min / max times
            this ratio, in (0, 1] (1: no clipping), before the scale is chosen; the values beyond it saturate.
            Clipping the rare largest activations of a group or token to 0.9 of its peak (0.95 for the KV cache)
            gives the other values finer steps: QuaRot's activation quantizers clip so. Held ranges have their
            own clipping estimators (observer percentile / mse) and learned ranges (lsq, pact) instead.
        static_global: activations of a format with a per-tensor global scale over its block scales (NVFP4):
            the global is held (calibrated from the running range, as static ranges are: dynamic=False) and the
            block scales are computed from each tensor, compressed-tensors' `dynamic: local` with an
            `input_global_scale`. False: the global too comes from each tensor. Observer minmax, moving_average
            or percentile (the held range is one per tensor); learn none. On a converted weight (never a
            fake-quant one, whose global comes from the weight) it marks a global held as stored: an NVFP4
            checkpoint's weight_global_scale that is not qat's power of two, its block scales used as given.
    Raises:
        ValueError: a field out of range, naming the field and the valid values.

    Example:
        >>> QuantSpec(bits=4, granularity="per_group", group_size=128).qmax
        7
    """

    bits: int = 8
    dtype: str = "int"
    symmetric: bool = True
    signed: bool | None = None
    granularity: str = "per_channel"
    axis: int = 0
    group_size: int | None = None
    dynamic: bool = False
    observer: str = "minmax"
    observer_args: Mapping[str, Any] = field(default_factory=dict)
    scale_dtype: str = "fp32"
    learn: str = "none"
    grid: str = "uniform"
    ragged: bool = False
    static_global: bool = False
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        owner = "QuantSpec"
        self._check_types(owner)
        if not SPEC_FORMATS or not SPEC_OBSERVERS:  # filled when qat.formats / qat.observers are imported
            raise RuntimeError("QuantSpec: no number format or observer is registered yet; import qat first")
        _check_choice(owner, "dtype", self.dtype, sorted({d for _, d in SPEC_FORMATS}, key=lambda d: (d != "int", d)))
        _check_choice(owner, "granularity", self.granularity, GRANULARITIES)
        _check_choice(owner, "scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES))
        _check_choice(owner, "learn", self.learn, LEARN_MODES)
        if self.observer not in SPEC_OBSERVERS:
            raise ValueError(f"QuantSpec.observer={self.observer!r}; choose from {sorted(SPEC_OBSERVERS)}")
        if not isinstance(self.observer_args, Mapping):
            raise ValueError(f"QuantSpec.observer_args={self.observer_args!r}; expected a mapping such as "
                             "{'percentile': 99.9}")
        if self.granularity == "per_group":
            if not isinstance(self.group_size, int) or self.group_size < 2:
                raise ValueError(f"QuantSpec.group_size={self.group_size!r}; per_group needs an int >= 2")
        elif self.group_size is not None:
            raise ValueError(
                f"QuantSpec.group_size={self.group_size} is only used with granularity='per_group', "
                f"not {self.granularity!r}"
            )
        if self.ragged:
            self._check_ragged()
        if self.granularity == "per_token" and not self.dynamic:
            object.__setattr__(self, "dynamic", True)  # a per-token range only exists at run time
        fmt = self._format()
        if self.signed is None:
            object.__setattr__(self, "signed", fmt.default_signed(self))
        if self.learn in ("lsq", "lsq_plus", "pact") and self.dynamic:
            raise ValueError(f"QuantSpec.learn={self.learn!r} needs static ranges (dynamic=False)")
        if self.learn == "lsq_plus" and self.symmetric:
            raise ValueError("QuantSpec.learn='lsq_plus' learns a zero-point; set symmetric=False")
        if self.learn == "pact" and not self.symmetric:
            raise ValueError("QuantSpec.learn='pact' learns a symmetric clip; set symmetric=True")
        if self.static_global:
            self._check_static_global(fmt)
        if self.clip_ratio != 1.0:
            self._check_clip_ratio()
        fmt.check(self)
        object.__setattr__(self, "observer_args", dict(self.observer_args))
        SPEC_OBSERVERS[self.observer](self)  # observer_args are checked here, not halfway through prepare

    def _format(self) -> FormatRules:
        _check_choice("QuantSpec", "grid", self.grid, grid_names())
        if (self.grid, self.dtype) not in SPEC_FORMATS:
            dtypes = sorted(d for g, d in SPEC_FORMATS if g == self.grid)
            raise ValueError(f"QuantSpec.grid={self.grid!r} needs dtype in {dtypes}, not {self.dtype!r}")
        return SPEC_FORMATS[(self.grid, self.dtype)]

    def _check_types(self, owner: str) -> None:
        object.__setattr__(self, "bits", _check_int(owner, "bits", self.bits))
        object.__setattr__(self, "axis", _check_int(owner, "axis", self.axis))
        for name in ("symmetric", "dynamic", "ragged", "static_global"):
            _check_bool(owner, name, getattr(self, name))
        _check_bool(owner, "signed", self.signed, allow_none=True)
        ratio = self.clip_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"QuantSpec.clip_ratio={ratio!r}; expected a number in (0, 1] (1: no clipping)")
        object.__setattr__(self, "clip_ratio", float(ratio))

    def _check_ragged(self) -> None:
        if not isinstance(self.ragged, bool):
            raise ValueError(f"QuantSpec.ragged={self.ragged!r}; use true or false")
        if self.granularity != "per_group":
            raise ValueError(f"QuantSpec.ragged=True applies to granularity='per_group', not {self.granularity!r}")
        if self.grid != "uniform":
            raise ValueError(f"QuantSpec.ragged=True needs grid='uniform'; {self.grid!r} blocks have a fixed size")
        if self.observer == "percentile":
            raise ValueError("QuantSpec.ragged=True with observer='percentile' is not supported; "
                             "use minmax, moving_average or mse")

    def _check_clip_ratio(self) -> None:
        if not self.dynamic or self.grid != "uniform":
            plain = dataclasses.replace(self, clip_ratio=1.0).describe()
            raise ValueError(f"QuantSpec.clip_ratio={self.clip_ratio:g} clips the range each tensor of a dynamic "
                             f"scheme on the uniform grid (int, fp8) takes, not a held or another grid's range "
                             f"({plain}); held ranges clip with observer percentile / mse or learn lsq / pact")

    def _check_static_global(self, fmt: FormatRules) -> None:
        held = sorted({f.name for f in SPEC_FORMATS.values() if getattr(f, "held_global", False)})
        if not getattr(fmt, "held_global", False):
            raise ValueError(f"QuantSpec.static_global=True holds a per-tensor global scale over block scales; "
                             f"formats with one: {held}, not {fmt.name!r}")
        if self.dynamic or self.learn != "none":
            raise ValueError(f"QuantSpec.static_global=True holds a calibrated global: it needs dynamic=False (the "
                             f"block scales stay dynamic) and learn='none', not dynamic={self.dynamic}, "
                             f"learn={self.learn!r}")
        if self.observer not in ("minmax", "moving_average", "percentile"):
            raise ValueError(f"QuantSpec.static_global=True holds one range per tensor (its global's): observer "
                             f"minmax, moving_average or percentile, not {self.observer!r}")

    def __hash__(self) -> int:
        values = [getattr(self, f.name) for f in fields(self)]
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, Mapping) else v for v in values))

    @property
    def is_float(self) -> bool:
        """Codes are floating-point numbers (fp8), not integers: the format says."""
        return SPEC_FORMATS[(self.grid, self.dtype)].is_float

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def describe(self) -> str:
        """A short name such as 'int4 sym g128' or 'fp8_e4m3 per_token dyn'."""
        kind = f"int{self.bits}" if self.dtype == "int" else self.dtype
        parts = [kind, "sym" if self.symmetric else "asym"]
        parts.append(f"g{self.group_size}{'r' if self.ragged else ''}" if self.granularity == "per_group"
                     else self.granularity)
        if self.dynamic:
            parts.append("dyn")
        if self.learn != "none":
            parts.append(self.learn)
        if self.grid != "uniform":
            parts.append(self.grid)
        if self.static_global:
            parts.append("static-global")
        if self.clip_ratio != 1.0:
            parts.append(f"clip{self.clip_ratio:g}")
        return " ".join(parts)

    def replace(self, **changes: Any) -> "QuantSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["observer_args"] = dict(self.observer_args)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | "QuantSpec", owner: str = "QuantSpec") -> "QuantSpec":
        """Build from a mapping (a YAML node), refusing unknown keys."""
        if isinstance(data, QuantSpec):
            return data
        check_scheme(owner, data)
        data = dict(data)
        check_keys(owner, data, [f.name for f in fields(cls)])
        try:
            return cls(**data)
        except ValueError as exc:  # name the user's key (quant.weight.bits), not this class
            text = str(exc)
            if owner == "QuantSpec" or not text.startswith("QuantSpec."):
                raise
            raise ValueError(owner + text.removeprefix("QuantSpec")) from None


@dataclass(frozen=True)
class TensorSchemes:
    """The schemes of one module: its weight, its input activations, and (for attention) its KV cache."""

    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    kv_cache: QuantSpec | None = None

    def describe(self) -> str:
        parts = [f"{role}={spec.describe()}" for role in ROLES if (spec := getattr(self, role)) is not None]
        return ", ".join(parts) or "none"
