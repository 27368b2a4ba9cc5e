"""kv_cache: llama_cpp: K and V rotated as llama.cpp's quantized KV cache does (src/llama-kv-cache.cpp and
llama-graph.cpp `build_attn`): queries and keys after RoPE times the normalised Sylvester Hadamard of the
largest power of two >= 64 dividing the head size, values times H_64 before they are stored, and the attention
output times H_64 again (H_64 is its own inverse) before o_proj; only for head sizes that are multiples of 64,
as llama.cpp decides (LLAMA_ATTN_ROT_DISABLE=1 turns it off there: then leave this rotation out)."""
from __future__ import annotations

import logging

from torch import nn

from qat.modules.kv_cache import is_attention
from qat.modules.rotation import KV_ROTATION, KVRotation, llama_cpp_kv_blocks
from qat.transform.rotations.base import RotationConfig, head_dim_of, register_rotation

log = logging.getLogger(__name__)


def _check(model: nn.Module, config: RotationConfig, has_kv: bool) -> list[str]:
    if not has_kv:
        return ["rotations.kv_cache=llama_cpp rotates what the KV cache stores, but the recipe has no kv_cache scheme"]
    return []


@register_rotation("kv_cache", _check)
def rotate_kv_cache(model: nn.Module, config: RotationConfig) -> None:
    """Attach llama.cpp's KVRotation to every attention module whose head size llama.cpp rotates."""
    skipped = []
    for name, module in model.named_modules():
        if not is_attention(module):
            continue
        k_block, v_block = llama_cpp_kv_blocks(head_dim_of(module), head_dim_of(module))
        if k_block or v_block:
            setattr(module, KV_ROTATION, KVRotation(k_block, v_block, source="llama_cpp"))
        else:
            skipped.append(name)
    if skipped:
        log.info("rotations.kv_cache=llama_cpp: head size not a multiple of 64 in %d attention module(s) (%s): "
                 "llama.cpp does not rotate them, nor does qat", len(skipped), skipped[0])
