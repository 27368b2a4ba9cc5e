"""What the jobs measure: perplexity, bits per weight and model size, peak memory.

Conventions of `weight_bits` (qat-compare rows, result.json): bits per weight counts the quantized linear
weights with their scales and zero-points (16 for the float baseline); model size counts every parameter
once, quantized linears at their storage bits and everything else at 16 bits (a bf16/fp16 deployment).
`bits_per_weight` is the qat-train table's pair (quantized layers; all weights, float ones at their dtype).
"""
from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from qat.control import frozen_ranges, weight_bits as quantized_weight_bits, weight_modules
from qat.export.common import float_weight_names, stored_shape

FLOAT_BITS = 16


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over LongTensor blocks [N, T], in eval mode.

    Each batch's summed cross-entropy is computed in float32 and accumulated in float64; the model's train /
    eval mode is restored afterwards, and blocks move to the model's device. Held activation ranges are not
    touched (`qat.control.frozen_ranges`).
    Raises:
        ConfigError: static activation / KV quantizers not calibrated yet.
    Example:
        >>> perplexity(model, torch.randint(0, 100, (2, 32)))
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    try:
        with frozen_ranges(model):  # evaluation data never calibrates held activation ranges
            for i in range(0, len(blocks), batch_size):
                ids = blocks[i:i + batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         ids[:, 1:].reshape(-1), reduction="sum")
                nll, count = nll + float(loss), count + ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count)


def _quantized(model: nn.Module) -> tuple[float, int, set[int]]:
    """`qat.control.weight_bits` (bits per quantized weight, count) and the ids of those weight parameters."""
    bpw, numel = quantized_weight_bits(model)
    seen = set()
    for m in weight_modules(model).values():
        # a Linear's `weight`; fused experts' 3-D weights are named by their quantizers (gate_up_proj, down_proj)
        for name in ["weight", *getattr(m, "weight_quantizers", {})]:
            # under a learned rotation the weight is W @ R, computed: the stored W is the parameter counted
            w = m.parametrizations[name].original if parametrize.is_parametrized(m, name) else getattr(m, name, None)
            if isinstance(w, nn.Parameter):
                seen.add(id(w))
    return bpw, numel, seen


def weight_bits(model: nn.Module) -> tuple[float, float]:
    """(bits per quantized linear weight, model size in MB) under the conventions of the module docstring.

    Example:
        >>> bpw, mb = weight_bits(qat.prepare(model, qat.load_recipe("w4a16_g128")))
    """
    bpw, qnumel, seen = _quantized(model)
    total_bits = bpw * qnumel if qnumel else 0.0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total_bits += FLOAT_BITS * p.numel()
    return (bpw if qnumel else float(FLOAT_BITS)), total_bits / 8 / 1e6


def bits_per_weight(model: torch.nn.Module) -> tuple[float, float]:
    """(mean bits per weight over quantized layers, over all weights) with scales counted; float = dtype bits."""
    q_bpw, q_numel, seen = _quantized(model)
    rest = [p for p in model.parameters() if id(p) not in seen]
    rest_bits = sum(p.numel() * torch.finfo(p.dtype).bits for p in rest if p.is_floating_point())
    rest_numel = sum(p.numel() for p in rest)
    whole = ((q_bpw * q_numel if q_numel else 0.0) + rest_bits) / max(q_numel + rest_numel, 1)
    return q_bpw, whole


def file_bits_per_weight(path: str | os.PathLike, model: nn.Module) -> tuple[int, float]:
    """(bytes on disk, bits per parameter of the model) of an export file or folder."""
    p = Path(path)
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    n, seen = 0, set()
    for name in float_weight_names(model):  # shapes only: nothing is quantized to count
        module, _, leaf = name.rpartition(".")
        owner = model.get_submodule(module) if module else model
        # a tied weight is one tensor under two names; a converted experts weight (codes in `qweights`, no
        # `gate_up_proj` attribute) is one per module and name
        w = owner.qweight if leaf == "weight" and hasattr(owner, "qweight") else getattr(owner, leaf, None)
        key = id(w) if isinstance(w, torch.Tensor) else (id(owner), leaf)
        if key not in seen:
            seen.add(key)
            n += math.prod(stored_shape(model, name))
    return size, 8 * size / max(n, 1)


def saved_for_backward_bytes(model: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `forward()` (returning a loss) runs,
    parameters excluded; the loss is then backpropagated (gradients are left on the parameters).

    Example:
        >>> saved_for_backward_bytes(model, lambda: model(ids, labels=ids).loss) / 2**20  # MB
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    return sum(seen.values())


class PeakMemory:
    """Peak memory growth during a block (MB): the CUDA allocator's where the block allocated CUDA memory on the
    job's device, else the sampled RSS growth.

    Both are kept: `cuda_peak_mb` (max_memory_allocated of `device` during the block minus what was allocated when
    it began; 0 without CUDA or on a CPU device) and `rss_peak_mb`. `peak_mb` is the CUDA figure when the block
    allocated on the GPU and the RSS figure otherwise: a job with device=cpu on a machine that has a GPU reports its
    RSS, not 0, and a GPU job reports its growth, not the model it already held.
    Args:
        device: the job's device; a CUDA device's own counters are read (cuda:1, not the current device); None:
            the current CUDA device, if CUDA is in use.
    Example:
        >>> with PeakMemory(device=torch.device("cuda:1")) as mem:
        ...     solve()
        >>> mem.peak_mb
    """

    def __init__(self, interval: float = 0.05, device: torch.device | str | None = None) -> None:
        self.interval, self.peak_mb, self.cuda_peak_mb, self.rss_peak_mb = interval, 0.0, 0.0, 0.0
        self.device = None if device is None else torch.device(device)
        self._stop = threading.Event()
        self._cuda_base = None

    def _on_cuda(self) -> bool:
        """CUDA counters to read: a CUDA device (or none given), CUDA present and already in use."""
        return ((self.device is None or self.device.type == "cuda") and torch.cuda.is_available()
                and torch.cuda.is_initialized())

    @staticmethod
    def _rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
        except (OSError, ValueError):
            return 0.0

    def __enter__(self) -> "PeakMemory":
        if self._on_cuda():
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_base = torch.cuda.memory_allocated(self.device)
        self._base = self._rss_mb()
        self._peak = self._base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss_mb())
        self.rss_peak_mb = self._peak - self._base
        if self._on_cuda():
            # CUDA first used inside the block: nothing was allocated before it, and the peak counts from 0
            base = self._cuda_base or 0
            self.cuda_peak_mb = max(torch.cuda.max_memory_allocated(self.device) - base, 0) / 1e6
        self.peak_mb = self.cuda_peak_mb if self.cuda_peak_mb > 0 else self.rss_peak_mb
