"""What to simulate: `QuantSpec` for one tensor, `TensorSchemes` for the roles of one module.

Every field is checked when the dataclass is built, and a bad value names the field and the
values that would be valid. `QuantSpec.from_dict` refuses unknown keys, so a misspelt YAML key
fails instead of being ignored.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch

INT_BITS = (2, 3, 4, 5, 6, 7, 8)
FLOAT_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
DTYPES = ("int", *FLOAT_DTYPES)
GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")
LEARN_MODES = ("none", "lsq", "lsq_plus", "pact")
SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROLES = ("weight", "input", "kv_cache")
GRIDS = ("uniform", "ggml", "ggml_k")
GGML_BITS = (4, 5, 8)
# ggml_k: bits -> (GGUF type, symmetric, sub-block size, sub-block scale code max, bytes per 256 values)
GGML_K = {2: ("Q2_K", False, 16, 15, 84), 3: ("Q3_K", True, 16, 32, 110), 4: ("Q4_K", False, 32, 63, 144),
          5: ("Q5_K", False, 32, 63, 176), 6: ("Q6_K", True, 16, 128, 210)}


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
        grid: "uniform" (the default numerics above) or "ggml": llama.cpp's legacy block grids, so
            that fake quant equals the GGUF blocks bit for bit. With "ggml", bits=8 symmetric is Q8_0,
            bits=4/5 symmetric are Q4_0/Q5_0 (signed scale max/-8, max/-16), bits=4/5 asymmetric are
            Q4_1/Q5_1 (a float minimum held in `zero_point`); per_group, group_size=32, scale_dtype fp16.
            "ggml_k": llama.cpp's K-quants with two-level scales (bits 2..6 = Q2_K..Q6_K): sub-block
            scales (and minimums) quantized under fp16 super-block scales over 256 values; group_size is
            the sub-block (32 for Q4_K/Q5_K, 16 otherwise), symmetric for Q3_K/Q6_K only.
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

    def __post_init__(self) -> None:
        owner = "QuantSpec"
        self._check_types(owner)
        _check_choice(owner, "dtype", self.dtype, DTYPES)
        if self.dtype == "int":
            _check_choice(owner, "bits", self.bits, INT_BITS)
        elif self.bits != 8:
            raise ValueError(f"QuantSpec.bits={self.bits} with dtype={self.dtype!r}; fp8 needs bits=8")
        _check_choice(owner, "granularity", self.granularity, GRANULARITIES)
        _check_choice(owner, "scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES))
        _check_choice(owner, "learn", self.learn, LEARN_MODES)
        from qat.observers import OBSERVERS  # late import: observers import this module

        if self.observer not in OBSERVERS:
            raise ValueError(f"QuantSpec.observer={self.observer!r}; choose from {sorted(OBSERVERS)}")
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
        if self.is_float and not self.symmetric:
            raise ValueError(f"QuantSpec.symmetric=False with dtype={self.dtype!r}; fp8 scales are symmetric")
        if self.signed is None:
            object.__setattr__(self, "signed", self.symmetric or self.is_float)
        if self.learn in ("lsq", "lsq_plus", "pact") and self.dynamic:
            raise ValueError(f"QuantSpec.learn={self.learn!r} needs static ranges (dynamic=False)")
        if self.learn == "lsq_plus" and self.symmetric:
            raise ValueError("QuantSpec.learn='lsq_plus' learns a zero-point; set symmetric=False")
        if self.learn == "pact" and not self.symmetric:
            raise ValueError("QuantSpec.learn='pact' learns a symmetric clip; set symmetric=True")
        if self.learn != "none" and self.is_float:
            raise ValueError(f"QuantSpec.learn={self.learn!r} is for integer schemes, not {self.dtype!r}")
        object.__setattr__(self, "observer_args", dict(self.observer_args))
        _check_choice(owner, "grid", self.grid, GRIDS)
        if self.grid == "ggml":
            self._check_ggml()
        elif self.grid == "ggml_k":
            self._check_ggml_k()
        from qat.observers import build_observer

        build_observer(self)  # observer_args are checked here, not halfway through prepare

    def _check_types(self, owner: str) -> None:
        object.__setattr__(self, "bits", _check_int(owner, "bits", self.bits))
        object.__setattr__(self, "axis", _check_int(owner, "axis", self.axis))
        for name in ("symmetric", "dynamic", "ragged"):
            _check_bool(owner, name, getattr(self, name))
        _check_bool(owner, "signed", self.signed, allow_none=True)

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

    def _check_ggml_k(self) -> None:
        if self.dtype != "int" or self.bits not in GGML_K:
            raise ValueError(f"QuantSpec.grid='ggml_k' needs dtype=int and bits in {sorted(GGML_K)}")
        name, sym, sub = GGML_K[self.bits][:3]
        if (self.symmetric != sym or self.granularity != "per_group" or self.group_size != sub
                or self.scale_dtype != "fp16" or self.learn != "none" or self.signed != sym):
            raise ValueError(f"QuantSpec.grid='ggml_k' with bits={self.bits} is {name}: it needs symmetric={sym}, "
                             f"granularity='per_group', group_size={sub}, scale_dtype='fp16', learn='none'")

    def _check_ggml(self) -> None:
        problems = []
        if self.dtype != "int" or self.bits not in GGML_BITS:
            problems.append(f"dtype=int with bits in {list(GGML_BITS)}")
        if self.bits == 8 and not self.symmetric:
            problems.append("symmetric=True for bits=8 (Q8_0)")
        if self.granularity != "per_group" or self.group_size != 32:
            problems.append("granularity='per_group', group_size=32")
        if self.scale_dtype != "fp16" or self.learn != "none" or self.signed != self.symmetric:
            problems.append("scale_dtype='fp16', learn='none', signed left to its default")
        if problems:
            raise ValueError(f"QuantSpec.grid='ggml' needs {'; '.join(problems)}")

    def __hash__(self) -> int:
        values = [getattr(self, f.name) for f in fields(self)]
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, Mapping) else v for v in values))

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def bits_per_element(self) -> float:
        """Storage bits per quantized element, scales and zero-points included (one element per scale
        for per-tensor/per-channel is counted as 0: its cost vanishes with the row length)."""
        if self.granularity != "per_group":
            return float(self.bits)
        extra = torch.finfo(self.torch_scale_dtype).bits
        if self.grid == "ggml_k":
            return GGML_K[self.bits][4] * 8 / 256
        if self.grid == "ggml" and not self.symmetric:
            extra += 16  # a float (fp16) minimum, not an integer zero-point
        elif not self.symmetric:
            extra += self.bits
        return self.bits + extra / self.group_size

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
        data = dict(data)
        check_keys(owner, data, [f.name for f in fields(cls)])
        return cls(**data)


@dataclass(frozen=True)
class TensorSchemes:
    """The schemes of one module: its weight, its input activations, and (for attention) its KV cache."""

    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    kv_cache: QuantSpec | None = None

    def describe(self) -> str:
        parts = [f"{role}={spec.describe()}" for role in ROLES if (spec := getattr(self, role)) is not None]
        return ", ".join(parts) or "none"
