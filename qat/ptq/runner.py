"""Sequential block-by-block calibration: one decoder block at a time, its inputs cached.

The inputs of the first block are captured with a pre-hook (the model stops there); each block is then
solved on inputs that went through the already-quantized blocks before it, and its quantized outputs
become the next block's inputs. Only one block's statistics exist at any time, so memory is bounded by
the cached hidden states plus one block.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from torch import nn

from qat.arch import ArchAdapter, find_arch
from qat.control import on_input_device, quantization_disabled, quantizers
from qat.modules.fake import FakeQuantLinear
from qat.ptq.stats import calibration_batch

log = logging.getLogger(__name__)

Inputs = list[tuple[tuple[Any, ...], dict[str, Any]]]


class _Stop(Exception):
    pass


@dataclass
class BlockContext:
    """What a method's `solve_block` works on: one decoder block and the inputs that reach it.

    Attributes:
        name: the block's name ("model.layers.3").
        block: the block module.
        inputs: (args, kwargs) the block is called with, one per calibration batch, through the
            already-quantized blocks before it (empty when a method runs without data).
        is_model: the block is the whole model (a model without repeated blocks), called on raw batches.
        model: the whole model.
        arch: the model's architecture adapter (None for a family `qat.arch` does not know).
        linears: the block's fake-quant linears with a weight quantizer, by name relative to the block.
    """

    name: str
    block: nn.Module
    inputs: Inputs
    is_model: bool
    model: nn.Module
    arch: ArchAdapter | None = None
    linears: dict[str, FakeQuantLinear] = field(default_factory=dict)
    outputs: list[Any] | None = None  # set by a method that computed the solved block's outputs on `inputs`

    @property
    def recipe(self):
        """The QuantRecipe the model was prepared with (None if unknown)."""
        return getattr(self.model, "qat_recipe", None)

    def run(self, inputs: Inputs | None = None) -> list[Any]:
        """The block's outputs on `inputs` (default: all its cached inputs)."""
        return run_block(self.block, self.inputs if inputs is None else inputs, self.is_model)

    def float_run(self, inputs: Inputs | None = None, first: int = 0) -> list[Any]:
        """The block's outputs with its quantization off (`first`: see `run_block`)."""
        return float_pass(self.block, self.inputs if inputs is None else inputs, self.is_model, first)


def block_context(name: str, block: nn.Module, inputs: Inputs, is_model: bool, model: nn.Module) -> BlockContext:
    """The BlockContext of `block` of `model` (its adapter and quantized linears filled in)."""
    return BlockContext(name, block, inputs, is_model, model, find_arch(model), quantized_linears(block))


def quantized_linears(module: nn.Module) -> dict[str, FakeQuantLinear]:
    """FakeQuantLinear modules with a weight quantizer, by name relative to `module`."""
    return {n: m for n, m in module.named_modules()
            if isinstance(m, FakeQuantLinear) and m.weight_quantizer is not None}


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The repeated decoder blocks: where the model's architecture adapter says they are, else (a family
    `qat.arch` does not know, or blocks without quantized linears) the ModuleList holding the most quantized
    linears.

    Returns:
        (its name, its blocks); ("", [model]) when the model has no such list (then the whole model is
        calibrated as one block).
    Example:
        >>> find_blocks(llama)[0]
        'model.layers'
    """
    arch = find_arch(model)
    if arch is not None:
        name, blocks = arch.blocks(model)
        if any(quantized_linears(b) for b in blocks):
            return name, blocks
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            count = sum(len(quantized_linears(b)) for b in module)
            if count > best_count:
                best, best_count = (name, list(module)), count
    return best if best is not None else ("", [model])


def call_model(model: nn.Module, batch: Any) -> Any:
    """model(**batch) for a mapping, model(batch) otherwise; Hugging Face models run without a KV cache, on the
    device of their input embeddings (`qat.control.on_input_device`: calibration ids are built on the CPU)."""
    kwargs = {"use_cache": False} if hasattr(model, "config") and hasattr(model.config, "use_cache") else {}
    batch = on_input_device(model, batch)
    if isinstance(batch, dict):
        return model(**{**kwargs, **batch})
    return model(batch, **kwargs)


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: Sequence[nn.Module], batches: Iterable[Any]) -> Inputs:
    """The (args, kwargs) the first block is called with, one entry per calibration batch."""
    if blocks[0] is model:
        return [((b,), {}) for b in batches]
    captured: Inputs = []

    def hook(module, args, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
        captured.append((tuple(args), kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                call_model(model, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: Inputs, is_model: bool = False, first: int = 0) -> list[Any]:
    """The block's outputs (first element of a tuple output) for every cached input.

    Args:
        first: the calibration batch index (`calibration_batch`) of inputs[0], when they are a slice of a block's
            inputs from `first` on (statistics summed batch by batch must not merge two batches).
    """
    outs = []
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(inputs, first):
            with calibration_batch(i):
                out = call_model(block, args[0]) if is_model else block(*args, **kwargs)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


@contextmanager
def activation_quantizers_off(block: nn.Module):
    """Input and KV-cache quantizers disabled and not observing (statistics passes)."""
    saved = [(q, q.enabled, q.observing) for _, q in quantizers(block, ["input", "kv_cache"])]
    try:
        for q, _, _ in saved:
            q.enabled, q.observing = False, False
        yield
    finally:
        for q, enabled, observing in saved:
            q.enabled, q.observing = enabled, observing


def calibrate_activations(block: nn.Module, inputs: Inputs, is_model: bool = False, ranks: Any = None) -> bool:
    """Static input / KV-cache ranges of `block` from its cached inputs, then held (after its weights are set).
    Over a process group (`ranks`: a `qat.ptq.distributed.Ranks`) the processes calibrate in turn, each from its
    predecessor's ranges (`Ranks.calibrate_in_turn`), so every process holds what one process would.

    Returns:
        whether there were any to calibrate.
    """
    static = [q for _, q in quantizers(block, ["input", "kv_cache"]) if not q.spec.dynamic and not q.initialized]
    if not static:
        return False
    for q in static:
        q.observing = True
    if ranks is None:
        run_block(block, inputs, is_model)
    else:
        ranks.calibrate_in_turn(static, lambda: run_block(block, inputs, is_model))
    for q in static:
        q.observing = False
    return True


def float_pass(block: nn.Module, inputs: Inputs, is_model: bool = False, first: int = 0) -> list[Any]:
    """Outputs of `block` with all its quantization off (`first`: see `run_block`)."""
    with quantization_disabled(block):
        return run_block(block, inputs, is_model, first)


class BlockIO(Protocol):
    """Where the blocks come from and go to when they do not all fit in memory (`qat.ptq.stream`)."""

    prefix: str  # the blocks' ModuleList ("model.layers")
    blocks: list[nn.Module]  # their skeletons (weights on the meta device until loaded)

    def load(self, i: int) -> nn.Module:
        """Block i with its float weights loaded and prepared."""

    def done(self, i: int, block: nn.Module) -> None:
        """Block i is quantized (and its outputs computed): write it out and free it."""


def sequential(
    model: nn.Module,
    batches: Iterable[Any],
    solve_block: Callable[[BlockContext], None],
    desc: str = "ptq",
    progress: bool = True,
    io: BlockIO | None = None,
    ranks: Any = None,
) -> None:
    """Run `solve_block(ctx)` on each decoder block in order, feeding quantized outputs on.

    Args:
        model: a prepared model.
        batches: calibration inputs (LongTensor ids, or mappings of model kwargs).
        solve_block: sets the weights and pinned qparams of one block's linears from its BlockContext.
        desc: progress-bar label.
        io: load each block before it is solved and hand it over once done (out-of-core PTQ); default:
            the blocks are in memory, found by `find_blocks`.
        ranks: the process group of a distributed run (`qat.ptq.distributed.Ranks`): static activation ranges are
            calibrated over all its batches (`calibrate_activations`); None in one process.
    Example:
        >>> sequential(model, batches, lambda ctx: print(ctx.name, list(ctx.linears)))
    """
    prefix, blocks = find_blocks(model) if io is None else (io.prefix, io.blocks)
    is_model = blocks[0] is model
    inputs = capture_inputs(model, blocks, batches)
    if not inputs:
        raise ValueError(f"{desc}: no calibration batch reached the first block")
    bar = _progress(len(blocks), desc, progress)
    for i, block in enumerate(blocks):
        name = f"{prefix}.{i}" if prefix else (type(model).__name__ if is_model else str(i))
        if io is not None:
            block = io.load(i)
        ctx = block_context(name, block, inputs, is_model, model)
        solve_block(ctx)
        calibrated = calibrate_activations(block, inputs, is_model, ranks)
        if i + 1 < len(blocks):
            outs = ctx.outputs if ctx.outputs is not None and not calibrated else run_block(block, inputs, is_model)
            inputs = [((o, *args[1:]), kwargs) for o, (args, kwargs) in zip(outs, inputs)]
        if io is not None:
            io.done(i, block)
        bar.update(1)
    bar.close()


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=total, desc=desc, unit="block", leave=False)
