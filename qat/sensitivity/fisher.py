"""Fisher / empirical-Hessian scores (the default): for module m and candidate c,

    score(m, c) = sum over calibration tokens t of (dL/dY_t . dY_t)^2,   dY_t = (W_c - W) x_t

where Y = W x + b is the module's output, L the summed next-token cross-entropy of the float model, and W_c the
weight as fake quant computes it under c (`quantized_weight`). With a base recipe (`qat.sensitivity.base`) the
model runs with its activation / KV schemes and rotations: x is the module's input after its input quantizer
and dL/dY the gradient of that model. One forward and one backward per calibration
batch give every module's inputs x and output gradients dL/dY; each candidate's dY then costs one matmul. This
is the estimate of NVIDIA Model Optimizer's AutoQuantize (the Fisher approximation of the loss increase).

The quantization error W_c - W of each (module, candidate) is computed once and kept (in `cache_dtype`) while
the total stays under `cache_mb`; beyond it, it is recomputed per batch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from qat.errors import ConfigError
from qat.sensitivity.base import effective_input
from qat.sensitivity.scores import Scorer, quantized_weight, register_scorer

log = logging.getLogger(__name__)
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FisherConfig:
    """Options of the Fisher scorer.

    Args:
        cache_mb: memory for the kept quantization errors (W_c - W); 0 recomputes them every batch.
        cache_dtype: their dtype (bfloat16 halves the memory; scores change by well under 1%).
    """

    cache_mb: int = 2048
    cache_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if not isinstance(self.cache_mb, int) or isinstance(self.cache_mb, bool) or self.cache_mb < 0:
            raise ConfigError(f"method.cache_mb={self.cache_mb!r}; must be an integer >= 0")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"method.cache_dtype={self.cache_dtype!r}; choose from {sorted(CACHE_DTYPES)}")


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of `ids` [B, T] (float32)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


class frozen_weights:
    """Context: every parameter's requires_grad off (restored after); the input embeddings' output requires grad,
    so backward reaches every activation and no weight gradient is made."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.flags, self.handle = model, {}, None

    def __enter__(self):
        self.flags = {id(p): p.requires_grad for p in self.model.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.handle = self.model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        for p in self.model.parameters():
            p.requires_grad_(self.flags[id(p)])


@register_scorer
class Fisher(Scorer):
    """sum_t (dL/dY_t . dY_t)^2 per (module, candidate); see the module docstring."""

    name = "fisher"
    Config = FisherConfig

    def score(self, model, modules, menu, fits, batches):
        device = next(model.parameters()).device
        cache_dtype = CACHE_DTYPES[self.config.cache_dtype]
        budget = self.config.cache_mb * 2 ** 20
        cache: dict[tuple[str, str], torch.Tensor] = {}
        scores = {name: dict.fromkeys(fits[name], 0.0) for name in modules}

        def delta(name: str, cand: str) -> torch.Tensor:
            nonlocal budget
            if (name, cand) in cache:
                return cache[(name, cand)].float()
            w = modules[name].weight
            d = quantized_weight(w, menu[cand].spec) - w.detach().float()
            size = d.numel() * torch.finfo(cache_dtype).bits // 8
            if size <= budget:
                cache[(name, cand)], budget = d.to(cache_dtype), budget - size
            return d

        def accumulate(name: str, x: torch.Tensor, g: torch.Tensor) -> None:
            x, g = x.detach().reshape(-1, x.shape[-1]).float(), g.detach().reshape(-1, g.shape[-1]).float()
            for cand in fits[name]:
                if menu[cand].spec is None:
                    continue  # float: dY = 0
                dy = x @ delta(name, cand).T
                scores[name][cand] += float(((g * dy).sum(-1) ** 2).sum())

        inputs: dict[str, torch.Tensor] = {}

        def forward_hook(name):
            def hook(module, args, out):
                inputs[name] = effective_input(module, args[0])  # x as the weight sees it (a base's A8)
                if out.requires_grad:
                    out.register_hook(lambda g: accumulate(name, inputs.pop(name), g))
            return hook

        was_training = model.training
        model.eval()
        handles = [m.register_forward_hook(forward_hook(n)) for n, m in modules.items()]
        try:
            with frozen_weights(model):
                start = time.perf_counter()
                for i, ids in enumerate(batches):
                    lm_loss(model, ids.to(device)).backward()
                    inputs.clear()
                    log.info("fisher: batch %d/%d scored (%.0f s)", i + 1, len(batches), time.perf_counter() - start)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        return scores
