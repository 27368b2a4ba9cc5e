"""`RotationConfig` (the recipe's `rotations:` node), the registry of rotation transforms, and the weight
helpers they share (float64 products, cast back to each weight's dtype)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

import torch
from torch import nn

from qat.errors import ConfigError
from qat.modules.hadamard import ROTATION_KINDS

log = logging.getLogger(__name__)

ORDER = ("r1", "r2", "r4", "r3", "kv_cache")  # offline first; online ones last
ONLINE_KINDS = ("hadamard",)
KV_KINDS = ("llama_cpp",)


@dataclass(frozen=True)
class RotationConfig:
    """Which rotations to apply (None: not that one).

    Args:
        r1, r2: "hadamard", "random_hadamard" or "random_orthogonal" (offline, fused into the weights).
        r3, r4: "hadamard" (online: rebuilt from its size at load, so no random signs).
        kv_cache: "llama_cpp": rotate K and V as llama.cpp's quantized KV cache does.
        seed: the seed of the random kinds.
    Example:
        >>> RotationConfig.from_dict({"r1": "hadamard", "r4": "hadamard"}).active()
        ['r1', 'r4']
    """

    r1: str | None = None
    r2: str | None = None
    r3: str | None = None
    r4: str | None = None
    kv_cache: str | None = None
    seed: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, owner: str = "quant.rotations") -> "RotationConfig | None":
        """Validate a `rotations:` node; None / {} gives None. Unknown keys and values raise ConfigError."""
        if data is None or isinstance(data, RotationConfig):
            return data
        if not isinstance(data, Mapping):
            raise ConfigError(f"{owner}={data!r}; expected a mapping like {{r1: hadamard, r4: hadamard}}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(f"{owner}: unknown key(s) {unknown}; valid keys are {allowed}")
        choices = {"r1": ROTATION_KINDS, "r2": ROTATION_KINDS, "r3": ONLINE_KINDS, "r4": ONLINE_KINDS,
                   "kv_cache": KV_KINDS}
        for key, allowed_values in choices.items():
            if data.get(key) is not None and data[key] not in allowed_values:
                raise ConfigError(f"{owner}.{key}={data[key]!r}; choose from {list(allowed_values)} or null")
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{owner}.seed={seed!r}; expected an integer")
        if data.get("r3") and data.get("kv_cache"):
            raise ConfigError(f"{owner}: r3 and kv_cache both rotate the keys; choose one (kv_cache: llama_cpp "
                              "for a llama.cpp cache, r3 for other runtimes)")
        config = cls(**{k: data.get(k) for k in ("r1", "r2", "r3", "r4", "kv_cache")}, seed=seed)
        return config if config.active() else None

    def active(self) -> list[str]:
        """The names of the rotations asked for, in the order they are applied."""
        return [name for name in ORDER if getattr(self, name) is not None]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


Transform = Callable[[nn.Module, RotationConfig], None]
Check = Callable[[nn.Module, RotationConfig, bool], list[str]]
ROTATIONS: dict[str, tuple[Transform, Check]] = {}


def register_rotation(name: str, check: Check):
    """Decorator: register `fn(model, config)` as the rotation `name`, with `check(model, config, has_kv)` that
    lists what stops it (checked for every rotation before any weight changes)."""
    def wrap(fn: Transform) -> Transform:
        ROTATIONS[name] = (fn, check)
        return fn
    return wrap


def rotation_errors(model: nn.Module, config: RotationConfig, has_kv: bool) -> list[str]:
    """Every reason the rotations of `config` cannot be applied to `model` (empty: they can)."""
    return [e for name in config.active() for e in ROTATIONS[name][1](model, config, has_kv)]


def apply_rotations(model: nn.Module, config: RotationConfig | Mapping[str, Any], has_kv: bool = True) -> nn.Module:
    """Apply the rotations of `config` to a float model, in place (checked first, all offenders at once).

    Raises:
        ConfigError: a family or a size a rotation cannot handle, naming it.
    Example:
        >>> apply_rotations(model, {"r1": "hadamard", "r2": "hadamard"})   # same logits, rotated weights
    """
    config = RotationConfig.from_dict(config)
    if config is None:
        return model
    errors = rotation_errors(model, config, has_kv)
    if errors:
        raise ConfigError("cannot rotate the model:\n" + "\n".join(f"  - {e}" for e in errors))
    for name in config.active():
        ROTATIONS[name][0](model, config)
        log.info("rotation %s (%s) applied", name, getattr(config, name))
    return model


# -- weight helpers -----------------------------------------------------------------------------------------
def weight_and_bias(block: nn.Module, name: str) -> tuple[nn.Parameter, nn.Parameter | None]:
    """The [..., out, in] weight (and bias) a block-relative name points at: a module with `.weight`, or a
    parameter (fused experts)."""
    try:
        module = block.get_submodule(name)
    except AttributeError:
        module = None
    if module is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
        if getattr(module, "is_transposed", False):
            raise ConfigError(f"{name}: transposed expert weights are not rotated")
        return module.weight, getattr(module, "bias", None)
    return block.get_parameter(name), None


def exists(block: nn.Module, name: str) -> bool:
    try:
        weight_and_bias(block, name)
        return True
    except (AttributeError, ConfigError):
        return False


@torch.no_grad()
def set_(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def rotate_columns(weight: torch.Tensor, q: torch.Tensor) -> None:
    """W <- W @ Q (the input side: the layer now reads x @ Q); Q is built on the CPU and moved to W's device."""
    set_(weight, weight.double() @ q.to(weight.device))


@torch.no_grad()
def rotate_rows(weight: torch.Tensor, bias: torch.Tensor | None, q: torch.Tensor) -> None:
    """W <- Q^T @ W, b <- b @ Q (the output side: the layer now writes y @ Q); Q moves to W's device."""
    q = q.to(weight.device)
    set_(weight, q.T @ weight.double())
    if bias is not None:
        set_(bias, bias.double() @ q)


def head_dim_of(attention: nn.Module) -> int:
    return int(attention.head_dim)
