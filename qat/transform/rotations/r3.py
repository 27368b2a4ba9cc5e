"""R3: a Hadamard of the head size on queries and keys after RoPE, online, before the KV-cache quantizer
(QuaRot's key rotation; Q K^T is unchanged). It needs a KV-cache scheme: without one nothing is quantized there."""
from __future__ import annotations

from torch import nn

from qat.modules.hadamard import split_size
from qat.modules.kv_cache import is_attention
from qat.modules.rotation import KV_ROTATION, KVRotation
from qat.transform.rotations.base import RotationConfig, head_dim_of, register_rotation


def _check(model: nn.Module, config: RotationConfig, has_kv: bool) -> list[str]:
    attention = [m for m in model.modules() if is_attention(m)]
    if not has_kv:
        return ["rotations.r3 rotates keys for the KV-cache quantizer, but the recipe has no kv_cache scheme"]
    if not attention:
        return ["rotations.r3: the model has no Hugging Face attention module"]
    try:
        split_size(head_dim_of(attention[0]))
    except ValueError as err:
        return [f"rotations.r3: {err}"]
    return []


@register_rotation("r3", _check)
def rotate_keys(model: nn.Module, config: RotationConfig) -> None:
    """Attach a KVRotation(k_block=head_dim) to every attention module."""
    for module in model.modules():
        if is_attention(module):
            setattr(module, KV_ROTATION, KVRotation(head_dim_of(module), 0, source="r3"))
