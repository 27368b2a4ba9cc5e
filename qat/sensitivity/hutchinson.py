"""Hessian-trace scores (HAWQ-style, Hutchinson's estimator), for checking the Fisher scores:

    score(m, c) = 1/2 * Tr(H_m) / n_m * ||W_c - W||^2

with H_m the block of the Hessian of the mean next-token cross-entropy for module m's weight (n_m entries).
Tr(H_m) = E[v^T H_m v] over Rademacher vectors v; H v comes from a second backward (double backprop through
the model, attention run eagerly for it). `probes` vectors per calibration batch. A negative trace estimate
(noise, or a non-convex point: a random model has them) scores 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qat.control import unfused_ste
from qat.errors import ConfigError
from qat.modules.kv_cache import base_attention, set_base_attention
from qat.sensitivity.fisher import lm_loss
from qat.sensitivity.scores import Scorer, quantized_weight, register_scorer


@dataclass
class HutchinsonConfig:
    """Options of the Hutchinson scorer. probes: Rademacher vectors per batch; seed: their generator's seed."""

    probes: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.probes, int) or isinstance(self.probes, bool) or self.probes < 1:
            raise ConfigError(f"method.probes={self.probes!r}; must be an integer >= 1")


def hessian_traces(model: nn.Module, modules: dict[str, nn.Linear], batches, probes: int, seed: int) -> dict[str, float]:
    """Hutchinson estimates of Tr(H_m) per module (mean over batches and probes)."""
    params = {p for p in model.parameters()}
    flags = {p: p.requires_grad for p in params}
    weights = [m.weight for m in modules.values()]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    traces = dict.fromkeys(modules, 0.0)
    attn = getattr(model.config, "_attn_implementation", None)
    kv_base = base_attention(model)  # a base recipe's KV quantizers: keep them, on eager attention
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        if kv_base is not None:
            set_base_attention(model, "eager")
        elif attn is not None:
            model.set_attn_implementation("eager")  # double backward through every attention kernel
        with unfused_ste(model):  # linears and fused experts: the lean STE's backward is not twice differentiable
            for ids in batches:
                ids = ids.to(weights[0].device)
                loss = lm_loss(model, ids) / ids[:, 1:].numel()
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                for k in range(probes):
                    vs = [(torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w) for w in weights]
                    hvs = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=k < probes - 1)
                    for name, v, hv in zip(modules, vs, hvs):
                        traces[name] += float((v * hv).sum()) / (probes * len(batches))
    finally:
        for p in params:
            p.requires_grad_(flags[p])
        if kv_base is not None:
            set_base_attention(model, kv_base)
        elif attn is not None:
            model.set_attn_implementation(attn)
    return traces


@register_scorer
class Hutchinson(Scorer):
    """1/2 Tr(H_m)/n_m ||W_c - W||^2; see the module docstring."""

    name = "hutchinson"
    Config = HutchinsonConfig

    def score(self, model, modules, menu, fits, batches):
        was_training = model.training
        model.eval()
        try:
            traces = hessian_traces(model, modules, batches, self.config.probes, self.config.seed)
        finally:
            model.train(was_training)
        out = {}
        for name, m in modules.items():
            w = m.weight.detach().float()
            per_weight = max(traces[name], 0.0) / w.numel()  # a negative estimate is noise (or a saddle): no signal
            out[name] = {c: 0.5 * per_weight * float((quantized_weight(w, menu[c].spec) - w).pow(2).sum())
                         for c in fits[name]}
        return out
