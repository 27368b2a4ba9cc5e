"""Mixture-of-experts weights in PTQ: tokens per expert, round-to-nearest, and expert-aware GPTQ.

Every expert gets its own qparams from its own weights (range initialisation sees all experts by construction:
a weight range needs no tokens). GPTQ needs tokens: each expert's Hessian is built from the calibration tokens
the router sends to it (or, with `route_all`, from every token: statistics only, the block's output still
follows the router), for `gate_up_proj` from the hidden states entering the experts and for `down_proj` from
the gated intermediate activation computed with the already-solved `gate_up_proj` of that expert. An expert that
received fewer tokens than `min_tokens` is quantized round-to-nearest instead, with a warning naming it: GPTQ on
a handful of tokens would overfit them, and on none it has nothing to solve; RTN never gives NaN or zero scales.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from qat.modules.experts import FakeQuantExperts
from qat.observers import build_observer
from qat.primitives import choose_qparams
from qat.ptq.distributed import Ranks, spread
from qat.ptq.gptq import check_spec, gptq_quantize
from qat.ptq.stats import InputStats


def block_experts(module: nn.Module) -> dict[str, FakeQuantExperts]:
    """FakeQuantExperts modules with weight quantizers inside `module`, by name relative to it."""
    return {n: m for n, m in module.named_modules() if isinstance(m, FakeQuantExperts) and len(m.weight_quantizers)}


def rtn_qparams(experts: FakeQuantExperts, name: str, observer: str | None = None,
                observer_args: dict[str, Any] | None = None):
    """Round-to-nearest (scale, zero-point) of expert weight `name` on its 2-D view (every expert at once)."""
    quantizer = experts.weight_quantizers[name]
    spec = quantizer.spec
    source = "recipe" if observer is None else "method"  # the warnings' hints name the route that applies
    if observer is not None:
        spec = spec.replace(observer=observer, observer_args=dict(observer_args or {}))
    lo, hi = build_observer(spec, source).range_of(experts.rows(name).detach())
    return choose_qparams(lo, hi, spec)


@torch.no_grad()
def pin_rtn_experts(experts: FakeQuantExperts, observer: str | None = None,
                    observer_args: dict[str, Any] | None = None) -> None:
    """Pin round-to-nearest qparams on every expert weight of `experts` (one scale set per expert).

    Example:
        >>> pin_rtn_experts(model.model.layers[0].mlp.experts)
    """
    for name, quantizer in experts.weight_quantizers.items():
        quantizer.set_qparams(*rtn_qparams(experts, name, observer, observer_args))


def _routed_rows(hidden: torch.Tensor, top_k_index: torch.Tensor, n_experts: int, route_all: bool):
    """(expert, rows of `hidden` routed to it) for every expert."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if route_all:
        return [(e, hidden) for e in range(n_experts)]
    index = top_k_index.reshape(hidden.shape[0], -1)
    return [(e, hidden[(index == e).any(-1)]) for e in range(n_experts)]


def _gated(experts: FakeQuantExperts, gate_up: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The intermediate activation an expert feeds its down_proj for input `rows`, given its current (quantized)
    `gate_up` [2I, H]: what transformers' experts implementations compute between the two matmuls."""
    proj = rows.to(gate_up.dtype) @ gate_up.t()
    template = experts.float_template
    if hasattr(template, "_apply_gate"):
        return template._apply_gate(proj)
    gate, up = proj.chunk(2, dim=-1)
    return template.act_fn(gate) * up


@contextmanager
def record_expert_inputs(experts: dict[str, FakeQuantExperts], weight: str, route_all: bool = False,
                         magnitudes: bool = False, keep: bool = False) -> Iterator[dict[str, list[InputStats]]]:
    """While the block runs, accumulate per-expert input statistics of expert weight `weight` ("gate_up_proj":
    the routed hidden states; "down_proj": the gated activation through the current gate_up_proj); the Gram
    matrix always, mean / max |x| per channel with `magnitudes` (AWQ). The sums are made batch by batch
    (`InputStats(per_batch=True)`, the order distributed PTQ keeps); with `keep` each batch's are kept apart for
    `qat.ptq.distributed` to combine.

    Yields:
        {experts name: [InputStats of expert 0, 1, ...]}; `n_tokens` of each is the tokens routed to it.
    """
    stats = {}
    handles = []
    for n, m in experts.items():
        width = m.shapes[weight][-1]
        device = getattr(m, weight).device
        stats[n] = [InputStats(width, True, device, magnitudes=magnitudes, per_batch=True) for _ in range(m.num_experts)]
        for st in stats[n] if keep else ():
            st.keep_batches()
        handles.append(m.register_forward_pre_hook(_expert_hook(m, stats[n], weight, route_all)))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _expert_hook(module: FakeQuantExperts, stats: list[InputStats], weight: str, route_all: bool) -> Callable:
    @torch.no_grad()
    def hook(mod, args):
        hidden, top_k_index = args[0], args[1]
        gate_up = module.quantized("gate_up_proj") if weight == "down_proj" else None
        for e, rows in _routed_rows(hidden, top_k_index, module.num_experts, route_all):
            if rows.shape[0]:
                stats[e].update(rows if gate_up is None else _gated(module, gate_up[e], rows))

    return hook


def check_experts_gptq(experts: dict[str, FakeQuantExperts], actorder: bool, static_groups: bool) -> list[str]:
    """What stops expert-aware GPTQ on these experts, one message per problem."""
    errors = []
    for n, m in experts.items():
        if m.transposed:
            errors.append(f"{n}: GPTQ on transposed expert weights ({type(m.float_template).__name__}) is not supported")
        for w, q in m.weight_quantizers.items():
            try:
                check_spec(q.spec, f"{n}.{w}", grids=True)
            except ValueError as err:
                errors.append(str(err))
            if m.schemes.weight.granularity == "per_tensor":
                errors.append(f"{n}.{w}: GPTQ solves per_channel / per_group expert weights, not one scale per "
                              "expert (per_tensor); use rtn")
            if actorder and not static_groups and q.spec.granularity == "per_group":
                errors.append(f"{n}.{w}: actorder with dynamic groups records a g_idx per expert, which the fused "
                              "experts cannot hold; set static_groups=true")
    return errors


@torch.no_grad()
def solve_experts_weight(name: str, experts: FakeQuantExperts, weight: str, stats: list[InputStats], cfg,
                         min_tokens: int, ranks: Ranks | None = None) -> list[int]:
    """GPTQ each expert of expert weight `weight` on its own Hessian; experts with fewer than `min_tokens` tokens
    keep round-to-nearest (a warning names them). Sets the weight and pins the qparams of all experts at once.
    With `ranks` (distributed PTQ, the statistics already combined) the experts' solves are spread over the
    processes and every process sets all of them.

    Returns:
        the tokens each expert saw.
    """
    quantizer = experts.weight_quantizers[weight]
    rows = experts.rows(weight).detach()
    n_exp = experts.num_experts
    per = rows.shape[0] // n_exp
    rtn_scale, rtn_zero = rtn_qparams(experts, weight)
    tokens = [st.n_tokens for st in stats]
    usable = [e for e, st in enumerate(stats) if st.n_tokens >= max(min_tokens, 1) and bool(torch.diag(st.gram).any())]

    def solve(i: int):
        e = usable[i]
        res = gptq_quantize(rows[e * per:(e + 1) * per], stats[e].hessian(), quantizer.spec, cfg.blocksize,
                            cfg.percdamp, cfg.actorder, cfg.static_groups, name=f"{name}.{weight}[expert {e}]")
        return res.weight, res.scale, res.zero_point

    solved = dict(zip(usable, spread(ranks, [rows[:per].numel()] * len(usable), solve)))
    new_rows, scales, zeros, fallback = rows.clone(), [], [], []
    for e in range(n_exp):
        sl = slice(e * per, (e + 1) * per)
        if e not in solved:
            fallback.append(f"{e} ({tokens[e]} tokens)")
            scales.append(rtn_scale[sl])
            zeros.append(None if rtn_zero is None else rtn_zero[sl])
            continue
        w, scale, zero = solved[e]
        new_rows[sl] = w.to(rows.dtype)
        scales.append(scale)
        zeros.append(zero)
    if fallback:
        warnings.warn(f"{name}.{weight}: expert(s) {', '.join(fallback)} received fewer than min_expert_tokens="
                      f"{min_tokens} calibration tokens; quantized round-to-nearest instead of GPTQ (more calibration "
                      "data, or route_all_experts=true, gives them GPTQ)", RuntimeWarning, stacklevel=2)
    getattr(experts, weight).copy_(new_rows.reshape(experts.shapes[weight]))
    zero = None if rtn_zero is None else torch.cat(zeros)
    quantizer.set_qparams(torch.cat(scales), zero)
    return tokens


def count_expert_tokens(experts: dict[str, FakeQuantExperts], run: Callable[[], Any]) -> dict[str, list[int]]:
    """Tokens routed to each expert of `experts` while `run()` executes: {name: [count per expert]}."""
    for m in experts.values():
        m.count_tokens, m.tokens_per_expert = True, None
    try:
        run()
    finally:
        for m in experts.values():
            m.count_tokens = False
    return {n: ([0] * m.num_experts if m.tokens_per_expert is None else m.tokens_per_expert.tolist())
            for n, m in experts.items()}
