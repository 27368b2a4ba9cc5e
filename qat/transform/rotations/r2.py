"""R2: rotate each attention head's values by one orthogonal [head_dim, head_dim] R, fused into the weights:
the value rows of each head (v_proj, or the v part of Phi-3's fused qkv_proj) by R^T, o_proj's columns of each
head by R. Every query head reading a (grouped) value head sees the same R, so the attention output is
unchanged."""
from __future__ import annotations

import torch
from torch import nn

from qat.arch import find_arch, get_arch
from qat.modules.hadamard import rotation_matrix, split_size
from qat.transform.rotations.base import (RotationConfig, exists, head_dim_of, register_rotation, set_,
                                          weight_and_bias)


def _check(model: nn.Module, config: RotationConfig, has_kv: bool) -> list[str]:
    adapter = find_arch(model)
    if adapter is None:
        return [f"rotations.r2: no architecture adapter for model_type "
                f"{getattr(getattr(model, 'config', None), 'model_type', None)!r} (qat/arch)"]
    _, blocks = adapter.blocks(model)
    missing = [n for n in (adapter.value_proj, adapter.out_proj) if not exists(blocks[0], n)]
    if missing:
        return [f"rotations.r2: block 0 of {model.config.model_type} has no {missing}"]
    if config.r2 != "random_orthogonal":
        try:
            split_size(head_dim_of(blocks[0].get_submodule(adapter.out_proj.rpartition(".")[0])))
        except ValueError as err:
            return [f"rotations.r2: {err}"]
    return []


@register_rotation("r2", _check)
@torch.no_grad()
def rotate_heads(model: nn.Module, config: RotationConfig) -> None:
    """Rotate the values of every head of every block by R of kind `config.r2` (seeded `config.seed + 1`)."""
    adapter = get_arch(model)
    _, blocks = adapter.blocks(model)
    start = adapter.value_rows(model.config)
    kv_heads = model.config.num_key_value_heads
    for block in blocks:
        d = head_dim_of(block.get_submodule(adapter.out_proj.rpartition(".")[0]))
        weight, bias = weight_and_bias(block, adapter.value_proj)
        r = rotation_matrix(config.r2, d, config.seed + 1).to(weight.device)  # built on the CPU
        rows = slice(start, start + kv_heads * d)
        v = weight[rows].double().reshape(kv_heads, d, -1)
        set_(weight[rows], (r.T @ v).reshape(kv_heads * d, -1))
        if bias is not None:
            set_(bias[rows], (bias[rows].double().reshape(kv_heads, d) @ r).reshape(-1))
        out, _ = weight_and_bias(block, adapter.out_proj)
        o = out.double().reshape(out.shape[0], -1, d)
        set_(out, (o @ r).reshape(out.shape))
