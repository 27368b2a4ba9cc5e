"""True-sequential stage passes that run only what each stage needs.

GPTQ's true-sequential mode calibrates each stage of a block (q/k/v, o, gate/up, down for Llama) on the outputs
of the stages already quantized. Run naively that is one full block forward per stage plus one for the block's
outputs. `StagedBlock` gets the same inputs with much less work:

* a stage's pass stops as soon as its input has been recorded (the pre-hook of the stage's first linear raises),
  so the stages after it never run;
* a sub-module whose quantized linears are all solved (q_proj once q/k/v are solved, self_attn once o_proj is)
  computes its output once, on the first pass that reaches it, and later passes replay that output
  (kept per calibration batch and call), so every linear's matmul runs once per block in its final, quantized
  state; only the cheap glue (norms, attention core, activations) is recomputed.

The replayed tensors are bit-identical to a recomputation: the same kernels on the same inputs, since a solved
module's inputs only depend on what runs before it, all of it solved. Nothing is replayed in a pass after an
unsolved linear has run (its output may change once solved). Memory: the replayed outputs of the block's solved
sub-modules (a few times the hidden states per stage), freed when the block is done.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qat.control import quantization_disabled, quantizers
from qat.modules.experts import FakeQuantExperts
from qat.ptq.stats import InputStats, calibration_batch


class _Stop(Exception):
    pass


def call_sequence(block: nn.Module, args: tuple, kwargs: dict, linears: dict[str, nn.Module]) -> list[tuple[str, Any]]:
    """(name, input tensor) of every call of `linears` during one float forward of `block`, in order."""
    calls: list[tuple[str, Any]] = []

    def hook_of(name):
        def hook(module, inp):
            calls.append((name, inp[0]))
        return hook

    handles = [m.register_forward_pre_hook(hook_of(n)) for n, m in linears.items()]
    try:
        with torch.no_grad(), quantization_disabled(block):
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def group_calls(calls: list[tuple[str, Any]], names: list[str]) -> list[list[str]]:
    """Linears grouped by the tensor they read, in order of first call; never-called ones each on their own."""
    groups: list[list[str]] = []
    seen: set[str] = set()
    last = None
    for n, tensor in calls:
        if n in seen:
            continue
        seen.add(n)
        if tensor is not last:
            groups.append([])
        groups[-1].append(n)
        last = tensor
    return groups + [[n] for n in names if n not in seen]


def can_stage(block: nn.Module, is_model: bool) -> bool:
    """Whether `StagedBlock` serves this block: a decoder block (not the whole model), with no MoE experts
    (solved in passes of their own)."""
    return not is_model and not any(isinstance(m, FakeQuantExperts) for m in block.modules())


class StagedBlock:
    """One block's stage passes over its cached inputs, replaying the outputs of solved sub-modules.

    Args:
        block: the decoder block.
        inputs: (args, kwargs) per calibration batch.
        linears: its quantized linears by name relative to the block.
        once: names of the linears called exactly once per forward (their pass may stop at them).
        budget_mb: most MiB of replayed outputs kept; past it, outputs are recomputed (same result, slower).
    Example:
        >>> staged = StagedBlock(block, inputs, linears, once)
        >>> stats = staged.capture("self_attn.q_proj"); ...solve q/k/v...; staged.solved(["self_attn.q_proj", ...])
        >>> outs = staged.outputs()
    """

    def __init__(self, block: nn.Module, inputs, linears: dict[str, nn.Module], once: set[str],
                 budget_mb: float = float("inf")) -> None:
        self.block, self.inputs, self.linears, self.once = block, inputs, linears, once
        self.budget, self.held = budget_mb * 2 ** 20, 0  # bytes of replayed outputs: allowed, kept
        self.done: set[str] = set()
        self.memo: dict[str, dict[tuple[int, int], Any]] = {}
        self._names = {id(m): n for n, m in block.named_modules()}
        self._inside = {n: [ln for ln in linears if n == "" or ln == n or ln.startswith(n + ".")]
                        for n, _ in block.named_modules()}
        self._batch, self._calls, self._tainted = 0, {}, False
        self.keep_batches = False  # captured statistics keep each batch's Gram apart (distributed PTQ)

    def solved(self, names) -> None:
        """Mark linears as solved (their weights and qparams final)."""
        self.done.update(names)

    def _replayable(self, name: str) -> bool:
        inside = self._inside.get(name, [])
        return name != "" and bool(inside) and all(n in self.done for n in inside)

    def capture(self, name: str, magnitudes: bool = False) -> InputStats:
        """Input statistics of linear `name` over all inputs, its pass stopping there when it is called once.

        The Gram matrix is summed batch by batch (`InputStats(per_batch=True)`), the order distributed PTQ keeps."""
        module = self.linears[name]
        stats = InputStats(module.in_features, True, module.weight.device, magnitudes, per_batch=True)
        if self.keep_batches:
            stats.keep_batches()
        stop = name in self.once

        def hook(mod, args):
            stats.update(args[0])
            if stop:
                raise _Stop

        handle = module.register_forward_pre_hook(hook)
        try:
            self._passes()
        finally:
            handle.remove()
        return stats

    def outputs(self) -> list[Any]:
        """The block's outputs (first element of a tuple output) on every input; the replayed outputs are freed."""
        outs = self._passes()
        self.memo.clear()
        self.held = 0
        return outs

    def _passes(self) -> list[Any]:
        wrapped = [m for n, m in self.block.named_modules() if self._replayable(n)]
        hooks = [m.register_forward_pre_hook(self._taint) for n, m in self.linears.items() if n not in self.done]
        saved = {id(m): m.__dict__.get("forward") for m in wrapped}
        for m in wrapped:
            m.forward = self._replay(m, m.forward)
        outs = []
        try:
            with torch.no_grad():
                for i, (args, kwargs) in enumerate(self.inputs):
                    self._batch, self._calls, self._tainted = i, {}, False
                    try:
                        with calibration_batch(i):
                            out = self.block(*args, **kwargs)
                    except _Stop:
                        continue
                    outs.append(out[0] if isinstance(out, (tuple, list)) else out)
        finally:
            for h in hooks:
                h.remove()
            for m in wrapped:
                if saved[id(m)] is None:
                    del m.forward
                else:
                    m.forward = saved[id(m)]
        self._prune()
        return outs

    def _prune(self) -> None:
        """Drop the replayed outputs of sub-modules whose parent now replays every batch they cover."""
        batches = {n: {b for b, _ in memo} for n, memo in self.memo.items()}
        for n in list(self.memo):
            if any(p != n and n.startswith(p + ".") and batches[p] >= batches[n] for p in batches):
                self.held -= sum(_nbytes(o) for o in self.memo.pop(n).values())

    def _taint(self, module, args) -> None:
        self._tainted = True  # an unsolved linear ran: what follows may change once it is solved

    def _replay(self, module: nn.Module, forward):
        name = self._names[id(module)]
        memo = self.memo.setdefault(name, {})

        def replayed(*args, **kwargs):
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            key = (self._batch, call)
            if key in memo and not self._tainted:
                return _clone(memo[key])  # a caller may edit it in place
            out = forward(*args, **kwargs)
            size = _nbytes(out)
            if not self._tainted and self.held + size <= self.budget:
                memo[key] = _clone(out)
                self.held += size
            return out

        return replayed


def _nbytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(o) for o in out)
    return 0


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone(o) for o in out)
    if isinstance(out, list):
        return [_clone(o) for o in out]
    return out


def has_activation_quantizers(block: nn.Module) -> bool:
    """Whether `block` has input or KV-cache quantizers (its stage passes run with them off)."""
    return any(True for _ in quantizers(block, ["input", "kv_cache"]))
