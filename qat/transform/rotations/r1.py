"""R1: rotate the residual stream by one orthogonal [hidden, hidden] Q, fused into the weights.

RMSNorm(x Q) = RMSNorm(x) Q only when the norm's weight is all ones, so each norm's weight (plus the family's
offset: Gemma's 1 + w) is first folded into the columns of the weights reading its output, and set to the
identity. Then the embeddings, the readers' columns and lm_head are multiplied by Q and the writers' rows
(o_proj, down_proj, the experts' down_proj) by Q^T. Tied embeddings are untied (lm_head gets the final norm
folded in, the embeddings do not).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from qat.arch import Mapping, find_arch, get_arch
from qat.modules.hadamard import rotation_matrix, split_size
from qat.transform.rotations.base import (RotationConfig, exists, register_rotation, rotate_columns, rotate_rows,
                                          set_, weight_and_bias)

log = logging.getLogger(__name__)


def _check(model: nn.Module, config: RotationConfig, has_kv: bool) -> list[str]:
    adapter = find_arch(model)
    if adapter is None:
        return [f"rotations.r1: no architecture adapter for model_type "
                f"{getattr(getattr(model, 'config', None), 'model_type', None)!r} (qat/arch)"]
    if why := adapter.residual_rotation_refusal or adapter.structure_refusal(model.config):
        return [f"rotations.r1 on {model.config.model_type}: {why}"]
    errors = []
    hidden = model.config.hidden_size
    if config.r1 != "random_orthogonal":
        try:
            split_size(hidden)
        except ValueError as err:
            errors.append(f"rotations.r1: {err}")
    _, blocks = adapter.blocks(model)
    names = [n for m in adapter.residual_reads for n in (m.prev, *m.linears)] + list(adapter.residual_writes)
    missing = [n for n in names if not exists(blocks[0], n)]
    if missing:
        errors.append(f"rotations.r1: block 0 of {model.config.model_type} has no {missing}")
    return errors


@torch.no_grad()
def _fold(norm: nn.Module, offset: float, readers: list[torch.Tensor]) -> None:
    """Scale the readers' columns by the norm's effective weight and make the norm the identity scale."""
    gain = norm.weight.double() + offset
    for weight in readers:
        set_(weight, weight.double() * gain)
    set_(norm.weight, torch.full_like(gain, 1.0 - offset))


@torch.no_grad()
def untie(model: nn.Module) -> None:
    """Give lm_head its own copy of the tied embedding table (config.tie_word_embeddings = False)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embed.weight:
        return
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text.tie_word_embeddings = False
    log.info("rotations.r1: lm_head untied from the embeddings (the final norm is folded into lm_head only)")


@torch.no_grad()
def fold_norms(model: nn.Module) -> None:
    """Untie the embeddings, then fold every RMSNorm that feeds the residual readers (and the final norm into
    lm_head) into the weights reading it: the norms become identity scales, the function is unchanged."""
    adapter = get_arch(model)
    untie(model)
    _, blocks = adapter.blocks(model)
    final = Mapping(adapter.final_norm, ())
    _fold(model.get_submodule(final.prev), adapter.residual_reads[0].offset, [model.get_output_embeddings().weight])
    for block in blocks:
        for mapping in adapter.residual_reads:
            _fold(block.get_submodule(mapping.prev), mapping.offset,
                  [weight_and_bias(block, n)[0] for n in mapping.linears])


@register_rotation("r1", _check)
@torch.no_grad()
def rotate_residual(model: nn.Module, config: RotationConfig) -> None:
    """Fold every RMSNorm into its readers, then rotate the residual stream by Q of kind `config.r1`."""
    adapter = get_arch(model)
    fold_norms(model)
    # on the weights' device once: rotate_columns / rotate_rows would otherwise copy it for every weight
    q = rotation_matrix(config.r1, model.config.hidden_size, config.seed).to(model.get_input_embeddings().weight.device)
    _, blocks = adapter.blocks(model)
    head = model.get_output_embeddings()
    for block in blocks:
        for mapping in adapter.residual_reads:
            for name in mapping.linears:
                rotate_columns(weight_and_bias(block, name)[0], q)
        for name in adapter.residual_writes:
            rotate_rows(*weight_and_bias(block, name), q)
    embed = model.get_input_embeddings()
    rotate_columns(embed.weight, q)
    rotate_columns(head.weight, q)
