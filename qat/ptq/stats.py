"""Calibration statistics of linear-layer inputs, accumulated by forward hooks while batches stream.

`InputStats` keeps, per input channel, the running sum of |x| (AWQ), the running max |x|
(SmoothQuant) and optionally the Gram matrix sum x x^T in float32, one GEMM per upper row strip (GPTQ's Hessian, and the exact
layer-output error of a weight change used by the AWQ searches). Nothing but these sums is kept, so
memory stays at in_features^2 floats per layer whatever the number of calibration tokens.

With `per_batch=True` (GPTQ, AWQ) the sums are made in a fixed order that does not depend on how the
calibration batches are spread over processes: each batch's Gram (its rows pooled and multiplied as without it)
and its sum |x| are accumulated on their own, then added to the totals in batch order. A process that saw
batches k..l keeps their sums (`keep_batches`) so that `qat.ptq.distributed` can add them, in order, to the
running sums of batches 0..k-1 from the process before it: the same float additions as in one process. (The
max |x| and the token count need no order: a max and an integer sum are exact in any order.)
The batch a tensor belongs to comes from `calibration_batch(i)`, set by the loops that run the blocks.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
from torch import nn


_BATCH: ContextVar[int | None] = ContextVar("calibration_batch", default=None)


@contextmanager
def calibration_batch(index: int) -> Iterator[None]:
    """Marks the calibration batch being run: `InputStats(per_batch=True)` starts a new batch Gram when it changes."""
    token = _BATCH.set(index)
    try:
        yield
    finally:
        _BATCH.reset(token)


class InputStats:
    """Streaming statistics of the inputs of one linear layer.

    Args:
        in_features: the layer's input width.
        hessian: also accumulate the Gram matrix (in_features^2 floats).
        magnitudes: also accumulate sum |x| and max |x| per channel.
        per_batch: sum the Gram matrix and sum |x| batch by batch (see the module docstring): the order distributed
            PTQ reproduces; costs one more in_features^2 buffer.
    Example:
        >>> st = InputStats(8); st.update(torch.randn(4, 8)); st.hessian().shape
        torch.Size([8, 8])
    """

    def __init__(self, in_features: int, hessian: bool = True, device: torch.device | str = "cpu",
                 magnitudes: bool = True, per_batch: bool = False) -> None:
        self.in_features, self.magnitudes, self.per_batch = in_features, magnitudes, per_batch
        self.n_tokens = 0
        self._abs_sum = torch.zeros(in_features, device=device)
        self.abs_max = torch.zeros(in_features, device=device)
        self._gram = torch.zeros(in_features, in_features, device=device) if hessian else None
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0
        self._batch, self._batch_key = None, None  # the current batch's Gram (per_batch) and its index
        self._batch_abs = None  # the current batch's sum |x| (per_batch with magnitudes)
        self._kept: list[list[torch.Tensor]] | None = None  # batch sums kept, not added (keep_batches)
        # the Gram matrix is symmetric: accumulate only its upper row strips (k strips -> (k+1)/2k of the
        # flops, one GEMM per strip) and mirror on read
        k = max(1, min(8, in_features // 256))
        self._edges = [round(i * in_features / k) for i in range(k + 1)]

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of inputs [..., in_features] into the statistics."""
        x = x.detach().reshape(-1, self.in_features)
        if self.per_batch and _BATCH.get() != self._batch_key:
            self._end_batch()
            self._batch_key = _BATCH.get()
        owned = x.dtype != torch.float32
        x = x.float()
        self.n_tokens += x.shape[0]
        if self.magnitudes:
            a = x.abs()
            if self.per_batch:
                if self._batch_abs is None:
                    self._batch_abs = torch.zeros_like(self._abs_sum)
                self._batch_abs += a.sum(0)
            else:
                self._abs_sum += a.sum(0)
            torch.maximum(self.abs_max, a.amax(0), out=self.abs_max)
        if self._gram is None:
            return
        if x.shape[0] >= self.CHUNK:  # large enough for an efficient GEMM: no copy, no wait
            self._accumulate(x)
            return
        # small batches are pooled; a copy, since the caller may later edit its tensor in place
        self._pending.append(x if owned else x.clone())
        self._pending_rows += x.shape[0]
        if self._pending_rows >= self.CHUNK:
            self._flush()

    CHUNK = 512

    def _flush(self) -> None:
        if not self._pending:
            return
        x = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_rows = [], 0
        self._accumulate(x)

    def _accumulate(self, x: torch.Tensor) -> None:
        if self.per_batch and self._batch is None:
            self._batch = torch.zeros_like(self._gram)
        target = self._batch if self.per_batch else self._gram
        xt, e = x.t(), self._edges
        for a, b in zip(e[:-1], e[1:]):
            target[a:b, a:].addmm_(xt[a:b], x[:, a:])

    def _end_batch(self) -> None:
        """Close the current batch: its sums are added to the totals (or kept, see `keep_batches`)."""
        if self._gram is not None:
            self._flush()
        if self._batch is None and self._batch_abs is None:
            return
        sums = self._batch_sums()
        if self._kept is not None:
            self._kept.append(sums)
        else:
            for total, part in zip(self.partial_sums(), sums):
                total.add_(part)
        self._batch, self._batch_abs = None, None

    def _batch_sums(self) -> list[torch.Tensor]:
        sums = []
        if self._gram is not None:
            sums.append(self._batch if self._batch is not None else torch.zeros_like(self._gram))
        if self.magnitudes:
            sums.append(self._batch_abs if self._batch_abs is not None else torch.zeros_like(self._abs_sum))
        return sums

    def keep_batches(self) -> None:
        """Keep each batch's sums apart instead of adding them to the totals (until `pop_batches`)."""
        if not self.per_batch:
            raise ValueError("keep_batches needs InputStats(per_batch=True)")
        self._kept = []

    def pop_batches(self) -> list[list[torch.Tensor]]:
        """The sums of each batch seen since `keep_batches`, in order, laid out as `partial_sums`; no longer kept.

        Raises:
            ValueError: `keep_batches` was not called (the batches' sums are already in the totals)."""
        if self._kept is None:
            raise ValueError("pop_batches needs InputStats.keep_batches() before the batches are recorded")
        self._end_batch()
        kept, self._kept = self._kept, None
        return kept

    def partial_sums(self) -> list[torch.Tensor]:
        """The running sums of the batches added so far (the kept ones excluded): the Gram (upper strips suffice),
        if recorded, then sum |x|, if recorded."""
        return [t for t, on in ((self._gram, self._gram is not None), (self._abs_sum, self.magnitudes)) if on]

    def set_sums(self, sums: list[torch.Tensor], n_tokens: int, abs_max: torch.Tensor | None = None) -> None:
        """Replace the sums (laid out as `partial_sums`), the token count and max |x|: the totals over all processes."""
        sums = list(sums)
        if self._gram is not None:
            self._gram = sums.pop(0)
        if self.magnitudes:
            self._abs_sum = sums.pop(0)
        if abs_max is not None:
            self.abs_max = abs_max
        self.n_tokens = n_tokens

    @property
    def abs_sum(self) -> torch.Tensor:
        """sum |x| per input channel over all tokens seen."""
        if self.per_batch:
            self._end_batch()
        return self._abs_sum

    @property
    def gram(self) -> torch.Tensor | None:
        """sum x x^T over all tokens seen (float32, symmetric), or None without hessian."""
        if self._gram is None:
            return None
        self._end_batch() if self.per_batch else self._flush()
        e = self._edges
        for a, b in zip(e[1:-1], e[2:]):  # lower strips from the upper ones
            self._gram[a:b, :a] = self._gram[:a, a:b].t()
        return self._gram

    def mean_abs(self) -> torch.Tensor:
        """Mean |x| per input channel (AWQ's activation magnitude)."""
        return self.abs_sum / max(self.n_tokens, 1)

    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2/n sum x x^T (float32).

        Raises:
            ValueError: no tokens were seen (the layer was never called during calibration).
        """
        if self._gram is None:
            raise ValueError("InputStats was built with hessian=False")
        if self.n_tokens == 0:
            raise ValueError("no calibration tokens reached this layer; it is never called on the calibration data")
        return self.gram * (2.0 / self.n_tokens)


@contextmanager
def record_inputs(modules: dict[str, nn.Module], hessian: bool = True, magnitudes: bool = True,
                  per_batch: bool = False, keep: bool = False) -> Iterator[dict[str, InputStats]]:
    """Attach forward hooks that accumulate `InputStats` for each module while the block runs.

    Args:
        per_batch: sums made batch by batch (`InputStats(per_batch=True)`).
        keep: each batch's sums kept apart (`InputStats.keep_batches`), for `qat.ptq.distributed` to combine.

    Example:
        >>> with record_inputs({"fc": fc}) as stats:
        ...     fc(torch.randn(16, fc.in_features))
        >>> stats["fc"].n_tokens
        16
    """
    stats = {n: InputStats(m.in_features, hessian, m.weight.device, magnitudes, per_batch or keep)
             for n, m in modules.items()}
    for st in stats.values() if keep else ():
        st.keep_batches()
    handles = [m.register_forward_pre_hook(_hook(stats[n])) for n, m in modules.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _hook(stats: InputStats):
    def hook(module, args):
        stats.update(args[0])

    return hook


def record_call_order(modules: dict[str, nn.Module]):
    """Context manager recording (name, input tensor) in call order: linears fed the same tensor share a stage.

    The tensors themselves are held (not their id()), so a freed input's id reused by a later tensor cannot
    merge two stages."""
    order: list[tuple[str, int]] = []

    @contextmanager
    def ctx():
        handles = [m.register_forward_pre_hook(_order_hook(n, order)) for n, m in modules.items()]
        try:
            yield order
        finally:
            for h in handles:
                h.remove()

    return ctx()


def _order_hook(name, order):
    def hook(module, args):
        if all(n != name for n, _ in order):
            order.append((name, args[0]))

    return hook
