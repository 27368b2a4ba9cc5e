"""SmoothQuant (configs/method/smoothquant.yaml): per-channel scales folded from the activations into the weights
(`qat.ptq.smoothquant.smooth_scale`) through the architecture's norm -> linear mappings, then RTN weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from qat.control import quantizers
from qat.errors import ConfigError
from qat.ptq.checks import check_fold
from qat.ptq.distributed import combine
from qat.ptq.fold import applicable, arch_mappings, fold_scales, parse_mappings
from qat.ptq.experts import block_experts, pin_rtn_experts
from qat.ptq.methods.base import PTQMethod, register_method
from qat.ptq.rtn import pin_rtn
from qat.ptq.runner import BlockContext, activation_quantizers_off
from qat.ptq.smoothquant import smooth_scale
from qat.ptq.stats import record_inputs


@dataclass
class SmoothQuantConfig:
    """Method config of SmoothQuant (configs/method/smoothquant.yaml).

    Args:
        alpha: migration strength in [0, 1] (0.5 for OPT, 0.8-0.85 for Llama).
        mappings: producer -> consumers entries; None uses the norm mappings of the model's architecture
            (`qat.arch`, e.g. Llama: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up).
        min_tokens: fewer calibration tokens than this is an error.
        check_fold: verify the float block output is unchanged after folding.
    """

    alpha: float = 0.5
    mappings: Sequence[dict[str, Any]] | None = None
    min_tokens: int = 128
    check_fold: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"smoothquant.alpha={self.alpha}; choose a value in [0, 1]")
        if self.min_tokens < 0:
            raise ConfigError(f"smoothquant: min_tokens={self.min_tokens} must be >= 0")
        self.mappings = parse_mappings(self.mappings)


@register_method
class SmoothQuant(PTQMethod):
    """SmoothQuant for recipes that quantize activations (W8A8 and friends)."""

    name = "smoothquant"
    Config = SmoothQuantConfig
    distributed = True

    def check(self, model: nn.Module, linears: dict) -> None:
        if next(quantizers(model, ["input"]), None) is None:
            raise ConfigError("smoothquant: the recipe quantizes no activations (no input quantizer), and SmoothQuant "
                             "only moves activation outliers into the weights for activation quantization: use a "
                             "recipe with `input:` (w8a8, w8a8_static, w4a8_kv8, fp8_dynamic), or rtn / gptq / awq "
                             "for weight-only recipes")
        arch_mappings(self.config.mappings, model, "smoothquant", smooth=True)

    def solve_block(self, ctx: BlockContext) -> None:
        cfg, linears = self.config, ctx.linears
        # max |x| is exact in any order; per_batch keeps every sum in the order a process group reproduces
        with activation_quantizers_off(ctx.block), record_inputs(linears, hessian=False, per_batch=True,
                                                                 keep=self.ranks is not None) as stats:
            ref = ctx.float_run()
        combine(self.ranks, list(stats.values()))
        mappings = arch_mappings(cfg.mappings, ctx.model, "smoothquant", smooth=True)
        for mapping, prev, lins in applicable(ctx.block, mappings, linears, f"smoothquant {ctx.name}"):
            s = smooth_scale(stats[mapping.linears[0]].abs_max, [m.weight for m in lins], cfg.alpha)
            fold_scales(prev, lins, s, mapping.offset)
        if cfg.check_fold:
            check_fold(ctx.name, ref[:1], ctx.float_run(ctx.inputs[:1]))
        for module in linears.values():
            pin_rtn(module)
        for experts in block_experts(ctx.block).values():  # no norm -> experts mapping is scaled: round-to-nearest
            pin_rtn_experts(experts)
