"""AWQ (configs/method/awq.yaml): per mapping, the activation-aware input scale is searched and folded into
the producer, then each linear's clipping ratio is searched and its qparams pinned. The searches are
`qat.ptq.awq.search_scale` / `search_clip`; the mappings come from the model's architecture adapter."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from qat.ptq.awq import search_clip, search_scale
from qat.ptq.checks import check_fold, check_ranges, check_weight_schemes
from qat.ptq.fold import applicable, arch_mappings, fold_scales, parse_mappings
from qat.ptq.experts import block_experts, pin_rtn_experts
from qat.ptq.methods.base import PTQMethod, register_method
from qat.ptq.rtn import pin_rtn
from qat.ptq.runner import BlockContext, activation_quantizers_off
from qat.ptq.stats import record_inputs

log = logging.getLogger(__name__)


@dataclass
class AWQConfig:
    """Method config of AWQ (configs/method/awq.yaml).

    Args:
        n_grid: grid points of the scaling exponent (20).
        duo_scaling: AutoAWQ's s = x^r / w^(1-r) instead of llm-awq's s = x^r.
        clip: run the clipping search after scaling.
        clip_grid / max_shrink: clip ratios 1, 1 - 1/clip_grid, ... down to 1 - max_shrink.
        clip_skip: linears (name suffixes) left unclipped; llm-awq skips q/k (their error is amplified by softmax).
        mappings: producer -> consumers entries; None uses the model's architecture's (`qat.arch`, e.g. Llama:
            input_layernorm -> q/k/v, v -> o, post_attention_layernorm -> gate/up, up -> down).
        min_tokens: fewer calibration tokens than this is an error.
        check_fold: verify the float block output is unchanged after folding.
    """

    n_grid: int = 20
    duo_scaling: bool = False
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_skip: Sequence[str] = ("q_proj", "k_proj")
    mappings: Sequence[dict[str, Any]] | None = None
    min_tokens: int = 128
    check_fold: bool = True

    def __post_init__(self) -> None:
        check_ranges("awq", {"n_grid": (self.n_grid, self.n_grid >= 1, ">= 1"),
                             "clip_grid": (self.clip_grid, self.clip_grid >= 1, ">= 1"),
                             "max_shrink": (self.max_shrink, 0.0 <= self.max_shrink < 1.0, "in [0, 1)"),
                             "min_tokens": (self.min_tokens, self.min_tokens >= 0, ">= 0")})
        self.mappings = parse_mappings(self.mappings)


@register_method
class AWQ(PTQMethod):
    """AWQ (Lin et al. 2023) block by block, on integer weight grids."""

    name = "awq"
    Config = AWQConfig

    def check(self, model: nn.Module, linears: dict) -> None:
        check_weight_schemes(linears, "awq: unsupported weight scheme(s)")
        arch_mappings(self.config.mappings, model, "awq")

    def solve_block(self, ctx: BlockContext) -> None:
        cfg, name, linears = self.config, ctx.name, ctx.linears
        with activation_quantizers_off(ctx.block), record_inputs(linears) as stats:
            ref = ctx.float_run(ctx.inputs[:1] if cfg.check_fold else [])
            ctx.float_run(ctx.inputs[1:] if cfg.check_fold else ctx.inputs)
        in_scale = self._scale(ctx, stats)
        if cfg.check_fold and ref:
            check_fold(name, ref, ctx.float_run(ctx.inputs[:1]))
        for n, module in linears.items():
            if not cfg.clip or any(n.endswith(skip) for skip in cfg.clip_skip) or stats[n].n_tokens == 0:
                pin_rtn(module)
                continue
            gram = stats[n].gram
            if n in in_scale:
                gram = gram / torch.outer(in_scale[n], in_scale[n])
            module.weight_quantizer.set_qparams(*search_clip(module.weight, gram, module.weight_quantizer.spec,
                                                             cfg.clip_grid, cfg.max_shrink))
        for experts in block_experts(ctx.block).values():  # no norm -> experts mapping is scaled: round-to-nearest
            pin_rtn_experts(experts)

    def _scale(self, ctx: BlockContext, stats: dict) -> dict[str, torch.Tensor]:
        """Search and fold the input scale of every applicable mapping; {linear: its scale}."""
        cfg, in_scale = self.config, {}
        mappings = arch_mappings(cfg.mappings, ctx.model, "awq")
        for mapping, prev, lins in applicable(ctx.block, mappings, ctx.linears, f"awq {ctx.name}"):
            st = [stats[n] for n in mapping.linears]
            s, err, err_rtn = search_scale([m.weight for m in lins], [x.gram for x in st], st[0].mean_abs(),
                                           [m.weight_quantizer.spec for m in lins], cfg.n_grid, cfg.duo_scaling)
            log.debug("awq %s %s: error %.4g (rtn %.4g)", ctx.name, mapping.linears, err, err_rtn)
            fold_scales(prev, lins, s, mapping.offset)
            for n in mapping.linears:
                in_scale[n] = s
        return in_scale
