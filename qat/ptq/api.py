"""Entry points: `ptq_model(model, recipe, method, batches)` and `apply(model, method_cfg, batches)`.

Methods are looked up in the registry of `qat.ptq.methods` (one file per algorithm there).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from typing import Any, Iterable

from torch import nn

from qat.errors import ConfigError
from qat.modules.quantizer import TensorQuantizer
from qat.ptq.checks import check_calibration, check_option_types, check_prepared
from qat.ptq.distributed import Ranks
from qat.ptq.methods import PTQMethod, get_method, method_of_config
from qat.ptq.runner import quantized_linears
from qat.transform.recipe import load_recipe
from qat.transform import prepare
from qat.transform.recipe import to_plain
from qat.transform.rotations.learned import has_learned_rotations

log = logging.getLogger(__name__)


def method_config(method: Any, **overrides: Any):
    """A validated method config from a name, a mapping / DictConfig with `name`, or a config instance.

    Raises:
        KeyError: an unknown method name, listing the registered ones.
        ValueError: an unknown or out-of-range option, naming it and the valid keys.
    Example:
        >>> method_config({"name": "gptq", "actorder": True}).actorder
        True
    """
    if dataclasses.is_dataclass(method) and not isinstance(method, type):
        return dataclasses.replace(method, **overrides) if overrides else method
    data = to_plain(method)
    data = {"name": data} if isinstance(data, str) else dict(data or {})
    data.update(overrides)
    name = data.pop("name", None)
    data.pop("_target_", None)
    cls = get_method(name).Config
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(f"method {name}: unknown key(s) {unknown}; valid keys are {sorted(valid)}")
    check_option_types(name, cls, data)
    return cls(**data)


def apply(model: nn.Module, method_cfg: Any, batches: Iterable[Any] | None = None, progress: bool = True,
          distributed: bool = False) -> nn.Module:
    """Run a PTQ method on a prepared model: set each quantized linear's weight and pin its qparams.

    The result is an ordinary prepared model: its fake-quant forward reproduces the method's quantized
    weights, `qat.convert` stores exactly those codes, and training it further is PTQ-initialised QAT.

    Args:
        model: a model after `qat.prepare`.
        method_cfg: "gptq", {"name": "gptq", "actorder": True, ...}, a DictConfig, or a config instance.
        batches: calibration inputs: LongTensor ids [B, T] or mappings of model kwargs.
        progress: show a progress bar per block.
        distributed: run in every process of the initialised torch.distributed group, each on its share of
            `batches` (all processes pass the same list), with the same result as one process
            (`qat.ptq.distributed`; the methods `qat.ptq.distributed_methods()` names: GPTQ, AWQ, SmoothQuant).
    Returns:
        the same model; `model.qat_ptq` records the method, its options and the wall time.
    Raises:
        ValueError: a model with no fake-quant linears, too few calibration tokens, an unsupported scheme, learned
            rotations attached (`qat.transform.rotations.learned`).
    Example:
        >>> qat.ptq.apply(qat.prepare(model, qat.load_recipe("w4a16_g128")), {"name": "gptq", "actorder": True}, batches)
    """
    cfg = method_config(method_cfg)
    method: PTQMethod = method_of_config(cfg)(cfg)
    if has_learned_rotations(model):  # its weights are W @ R, computed at each access: a solve written there is lost
        raise ConfigError(f"{method.name}: the model has learned rotations attached (their weights are computed "
                          "from W and R at every access, so the solved weights could not be stored); run the PTQ "
                          "method first and attach the rotations after, or fuse them (fuse_learned_rotations)")
    linears = quantized_linears(model)
    check_prepared(model, linears, method.name)
    batches = list(batches or [])
    check_calibration(method.name, method.needs_calibration, getattr(cfg, "min_tokens", 0), batches, model)
    method.check(model, linears)
    extra = {}
    if distributed:
        method.check_distributed(model, linears)
        method.ranks = Ranks.current()
        batches, progress = method.ranks.shard(batches), progress and method.ranks.rank == 0
        extra["processes"] = method.ranks.world
    start = time.perf_counter()
    method.run(model, batches, progress)
    seconds = time.perf_counter() - start
    model.qat_ptq = {"method": method.name, **dataclasses.asdict(cfg), "seconds": seconds, **extra}
    if getattr(method, "expert_tokens", None):
        model.qat_ptq["expert_tokens"] = method.expert_tokens  # calibration tokens routed to each MoE expert
    log.info("%s: %d linear layers in %.1f s", method.name, len(linears), seconds)
    return model


def preflight(model: nn.Module, recipe: Any, method: Any = None) -> None:
    """The checks `ptq_model` makes before calibrating, on a model whose weights need not be there (a
    `qat.models.model_skeleton`, parameters on the meta device): the recipe prepares it (module patterns, shapes,
    group sizes; skipped when the model is prepared already, as in `ptq_model`) and the method, when given, checks
    the schemes it got (GPTQ / AWQ grids, SmoothQuant's activations). Prepare's warnings stay silent here (the real
    run says them). `model` is prepared in place: pass a throwaway skeleton, then check each method on it.

    Raises:
        ConfigError: what `ptq_model` would raise for this model, recipe and method before any solve.
    Example:
        >>> model = model_skeleton("smollm2-135m"); preflight(model, "gguf_q4_0")
        >>> preflight(model, None, "awq")  # ConfigError: AWQ does not solve the ggml grid
    """
    if not prepared(model):
        with warnings.catch_warnings(), _quiet("qat"):
            warnings.simplefilter("ignore")
            prepare(model, load_recipe(recipe) if isinstance(recipe, str) else recipe)
    if method is None:
        return
    cfg = method_config(method)
    solver: PTQMethod = method_of_config(cfg)(cfg)
    linears = quantized_linears(model)
    check_prepared(model, linears, solver.name)
    solver.check(model, linears)


def prepared(model: nn.Module) -> bool:
    """Whether `model` went through `qat.prepare` already: it holds a quantizer (of a Linear, fused experts, an
    embedding or the KV cache), so a recipe passed with it is not applied again."""
    return any(isinstance(m, TensorQuantizer) for m in model.modules())


@contextlib.contextmanager
def _quiet(logger: str):
    """Log records of `logger` below ERROR dropped for the duration."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def ptq_model(model: nn.Module, recipe: Any, method: Any, calibration_batches: Iterable[Any] | None = None,
              progress: bool = True, distributed: bool = False, **args: Any) -> nn.Module:
    """Prepare `model` with `recipe` (unless already prepared) and run a PTQ method on it.

    Args:
        model: a float model (or one prepared already; `recipe` is then ignored).
        recipe: a QuantRecipe, a recipe name ("w4a16_g128") or a mapping in the configs/quant format.
        method: a registered method name ("rtn", "gptq", "awq", "smoothquant"), or a mapping with `name`.
        calibration_batches: LongTensor ids [B, T] (or model kwargs mappings).
        distributed: see `apply`.
        **args: method options (e.g. actorder=True).
    Returns:
        the prepared model with pinned PTQ qparams (then `qat.convert` it, export it, or train it further).
    Example:
        >>> model = ptq_model(model, "w4a16_g128", "gptq", batches, actorder=True)
        >>> qat.convert(model)
    """
    cfg = method_config(method, **args)
    if not prepared(model):
        prepare(model, load_recipe(recipe) if isinstance(recipe, str) else recipe)
    return apply(model, cfg, calibration_batches, progress=progress, distributed=distributed)
