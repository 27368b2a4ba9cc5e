"""AWQ (configs/method/awq.yaml): per mapping, the activation-aware input scale is searched and folded into
the producer, then each linear's clipping ratio is searched and its qparams pinned. The searches are
`qat.ptq.awq.search_scale` / `search_clip`; the mappings come from the model's architecture adapter. Fused MoE
experts take the same searches per expert, on the tokens routed to each (`qat.ptq.awq_experts`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from qat.errors import ConfigError
from qat.ptq.awq import search_clip, search_scale
from qat.ptq.awq_experts import DOWN, GATE_UP, clip_experts, expert_mappings, scale_norm_experts, scale_up_down
from qat.ptq.gptq import check_spec
from qat.ptq.checks import check_fold, check_ranges, check_weight_schemes
from qat.ptq.distributed import combine, spread
from qat.ptq.fold import applicable, arch_mappings, fold_scales, parse_mappings
from qat.ptq.experts import block_experts, record_expert_inputs
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
        min_expert_tokens: an MoE expert routed fewer calibration tokens than this keeps scale 1 in its own
            up -> down mapping and round-to-nearest qparams (a warning names it).
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
    min_expert_tokens: int = 16
    check_fold: bool = True

    def __post_init__(self) -> None:
        check_ranges("awq", {"n_grid": (self.n_grid, self.n_grid >= 1, ">= 1"),
                             "clip_grid": (self.clip_grid, self.clip_grid >= 1, ">= 1"),
                             "max_shrink": (self.max_shrink, 0.0 <= self.max_shrink < 1.0, "in [0, 1)"),
                             "min_tokens": (self.min_tokens, self.min_tokens >= 0, ">= 0"),
                             "min_expert_tokens": (self.min_expert_tokens, self.min_expert_tokens >= 1, ">= 1")})
        self.mappings = parse_mappings(self.mappings)


@register_method
class AWQ(PTQMethod):
    """AWQ (Lin et al. 2023) block by block, on integer weight grids."""

    name = "awq"
    Config = AWQConfig
    distributed = True

    def check(self, model: nn.Module, linears: dict) -> None:
        check_weight_schemes(linears, "awq: unsupported weight scheme(s)")
        errors = []
        for n, m in block_experts(model).items():
            for w, q in m.weight_quantizers.items():
                try:
                    check_spec(q.spec, f"{n}.{w}")
                except ValueError as err:
                    errors.append(str(err))
        if errors:
            raise ConfigError("awq: unsupported expert weight scheme(s):\n" + "\n".join(f"  - {e}" for e in errors))
        arch_mappings(self.config.mappings, model, "awq")

    def solve_block(self, ctx: BlockContext) -> None:
        cfg, name, linears, ranks = self.config, ctx.name, ctx.linears, self.ranks
        experts = {n: m for n, m in block_experts(ctx.block).items() if not m.transposed}  # transposed: RTN
        # sums made batch by batch: the order a process group reproduces (`qat.ptq.distributed`)
        keep = ranks is not None
        with activation_quantizers_off(ctx.block), record_inputs(linears, per_batch=True, keep=keep) as stats, \
                record_expert_inputs(_with(experts, GATE_UP), GATE_UP, magnitudes=True, keep=keep) as up_stats, \
                record_expert_inputs(_with(experts, DOWN), DOWN, magnitudes=True, keep=keep) as down_stats:
            ref = ctx.float_run(ctx.inputs[:1]) if cfg.check_fold else []
            ctx.float_run(ctx.inputs[len(ref):], first=len(ref))
        combine(ranks, [*stats.values(), *(st for d in (up_stats, down_stats) for sts in d.values() for st in sts)])
        in_scale = self._scale(ctx, stats)
        expert_scale = self._scale_experts(ctx, up_stats, down_stats)
        if cfg.check_fold and ref:
            check_fold(name, ref, ctx.float_run(ctx.inputs[:1]))
        # the clipping searches are independent given the folded weights: spread over the processes
        clipped = [n for n in linears if cfg.clip and not any(n.endswith(skip) for skip in cfg.clip_skip)
                   and stats[n].n_tokens > 0]

        def clip(i: int):
            module, gram = linears[clipped[i]], stats[clipped[i]].gram
            if clipped[i] in in_scale:
                gram = gram / torch.outer(in_scale[clipped[i]], in_scale[clipped[i]])
            return search_clip(module.weight, gram, module.weight_quantizer.spec, cfg.clip_grid, cfg.max_shrink)

        qparams = dict(zip(clipped, spread(ranks, [linears[n].weight.numel() for n in clipped], clip)))
        for n, module in linears.items():
            if n in qparams:
                module.weight_quantizer.set_qparams(*qparams[n])
            else:
                pin_rtn(module)
        for n, m in block_experts(ctx.block).items():
            full = f"{name}.{n}" if name else n
            for w, st in ((GATE_UP, up_stats), (DOWN, down_stats)):
                if w in m.weight_quantizers:
                    clip_experts(full, m, w, st.get(n), expert_scale.get((n, w)), cfg.clip, cfg.clip_grid,
                                 cfg.max_shrink, cfg.min_expert_tokens, ranks)

    def _scale_experts(self, ctx: BlockContext, up_stats: dict, down_stats: dict) -> dict:
        """Search and fold the scales of the mappings that reach fused experts; {(experts, weight): scale}."""
        cfg, out = self.config, {}
        mappings = arch_mappings(cfg.mappings, ctx.model, "awq")
        for m in expert_mappings(ctx.block, mappings, f"awq {ctx.name}"):
            if m.kind == "norm" and m.experts_name in up_stats:
                out[(m.experts_name, GATE_UP)] = scale_norm_experts(m, up_stats[m.experts_name], cfg.n_grid,
                                                                    cfg.duo_scaling, self.ranks)
            elif m.kind == "up" and m.experts_name in down_stats:
                out[(m.experts_name, DOWN)] = scale_up_down(m, down_stats[m.experts_name], cfg.n_grid,
                                                            cfg.duo_scaling, cfg.min_expert_tokens, self.ranks)
        return out

    def _scale(self, ctx: BlockContext, stats: dict) -> dict[str, torch.Tensor]:
        """Search and fold the input scale of every applicable mapping; {linear: its scale}.

        The searches of a run of independent mappings (`independent_runs`; Llama's four are one) are spread over
        the processes; the folds are made in mapping order, as one after the other would."""
        cfg, in_scale = self.config, {}
        mappings = arch_mappings(cfg.mappings, ctx.model, "awq")
        found = list(applicable(ctx.block, mappings, ctx.linears, f"awq {ctx.name}"))
        for run in independent_runs([(prev, lins) for _, prev, lins in found]):
            def search(i: int, run=run):
                mapping, _, lins = found[run[i]]
                st = [stats[n] for n in mapping.linears]
                return search_scale([m.weight for m in lins], [x.gram for x in st], st[0].mean_abs(),
                                    [m.weight_quantizer.spec for m in lins], cfg.n_grid, cfg.duo_scaling)

            costs = [sum(m.weight.numel() for m in found[j][2]) for j in run]
            for j, (s, err, err_rtn) in zip(run, spread(self.ranks, costs, search)):
                mapping, prev, lins = found[j]
                log.debug("awq %s %s: error %.4g (rtn %.4g)", ctx.name, mapping.linears, err, err_rtn)
                fold_scales(prev, lins, s, mapping.offset)
                for n in mapping.linears:
                    in_scale[n] = s
        return in_scale


def independent_runs(mappings: list[tuple[nn.Module, list[nn.Module]]]) -> list[list[int]]:
    """Mappings (producer, consumers), in order, cut into runs whose scale searches do not depend on each other's
    folds: a search reads its consumers' weights, a fold writes its producer's and its consumers'; a mapping
    starts a new run when it reads a weight that an earlier mapping of the current run writes.

    Example:
        >>> independent_runs([(norm, [q, k, v]), (v, [o])])   # o is not written by the first: one run
        [[0, 1]]
    """
    runs: list[list[int]] = []
    written: set[int] = set()
    for j, (prev, lins) in enumerate(mappings):
        if not runs or any(id(m) in written for m in lins):
            runs.append([])
            written = set()
        runs[-1].append(j)
        written |= {id(prev), *(id(m) for m in lins)}
    return runs


def _with(experts: dict, weight: str) -> dict:
    return {n: m for n, m in experts.items() if weight in m.weight_quantizers}
