"""Measured scores, for checking the estimates: quantize one module alone to one candidate and measure

    score(m, c) = sum over calibration tokens of KL(p_float || p_quantized)

of the model's next-token distributions. One forward per calibration batch per (module, candidate): exact, and
the slowest method by far (use it on small models, or on a few modules: `modules` regexes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from qat.errors import ConfigError
from qat.sensitivity.scores import Scorer, quantized_weight, register_scorer


@dataclass
class KLConfig:
    """Options of the measured-KL scorer. modules: regexes (re.fullmatch) of the modules to measure; the others
    score 0 (empty: every module)."""

    modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.modules, (list, tuple)) or not all(isinstance(p, str) for p in self.modules):
            raise ConfigError(f"method.modules={self.modules!r}; give a list of regexes")
        for p in self.modules:
            try:
                re.compile(p)
            except re.error as err:
                raise ConfigError(f"method.modules: bad regex {p!r}: {err}") from None


@torch.no_grad()
def _log_probs(model, batches) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [torch.log_softmax(model(input_ids=ids.to(device), use_cache=False).logits.float(), -1) for ids in batches]


@register_scorer
class KL(Scorer):
    """Measured KL(float || one module quantized); see the module docstring."""

    name = "kl"
    Config = KLConfig

    @torch.no_grad()
    def score(self, model, modules, menu, fits, batches):
        was_training = model.training
        model.eval()
        reference = _log_probs(model, batches)
        wanted = [re.compile(p) for p in self.config.modules]
        out = {}
        try:
            for name, m in modules.items():
                out[name] = dict.fromkeys(fits[name], 0.0)
                if wanted and not any(p.fullmatch(name) for p in wanted):
                    continue
                original = m.weight.detach().clone()
                try:
                    for cand in fits[name]:
                        if menu[cand].spec is None:
                            continue
                        m.weight.copy_(quantized_weight(original, menu[cand].spec).to(original.dtype))
                        kl = sum(float((ref.exp() * (ref - logq)).sum())
                                 for ref, logq in zip(reference, _log_probs(model, batches)))
                        out[name][cand] = max(kl, 0.0)  # >= 0 in exact arithmetic; rounding can dip below
                finally:
                    m.weight.copy_(original)
        finally:
            model.train(was_training)
        return out
