"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights before W8A8.

s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) per input channel j (max over all consumers' weights),
folded into the producer (the norm before q/k/v and before gate/up), so the float model is unchanged.
Weights are then quantized round-to-nearest (per channel for the W8A8 recipes) and pinned; static
activation ranges are calibrated block by block by the runner on the smoothed inputs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from qat.ptq.fold import applicable, fold_scales, parse_mappings

log = logging.getLogger(__name__)

# The reference smooths only the norm -> linear pairs of Llama layers.
LLAMA_SMOOTH_MAPPINGS = (
    {"prev": "input_layernorm", "linears": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]},
    {"prev": "post_attention_layernorm", "linears": ["mlp.gate_proj", "mlp.up_proj"]},
)


@dataclass
class SmoothQuantConfig:
    """Method config of SmoothQuant (configs/method/smoothquant.yaml).

    Args:
        alpha: migration strength in [0, 1] (0.5 for OPT, 0.8-0.85 for Llama).
        mappings: producer -> consumers entries; None uses the two Llama norm mappings.
        min_tokens: fewer calibration tokens than this is an error.
    """

    alpha: float = 0.5
    mappings: Sequence[dict[str, Any]] | None = None
    min_tokens: int = 128
    check_fold: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smoothquant.alpha={self.alpha}; choose a value in [0, 1]")
        if self.min_tokens < 0:
            raise ValueError(f"smoothquant: min_tokens={self.min_tokens} must be >= 0")
        self.mappings = parse_mappings(LLAMA_SMOOTH_MAPPINGS if self.mappings is None else self.mappings)


def smooth_scale(act_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """s = act_max^alpha / w_max^(1 - alpha); channels never active (or with all-zero weights) keep s = 1.

    Example:
        >>> s = smooth_scale(stats.abs_max, [q.weight, k.weight, v.weight], alpha=0.5)
    """
    w_max = torch.cat([w.detach().float().abs() for w in weights], 0).amax(0)
    act_max = act_max.float()
    s = act_max.pow(alpha) / w_max.pow(1 - alpha)
    ok = (act_max > 0) & (w_max > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp(min=1e-5), torch.ones_like(s))


def smoothquant_block(cfg: SmoothQuantConfig):
    """The `solve_block` of `qat.ptq.runner.sequential` for SmoothQuant."""
    from qat.ptq.awq import _check_fold
    from qat.ptq.rtn import pin_rtn
    from qat.ptq.runner import activation_quantizers_off, float_pass, quantized_linears
    from qat.ptq.stats import record_inputs

    def solve(name, block, inputs, is_model):
        linears = quantized_linears(block)
        with activation_quantizers_off(block), record_inputs(linears, hessian=False) as stats:
            ref = float_pass(block, inputs, is_model)
        for mapping, prev, lins in applicable(block, cfg.mappings, linears, f"smoothquant {name}"):
            s = smooth_scale(stats[mapping.linears[0]].abs_max, [m.weight for m in lins], cfg.alpha)
            fold_scales(prev, lins, s)
        if cfg.check_fold:
            _check_fold(name, ref[:1], float_pass(block, inputs[:1], is_model))
        for module in linears.values():
            pin_rtn(module)

    return solve
