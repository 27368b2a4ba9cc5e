"""AWQ through fused experts: activation-aware scales and clipping for every expert, from the tokens routed to it.

Two kinds of architecture mappings reach the experts (`qat.arch.moe.MoEAdapter.mappings`):

- norm -> experts (`post_attention_layernorm -> mlp.gate, mlp.experts.gate_up_proj`): the norm feeds the router
  and every expert, so one scale s [H] is shared by all of them and folded into the norm; the router's columns
  are multiplied by s too (it stays float: its logits are unchanged). s is searched as AWQ's grid over
  mean|x|^r, the error being the sum over experts of each expert's output error on the tokens routed to it
  (its own input Gram matrix): experts that saw more tokens weigh more, an expert that saw none adds nothing.
- up -> down inside each expert (`mlp.experts.gate_up_proj -> mlp.experts.down_proj`): the gated activation
  act(gate) * up is linear in the up rows, so each expert e gets its own scale s_e [I], searched on its own
  statistics and folded into its up rows (divided) and its down_proj columns (multiplied).

Then each expert's clipping ratio is searched per (row, group) on its own Gram matrix, and the qparams of all
experts are pinned at once. An expert routed fewer than `min_tokens` calibration tokens keeps scale 1 in its
own mapping and round-to-nearest qparams (a warning names it): never NaN, never a zero scale.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from qat.arch import Mapping
from qat.modules.experts import FakeQuantExperts
from qat.ptq.awq import search_clip, search_scale
from qat.ptq.distributed import Ranks, spread
from qat.ptq.experts import rtn_qparams
from qat.ptq.fold import out_width
from qat.ptq.stats import InputStats

log = logging.getLogger(__name__)

GATE_UP, DOWN = "gate_up_proj", "down_proj"


@dataclass
class ExpertMapping:
    """A mapping that scales fused expert weights: `kind` "norm" (prev: the norm; also: float consumers such as
    the router) or "up" (prev: the experts' own up rows)."""

    kind: str
    experts_name: str
    experts: FakeQuantExperts
    prev: nn.Module | None = None
    also: tuple[nn.Module, ...] = ()
    offset: float = 0.0


def _split(ref: str) -> tuple[str, str]:
    module, _, weight = ref.rpartition(".")
    return module, weight


def expert_mappings(block: nn.Module, mappings: list[Mapping], method: str) -> list[ExpertMapping]:
    """The mappings of `block` that scale its fused experts (consumers named `<experts>.gate_up_proj` /
    `<experts>.down_proj`); mappings that do not apply are skipped with a debug log, as for linears."""
    modules = dict(block.named_modules())
    out = []
    for mapping in mappings:
        refs = [_split(c) for c in mapping.linears]
        fused = [(m, w) for m, w in refs if isinstance(modules.get(m), FakeQuantExperts)]
        if not fused:
            continue
        found = _resolve(modules, mapping, refs, fused)
        if found is None:
            log.debug("%s: mapping %s -> %s does not apply to the experts", method, mapping.prev, mapping.linears)
            continue
        out.append(found)
    return out


def _resolve(modules: dict, mapping: Mapping, refs, fused) -> ExpertMapping | None:
    (name, weight), others = fused[0], [r for r in refs if r not in fused]
    experts = modules[name]
    if len(fused) != 1 or experts.transposed or weight not in experts.weight_quantizers:
        return None
    if weight == DOWN and mapping.prev == f"{name}.{GATE_UP}" and not others and GATE_UP in experts.shapes:
        return ExpertMapping("up", name, experts)
    prev = modules.get(mapping.prev)
    if weight != GATE_UP or prev is None or out_width(prev) != experts.shapes[GATE_UP][-1]:
        return None
    also = []
    for m, w in others:  # float consumers of the same input: the router (a quantized one would need its own search)
        module = modules.get(f"{m}.{w}" if m else w)
        weight_ = getattr(module, "weight", None)
        if getattr(module, "weight_quantizer", None) is not None or weight_ is None or weight_.shape[-1] != out_width(prev):
            return None
        also.append(module)
    return ExpertMapping("norm", name, experts, prev, tuple(also), mapping.offset)


def _stats_usable(st: InputStats, min_tokens: int) -> bool:
    return st.n_tokens >= max(min_tokens, 1) and bool(torch.diag(st.gram).any())


def _per_expert(w: torch.Tensor) -> list[torch.Tensor]:
    return [w[e] for e in range(w.shape[0])]


@torch.no_grad()
def scale_norm_experts(m: ExpertMapping, stats: list[InputStats], n_grid: int, duo_scaling: bool,
                       ranks: Ranks | None = None) -> torch.Tensor:
    """Search the shared input scale of norm -> router + experts and fold it; returns s [H]. With `ranks`
    (distributed PTQ, the statistics already combined) one process searches, every process folds."""
    experts, spec = m.experts, m.experts.weight_quantizers[GATE_UP].spec
    n = sum(st.n_tokens for st in stats)
    x_mean = sum(st.abs_sum for st in stats) / max(n, 1)  # every token counted once per expert it reaches
    weights = _per_expert(experts.gate_up_proj.detach())
    s, err, err_rtn = spread(ranks, [1], lambda _: search_scale(weights, [st.gram for st in stats], x_mean,
                                                                [spec] * len(weights), n_grid, duo_scaling))[0]
    log.debug("awq %s norm -> experts: error %.4g (rtn %.4g)", m.experts_name, err, err_rtn)
    s = s.to(experts.gate_up_proj.device)
    prev = m.prev
    if m.offset:
        prev.weight.copy_((prev.weight + m.offset) / s.to(prev.weight.dtype) - m.offset)
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
    if isinstance(getattr(prev, "bias", None), torch.Tensor):
        prev.bias.div_(s.to(prev.bias.dtype))
    for module in m.also:
        module.weight.mul_(s.to(module.weight.dtype))
    experts.gate_up_proj.mul_(s.to(experts.gate_up_proj.dtype))
    return s


@torch.no_grad()
def scale_up_down(m: ExpertMapping, stats: list[InputStats], n_grid: int, duo_scaling: bool,
                  min_tokens: int, ranks: Ranks | None = None) -> torch.Tensor:
    """Search each expert's up -> down scale on its own gated activations and fold it; returns [E, I] (ones for
    experts with too few tokens). With `ranks` the experts' searches are spread over the processes."""
    experts = m.experts
    spec = experts.weight_quantizers[DOWN].spec
    inter = experts.shapes[DOWN][-1]
    scales = torch.ones(experts.num_experts, inter, device=experts.down_proj.device)
    usable = [e for e, st in enumerate(stats) if _stats_usable(st, min_tokens)]

    def search(i: int):
        e = usable[i]
        return search_scale([experts.down_proj[e].detach()], [stats[e].gram], stats[e].mean_abs(), [spec], n_grid,
                            duo_scaling)

    found = spread(ranks, [experts.down_proj[0].numel()] * len(usable), search)
    for e, (s, err, err_rtn) in zip(usable, found):
        log.debug("awq %s expert %d up -> down: error %.4g (rtn %.4g)", m.experts_name, e, err, err_rtn)
        scales[e] = s.to(scales.device)
    experts.gate_up_proj[:, -inter:].div_(scales.to(experts.gate_up_proj.dtype).unsqueeze(-1))
    experts.down_proj.mul_(scales.to(experts.down_proj.dtype).unsqueeze(1))
    return scales


@torch.no_grad()
def clip_experts(name: str, experts: FakeQuantExperts, weight: str, stats: list[InputStats] | None,
                 in_scale: torch.Tensor | None, clip: bool, clip_grid: int, max_shrink: float, min_tokens: int,
                 ranks: Ranks | None = None) -> None:
    """Pin the qparams of expert weight `weight`: per expert, AWQ's clipping search on its own Gram matrix (divided
    by its input scale), or round-to-nearest for an expert with too few tokens (a warning names them), for
    per_tensor specs, or without `clip`. With `ranks` the experts' searches are spread over the processes."""
    quantizer = experts.weight_quantizers[weight]
    rtn_scale, rtn_zero = rtn_qparams(experts, weight)
    if not clip or stats is None or experts.schemes.weight.granularity == "per_tensor":
        quantizer.set_qparams(rtn_scale, rtn_zero)
        return
    rows = experts.rows(weight).detach()
    per = rows.shape[0] // experts.num_experts
    usable = [e for e, st in enumerate(stats) if _stats_usable(st, min_tokens)]

    def search(i: int):
        e = usable[i]
        gram = stats[e].gram
        if in_scale is not None:
            s = in_scale if in_scale.ndim == 1 else in_scale[e]
            gram = gram / torch.outer(s, s)
        return search_clip(rows[e * per:(e + 1) * per], gram, quantizer.spec, clip_grid, max_shrink)

    found = dict(zip(usable, spread(ranks, [rows[:per].numel()] * len(usable), search)))
    scales, zeros, fallback = [], [], []
    for e, st in enumerate(stats):
        sl = slice(e * per, (e + 1) * per)
        if e not in found:
            fallback.append(f"{e} ({st.n_tokens} tokens)")
            scales.append(rtn_scale[sl])
            zeros.append(None if rtn_zero is None else rtn_zero[sl])
            continue
        scale, zero = found[e]
        scales.append(scale)
        zeros.append(zero)
    if fallback:
        warnings.warn(f"{name}.{weight}: expert(s) {', '.join(fallback)} received fewer than min_expert_tokens="
                      f"{min_tokens} calibration tokens; their clipping is round-to-nearest instead of AWQ's search",
                      RuntimeWarning, stacklevel=2)
    quantizer.set_qparams(torch.cat(scales), None if rtn_zero is None else torch.cat(zeros))
