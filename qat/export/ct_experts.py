"""Fused MoE experts in compressed-tensors: writer and reader of the per-expert layout.

Fused experts (`QuantizedExperts`, transformers' `mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj`) are written
in the layout vLLM and llm-compressor use: `<experts>.{i}.gate_proj` / `.up_proj` (the two row halves of
gate_up_proj) / `.down_proj`, each a `pack-quantized` linear (`qat.export.compressed_int`; a per_tensor scheme: one
scale per expert and projection). Int schemes only: the float formats are written for Linear layers.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from qat.errors import ConfigError
from qat.export.compressed_fp import FP8_WEIGHTS, FP_FORMATS, fp_format
from qat.export.compressed_int import check_int_spec, int_quantized_weight
from qat.modules.experts import QuantizedExperts, expert_weight_names
from qat.spec import QuantSpec, TensorSchemes

EXPERT_PROJ = re.compile(r"^(?P<experts>.+)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")
EXPERT_WEIGHTS = "int weights only (per_tensor / per_channel / per_group on the uniform grid)"


def check_expert_spec(name: str, spec: QuantSpec) -> None:
    """Fused MoE experts are written as pack-quantized int groups only; the float formats are Linear-only.

    Raises:
        ConfigError: a float or microscaling weight scheme on experts, or an int one `pack-quantized` cannot hold.
    """
    if spec.is_float or fp_format(spec) is not None:
        raise ConfigError(f"compressed-tensors: {name} has {spec.describe()} on fused MoE experts; experts take "
                          f"{EXPERT_WEIGHTS}, while {FP8_WEIGHTS} and {' / '.join(FP_FORMATS)} weights are written "
                          "for Linear layers only (give the experts an int scheme, e.g. an override with targets: "
                          "[Experts], or ignore them)")
    check_int_spec(name, spec)


class _ExpertSlice:
    """One expert's gate / up / down projection, cut from the unpacked (codes, scale, zero-point) of an expert
    weight's 2-D view (`qat.modules.experts.to_rows`), with the QuantizedWeight methods `int_linear_tensors` reads."""

    def __init__(self, unpacked, spec: QuantSpec, n_experts: int, e: int, rows: slice, shape) -> None:
        self.unpacked, self.spec, self.n, self.e, self.rows, self.shape = unpacked, spec, n_experts, e, rows, tuple(shape)

    def _cut(self, t: torch.Tensor | None, codes: bool = False) -> torch.Tensor | None:
        if t is None:
            return None
        if self.spec.granularity == "per_tensor":  # the view is [E, O * I] with one scale per expert
            return t[self.e].reshape(-1, self.shape[1])[self.rows] if codes else t[self.e].reshape(())
        per = t.shape[0] // self.n
        return t[self.e * per:(self.e + 1) * per][self.rows]

    def codes(self) -> torch.Tensor:
        return self._cut(self.unpacked()[0], codes=True)

    def qparams(self):
        _, scale, zp = self.unpacked()
        return self._cut(scale), self._cut(zp)

    def group_index(self):
        return None


def expert_linears(name: str, module: nn.Module, qw_of) -> dict[str, _ExpertSlice]:
    """{`<experts>.{i}.<proj>`: its slice} for fused experts `module` called `name`; `qw_of(weight)` gives the
    QuantizedWeight of an expert weight (unpacked once, on first use)."""
    out = {}
    spec = module.schemes.weight
    for weight in weight_names(module):
        n_exp, rows, cols = module.shapes[weight]
        unpacked = _once(lambda w=weight: (lambda qw: (qw.codes(), *qw.qparams()))(qw_of(w)))
        halves = ([("gate_proj", slice(0, rows // 2)), ("up_proj", slice(rows // 2, rows))] if weight == "gate_up_proj"
                  else [(weight, slice(0, rows))])
        for e in range(n_exp):
            for proj, sl in halves:
                out[f"{name}.{e}.{proj}"] = _ExpertSlice(unpacked, spec, n_exp, e, sl, (sl.stop - sl.start, cols))
    return out


def _once(fn):
    cache = []
    return lambda: cache[0] if cache else (cache.append(fn()) or cache[0])


def weight_names(module: nn.Module) -> list[str]:
    """The expert weights a fake-quant or converted experts module quantizes (`gate_up_proj`, `down_proj`, ...)."""
    held = getattr(module, "qweights", None) or getattr(module, "weight_quantizers", None)
    return list(held)


def load_experts(t: dict, name: str, old: nn.Module, w_args: dict) -> QuantizedExperts:
    """QuantizedExperts for the fused experts `old` from the per-expert `<name>.{i}.<proj>` tensors."""
    parts = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
    params = dict(old.named_parameters(recurse=False))
    pieces = {}
    for w, projs in parts.items():
        if w in expert_weight_names(old):
            rows, cols = params[w].shape[1] // len(projs), params[w].shape[2]
            pieces[w] = [[int_quantized_weight(t, f"{name}.{e}.{p}", w_args, rows, cols) for p in projs]
                         for e in range(old.num_experts)]
    spec = next(iter(pieces.values()))[0][0].spec
    module = QuantizedExperts.empty(old, TensorSchemes(weight=spec), next(iter(params.values())).dtype)
    for w, per_expert in pieces.items():
        codes = torch.cat([torch.cat([q.codes() for q in projs]) for projs in per_expert])
        qparams = [[q.qparams() for q in projs] for projs in per_expert]
        if spec.granularity == "per_tensor":  # one scale per expert: the [E, O * I] view, per_channel rows
            codes = codes.reshape(old.num_experts, -1)
            scale = torch.stack([qp[0][0].reshape(1) for qp in qparams])
            zp = None if spec.symmetric else torch.stack([qp[0][1].reshape(1) for qp in qparams])
        else:
            scale = torch.cat([qp[0] for projs in qparams for qp in projs])
            zp = None if spec.symmetric else torch.cat([qp[1] for projs in qparams for qp in projs])
        module.qweights[w].set_codes(codes, scale, zp)
    return module
