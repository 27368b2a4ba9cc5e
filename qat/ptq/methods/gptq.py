"""GPTQ (configs/method/gptq.yaml): each block's linears solved column by column on their input Hessian,
stage by stage (q/k/v, o, gate/up, down) with `true_sequential`. The solver is `qat.ptq.gptq.gptq_quantize`."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from qat.control import quantization_disabled
from qat.errors import ConfigError, module_lines
from qat.ptq.checks import check_ranges
from qat.ptq.distributed import combine, spread
from qat.ptq.gptq import STATIC_FIT, GPTQResult, check_spec, gptq_quantize, hessian_factor, holds_g_idx
from qat.ptq.experts import block_experts, check_experts_gptq, record_expert_inputs, solve_experts_weight
from qat.ptq.methods.base import PTQMethod, register_method
from qat.ptq.rtn import pin_rtn
from qat.ptq.runner import BlockContext, Inputs, activation_quantizers_off, run_block
from qat.ptq.staged import StagedBlock, call_sequence, can_stage, group_calls, has_activation_quantizers
from qat.ptq.stats import InputStats, record_call_order, record_inputs

log = logging.getLogger(__name__)


@dataclass
class GPTQConfig:
    """Method config of GPTQ (configs/method/gptq.yaml).

    Args:
        blocksize: columns per lazy batch update (128).
        percdamp: dampening as a fraction of mean(diag H) (0.01).
        actorder: desc_act column order (records g_idx with dynamic groups).
        static_groups: group qparams fitted on the original weights.
        true_sequential: inside a block, calibrate each stage (q/k/v, o, gate/up, down) on the outputs
            of the already-quantized stages before it.
        min_tokens: fewer calibration tokens than this is an error.
        min_expert_tokens: an MoE expert routed fewer calibration tokens than this is quantized round-to-nearest
            (with a warning naming it) instead of GPTQ on its own Hessian.
        route_all_experts: build every expert's Hessian from all calibration tokens, not only those the router
            sends it (statistics only: the block's outputs still follow the router).
        stage_cache: with true_sequential, run each stage's pass only up to its input and replay the outputs of
            solved sub-modules (`qat.ptq.staged`), and solve a stage's linears on one Hessian factor: the same
            weights as a full block forward per stage (false: that reference path), about 3x less work.
        stage_cache_mb: most MiB of replayed sub-module outputs kept per block (with 128 x 256 tokens, SmolLM2-135M
            needs about 600); past it they are recomputed: the same weights, more time, less memory.
    """

    blocksize: int = 128
    percdamp: float = 0.01
    actorder: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    min_tokens: int = 128
    min_expert_tokens: int = 16
    route_all_experts: bool = False
    stage_cache: bool = True
    stage_cache_mb: float = 4096.0

    def __post_init__(self) -> None:
        check_ranges("gptq", {"blocksize": (self.blocksize, self.blocksize >= 1, ">= 1"),
                              "percdamp": (self.percdamp, 0.0 <= self.percdamp < 1.0, "in [0, 1)"),
                              "min_tokens": (self.min_tokens, self.min_tokens >= 0, ">= 0"),
                              "stage_cache_mb": (self.stage_cache_mb, self.stage_cache_mb >= 0, ">= 0"),
                              "min_expert_tokens": (self.min_expert_tokens, self.min_expert_tokens >= 1, ">= 1")})


def check_model(linears: dict, cfg: GPTQConfig) -> None:
    """Every check GPTQ can make before solving, all offenders listed at once.

    Raises:
        ValueError: unsupported weight schemes; act-order with dynamic groups on learned scales (which cannot
            hold a g_idx) or on a GGUF grid (whose blocks cannot).
    Example:
        >>> check_model(quantized_linears(model), GPTQConfig(actorder=True, static_groups=True))
    """
    errors = []
    for n, m in linears.items():
        spec = m.weight_quantizer.spec
        try:
            check_spec(spec, n, grids=True)
        except ValueError as err:
            errors.append((n, str(err).removeprefix(f"{n}: ")))
            continue
        if cfg.actorder and not cfg.static_groups and spec.granularity == "per_group":
            if m.weight_quantizer.learned:
                errors.append((n, "actorder with dynamic groups records a g_idx, which learned scales do not "
                                  "support; set static_groups=true"))
            elif not holds_g_idx(spec) and spec.grid not in STATIC_FIT:  # those solve with static groups anyway
                errors.append((n, "actorder with dynamic groups records a g_idx, which the blocks of this format "
                                  f"({spec.grid} grid) cannot hold; set static_groups=true or actorder=false"))
    if errors:
        raise ConfigError("gptq: unsupported weight scheme(s):\n" + "\n".join(f"  - {e}" for e in module_lines(errors)))


def solve_linear(name: str, module, stats: InputStats, cfg: GPTQConfig, factor=None) -> float | None:
    """GPTQ one FakeQuantLinear from its input statistics; set its weight and pin its qparams.

    Falls back to round-to-nearest, with a warning, when the layer saw no tokens or only zero inputs.
    `factor` (`qat.ptq.gptq.hessian_factor` of these statistics) is shared by linears reading one input.
    Returns:
        the GPTQ loss, or None for the RTN fallback.
    """
    if not usable(stats):
        warnings.warn(f"{name}: all calibration inputs of this layer are zero (or it was never called); "
                      "quantizing it round-to-nearest instead of GPTQ", RuntimeWarning, stacklevel=2)
        pin_rtn(module)
        return None
    return set_result(module, solve_result(name, module, stats, cfg, factor))


def solve_result(name: str, module, stats: InputStats, cfg: GPTQConfig, factor=None) -> GPTQResult:
    """GPTQ of one FakeQuantLinear from its (usable) input statistics, the module left unchanged."""
    return gptq_quantize(module.weight, stats.hessian(), module.weight_quantizer.spec, cfg.blocksize, cfg.percdamp,
                         cfg.actorder, cfg.static_groups, name=name, factor=factor)


def set_result(module, res: GPTQResult) -> float:
    """Set a solved weight and pin its qparams on the module; returns the GPTQ loss."""
    with torch.no_grad():
        module.weight.copy_(res.weight)
    module.weight_quantizer.set_qparams(res.scale, res.zero_point, res.g_idx)
    return res.loss


def usable(stats: InputStats) -> bool:
    """The layer saw calibration tokens, not all zero: GPTQ has a Hessian to solve with."""
    return stats.n_tokens > 0 and bool(torch.diag(stats.gram).any())


def stages(block: nn.Module, inputs: Inputs, linears: dict, is_model: bool) -> list[list[str]]:
    """Linears grouped by the tensor they read, in call order (q/k/v, o, gate/up, down for Llama)."""
    with quantization_disabled(block), record_call_order(linears) as order:
        run_block(block, inputs[:1], is_model)
    groups: list[list[str]] = []
    last = None
    for n, tensor in order:
        if tensor is not last:
            groups.append([])
        groups[-1].append(n)
        last = tensor
    missing = [n for n in linears if all(n not in g for g in groups)]
    return groups + [[n] for n in missing]  # never called here: each on its own


@register_method
class GPTQ(PTQMethod):
    """GPTQ (Frantar et al. 2022) block by block; also on the GGUF block grids."""

    name = "gptq"
    Config = GPTQConfig
    distributed = True

    def check(self, model: nn.Module, linears: dict) -> None:
        check_model(linears, self.config)
        errors = check_experts_gptq(block_experts(model), self.config.actorder, self.config.static_groups)
        if errors:
            raise ConfigError("gptq: unsupported expert weight scheme(s):\n" + "\n".join(f"  - {e}" for e in errors))
        self.expert_tokens: dict[str, list[int]] = {}

    def solve_block(self, ctx: BlockContext) -> None:
        cfg, block, linears = self.config, ctx.block, ctx.linears
        if cfg.true_sequential and cfg.stage_cache and ctx.inputs and can_stage(block, ctx.is_model):
            self._solve_staged(ctx)
            return
        groups = stages(block, ctx.inputs, linears, ctx.is_model) if cfg.true_sequential else [list(linears)]
        for group in groups:
            mods = {n: linears[n] for n in group}
            # a stage's linears read one tensor (q/k/v, gate/up): one Hessian serves them all
            recorded = {group[0]: mods[group[0]]} if cfg.true_sequential else mods
            with activation_quantizers_off(block), record_inputs(recorded, magnitudes=False, per_batch=True,
                                                                 keep=self.ranks is not None) as stats:
                if cfg.true_sequential:
                    ctx.run()
                else:
                    with quantization_disabled(block):
                        ctx.run()
            if cfg.true_sequential:
                self._solve_group(ctx.name, mods, stats[group[0]])
            else:
                self._solve_each(ctx.name, mods, stats)
            del stats
        self._solve_experts(ctx)

    def _solve_staged(self, ctx: BlockContext) -> None:
        """True-sequential stages, each pass run only up to the stage's input (`qat.ptq.staged`); the block's
        outputs come from the same replay when no activation quantizer changes them."""
        cfg, block, linears = self.config, ctx.block, ctx.linears
        args, kwargs = ctx.inputs[0]
        calls = call_sequence(block, args, kwargs, linears)
        names = [n for n, _ in calls]
        staged = StagedBlock(block, ctx.inputs, linears, {n for n in linears if names.count(n) == 1}, cfg.stage_cache_mb)
        staged.keep_batches = self.ranks is not None
        with activation_quantizers_off(block):
            for group in group_calls(calls, list(linears)):
                stats = staged.capture(group[0])
                self._solve_group(ctx.name, {n: linears[n] for n in group}, stats)
                staged.solved(group)
                del stats
            if not has_activation_quantizers(block):
                ctx.outputs = staged.outputs()

    def _solve_group(self, block_name: str, group: dict, stats: InputStats) -> None:
        """The linears of one stage, reading one input, on its statistics and one shared Hessian factor. Over a
        process group (`qat.ptq.distributed`) the statistics are first combined in the one-process order and
        each linear is solved by one process, its result set everywhere."""
        cfg = self.config
        combine(self.ranks, stats)
        if not usable(stats):  # round-to-nearest with a warning: the same in every process, nothing to send
            for n, m in group.items():
                solve_linear(f"{block_name}.{n}", m, stats, cfg)
            return
        names, factor = list(group), []

        def solve(i: int) -> GPTQResult:
            if not factor:  # once per process that solves something of this stage
                factor.append(hessian_factor(stats.hessian(), cfg.percdamp, cfg.actorder, f"{block_name}.{names[0]}"))
            return solve_result(f"{block_name}.{names[i]}", group[names[i]], stats, cfg, factor[0])

        results = spread(self.ranks, [m.weight.numel() for m in group.values()], solve)
        for n, res in zip(names, results):
            loss = set_result(group[n], res)
            log.debug("gptq %s.%s loss=%s", block_name, n, loss)

    def _solve_each(self, block_name: str, mods: dict, stats: dict[str, InputStats]) -> None:
        """Linears each on its own statistics (true_sequential=false), combined and spread as in `_solve_group`."""
        combine(self.ranks, [stats[n] for n in mods])
        solvable = [n for n in mods if usable(stats[n])]
        results = spread(self.ranks, [mods[n].weight.numel() for n in solvable],
                         lambda i: solve_result(f"{block_name}.{solvable[i]}", mods[solvable[i]], stats[solvable[i]],
                                                self.config))
        for n, res in zip(solvable, results):
            loss = set_result(mods[n], res)
            log.debug("gptq %s.%s loss=%s", block_name, n, loss)
        for n in mods:
            if n not in solvable:  # round-to-nearest with a warning
                solve_linear(f"{block_name}.{n}", mods[n], stats[n], self.config)

    def _solve_experts(self, ctx: BlockContext) -> None:
        """Expert-aware GPTQ: gate_up_proj then down_proj of every expert, each on the tokens routed to it."""
        experts = block_experts(ctx.block)
        for weight in ("gate_up_proj", "down_proj"):
            targets = {n: m for n, m in experts.items() if weight in m.weight_quantizers}
            if not targets:
                continue
            with activation_quantizers_off(ctx.block), record_expert_inputs(
                    targets, weight, self.config.route_all_experts, keep=self.ranks is not None) as stats:
                ctx.run()
            combine(self.ranks, [st for n in targets for st in stats[n]])
            for n, m in targets.items():
                tokens = solve_experts_weight(f"{ctx.name}.{n}" if ctx.name else n, m, weight, stats[n], self.config,
                                              self.config.min_expert_tokens, self.ranks)
                if weight == "gate_up_proj":
                    getattr(self, "expert_tokens", {})[f"{ctx.name}.{n}" if ctx.name else n] = tokens
