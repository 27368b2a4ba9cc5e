"""The PTQ method registry: one `PTQMethod` subclass per algorithm, registered by name.

A method has a `Config` (a dataclass of its options, checked in `__post_init__`; its YAML is
configs/method/<name>.yaml), `check(model, linears)` (everything it can refuse before solving) and
`solve_block(ctx)` (the per-block work on a `qat.ptq.runner.BlockContext`). `run` drives the blocks
through `qat.ptq.runner.sequential`; a method that needs no block-by-block pass overrides it.
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterable

from torch import nn

from qat.control import quantizers
from qat.errors import ConfigError
from qat.ptq.distributed import mergeable_range_errors
from qat.ptq.runner import BlockContext, find_blocks, sequential

METHODS: dict[str, type["PTQMethod"]] = {}


def register_method(cls: type["PTQMethod"]) -> type["PTQMethod"]:
    """Class decorator: register a PTQ method under `cls.name`.

    Raises:
        ValueError: a name registered twice.
    Example:
        >>> @register_method
        ... class MyMethod(PTQMethod):
        ...     name, Config = "mine", MyConfig
    """
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"PTQ method {cls.name!r} is registered twice: {METHODS[cls.name].__name__} and {cls.__name__}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: Any) -> type["PTQMethod"]:
    """The registered method class of `name`.

    Raises:
        KeyError: an unknown name, listing the registered ones.
    """
    if name not in METHODS:
        raise KeyError(f"PTQ method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


def distributed_methods() -> list[str]:
    """The registered methods that run over a process group (`PTQMethod.distributed`)."""
    return sorted(n for n, cls in METHODS.items() if cls.distributed)


def method_of_config(config: Any) -> type["PTQMethod"]:
    """The registered method whose Config `config` is an instance of.

    Raises:
        TypeError: not the config of a registered method.
    """
    for cls in METHODS.values():
        if type(config) is cls.Config:
            return cls
    raise TypeError(f"{type(config).__name__} is not the Config of a registered PTQ method ({sorted(METHODS)})")


class PTQMethod:
    """One PTQ algorithm on a prepared model; subclass it in `qat/ptq/methods/<name>.py` with `@register_method`.

    Class attributes:
        name: the registry name (and the `name:` of configs/method/<name>.yaml).
        Config: the dataclass of its options.
        needs_calibration: it needs calibration tokens whatever the recipe (RTN only for static activations).
        distributed: it runs over a torch.distributed process group (`qat.ptq.distributed`).
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    needs_calibration: ClassVar[bool] = True
    distributed: ClassVar[bool] = False  # runs over a process group (`check_distributed` says what it refuses)

    def __init__(self, config: Any) -> None:
        self.config = config
        self.block_io = None  # set by `qat.ptq.stream` to load and write one block at a time
        self.ranks = None  # set by `qat.ptq.apply(distributed=True)`: a `qat.ptq.distributed.Ranks`

    @classmethod
    def distributed_option_errors(cls, config: Any) -> list[str]:
        """What in this method's options (no model needed) distributed PTQ refuses; checked before processes
        start (`qat-ptq`) and again by `check_distributed`."""
        return []

    def distributed_model_errors(self, model: nn.Module, linears: dict[str, nn.Module]) -> list[str]:
        """What this method's distributed run refuses in this model (beyond `check_distributed`'s common checks)."""
        return []

    def check_distributed(self, model: nn.Module, linears: dict[str, nn.Module]) -> None:
        """Refuse what this method cannot run over a process group (`qat.ptq.distributed`): a method that does not
        run distributed, its `distributed_option_errors` and `distributed_model_errors`, a model without repeated
        decoder blocks, and static activation ranges that would not equal one process's (not minmax, or learned:
        `qat.ptq.distributed.mergeable_range_errors`); minmax ones are calibrated in turn (`Ranks.calibrate_in_turn`).

        Raises:
            ConfigError: naming the option or module to change.
        """
        if not self.distributed:
            raise ConfigError(f"method {self.name} does not run distributed (distributed PTQ serves "
                              f"{', '.join(distributed_methods())}); run it in one process")
        errors = self.distributed_option_errors(self.config) + self.distributed_model_errors(model, linears)
        if find_blocks(model)[1][0] is model:
            errors.append(f"{type(model).__name__}: no repeated decoder blocks found; distributed PTQ runs block by "
                          "block")
        errors += mergeable_range_errors([(n, q.spec) for n, q in quantizers(model, ["input", "kv_cache"])])
        if errors:
            raise ConfigError(f"distributed {self.name}:\n" + "\n".join(f"  - {e}" for e in errors))

    def check(self, model: nn.Module, linears: dict[str, nn.Module]) -> None:
        """Refuse what the method cannot solve, before any calibration (all offenders at once)."""

    def solve_block(self, ctx: BlockContext) -> None:
        """Set the weights and pin the qparams of the quantized linears of one block."""
        raise NotImplementedError(f"{type(self).__name__}.solve_block")

    def run(self, model: nn.Module, batches: Iterable[Any], progress: bool = True) -> None:
        """Solve every block in order, each on the outputs of the already-quantized blocks before it."""
        sequential(model, batches, self.solve_block, desc=self.name, progress=progress, io=self.block_io,
                   ranks=self.ranks)
