"""R4: a Hadamard on the input of down_proj: online on the activations (a pre-hook, before its input quantizer)
and offline on the weight's columns, so (x H)(W H)^T = x W^T. Families whose MLP has no down_proj Linear (fused
experts) are refused."""
from __future__ import annotations

import torch
from torch import nn

from qat.arch import find_arch, get_arch
from qat.modules.hadamard import hadamard, split_size
from qat.modules.rotation import attach_input_rotation
from qat.transform.rotations.base import RotationConfig, register_rotation, rotate_columns


def _check(model: nn.Module, config: RotationConfig, has_kv: bool) -> list[str]:
    adapter = find_arch(model)
    if adapter is None or adapter.down_proj is None:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        return [f"rotations.r4: {kind!r} has no down_proj Linear to rotate (fused experts or no adapter)"]
    _, blocks = adapter.blocks(model)
    try:
        split_size(blocks[0].get_submodule(adapter.down_proj).in_features)
    except (ValueError, AttributeError) as err:
        return [f"rotations.r4: {err}"]
    return []


@register_rotation("r4", _check)
@torch.no_grad()
def rotate_down_proj(model: nn.Module, config: RotationConfig) -> None:
    """Rotate every down_proj's weight columns by H and attach the online H on its input."""
    adapter = get_arch(model)
    _, blocks = adapter.blocks(model)
    for block in blocks:
        down = block.get_submodule(adapter.down_proj)
        rotate_columns(down.weight, hadamard(down.in_features))
        attach_input_rotation(down, down.in_features)
