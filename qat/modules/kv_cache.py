"""KV-cache fake quantization for Hugging Face attention.

Keys and values are quantized where a runtime stores them: after the rotary embedding, as they enter
the attention kernel (the cache update has already happened, so every cached entry passes through the
quantizer). Per-token (per head) dynamic schemes and static per-tensor schemes act elementwise on each
token, so quantizing at read gives exactly what quantizing at store would.

It works through transformers' attention registry: attention modules get `k_quantizer` / `v_quantizer`
and the model's attention implementation becomes "qat_kv_<base>" (e.g. "qat_kv_eager"), which wraps the one
it had before. The name carries the base so that transformers builds the base's attention mask for it: an
unknown name gets no mask at all, which eager attention reads as "attend everywhere" (not causal).
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from qat.modules.quantizer import TensorQuantizer
from qat.modules.rotation import KV_ROTATION
from qat.spec import QuantSpec

ATTN_NAME = "qat_kv"


def is_attention(module: nn.Module) -> bool:
    """A Hugging Face attention module: has k_proj and v_proj and a head_dim."""
    return hasattr(module, "k_proj") and hasattr(module, "v_proj") and hasattr(module, "head_dim")


def _base_attention(module: nn.Module, name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name in (None, "eager"):
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is not None:
            return eager
        name = "sdpa"
    return ALL_ATTENTION_FUNCTIONS[name]


def qat_kv_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Attention with fake-quantized keys and values; the math is the wrapped implementation's. An attention
    module with a `KVRotation` (R3, or llama.cpp's K/V cache rotation) has queries and keys (after RoPE) and
    values rotated before the quantizers, and the output rotated back, where llama.cpp's graph does it."""
    rotation = getattr(module, KV_ROTATION, None)
    if rotation is not None:
        query, key, value = rotation.rotate(query, key, value)
    if getattr(module, "k_quantizer", None) is not None:
        key, value = module.k_quantizer(key), module.v_quantizer(value)
    base = _base_attention(module, getattr(module, "qat_base_attention", None))
    out, weights = base(module, query, key, value, attention_mask, **kwargs)
    if rotation is not None:
        out = rotation.unrotate_output(out)  # [batch, seq, heads, head_dim]
    return out, weights


def _register(base: str) -> str:
    """Register "qat_kv_<base>" (attention and mask) and return the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_NAME, qat_kv_attention)  # the older name, kept loadable
    name = f"{ATTN_NAME}_{base}"
    AttentionInterface.register(name, qat_kv_attention)
    if base in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[base])
    return name


def register_known_bases() -> None:
    """Register "qat_kv_<base>" for every attention transformers knows: an unpickled model names one of them
    in its config, in a process that never ran `attach_kv_quantizers`."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for base in ("eager", *ALL_ATTENTION_FUNCTIONS._global_mapping):
        _register(base)


class KVCacheQuantizer(TensorQuantizer):
    """The TensorQuantizer of keys or values. Unpickling one (torch.load of a whole model, possibly in a fresh
    process) registers the `qat_kv_<base>` attention implementations its model is routed through."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        register_known_bases()


def is_qat_attention(name: str | None) -> bool:
    """True for the attention names qat routes KV-cache quantization through."""
    return isinstance(name, str) and (name == ATTN_NAME or name.startswith(ATTN_NAME + "_"))


def attach_kv_quantizers(model: nn.Module, attention: dict[str, nn.Module], spec: QuantSpec) -> None:
    """Give each attention module key and value quantizers, and route the model through "qat_kv".

    Args:
        model: the (Hugging Face) model; its config's attention implementation is wrapped.
        attention: name -> attention module to quantize.
        spec: the KV-cache scheme (per_token dynamic, or static per_tensor).
    Raises:
        ValueError: the model has no Hugging Face config to route attention through.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError("kv_cache quantization needs a Hugging Face model (with .config and attention registry)")
    base = config._attn_implementation
    if is_qat_attention(base):
        base = next((m.qat_base_attention for m in model.modules() if hasattr(m, "qat_base_attention")), "sdpa")
    base = base or "sdpa"
    name = _register(base)
    for module in attention.values():
        example = torch.zeros(1, module.head_dim, device=module.k_proj.weight.device)
        module.k_quantizer = KVCacheQuantizer(spec, "kv_cache", example)
        module.v_quantizer = KVCacheQuantizer(spec, "kv_cache", example)
        module.qat_base_attention = base
    model.set_attn_implementation(name)


def set_base_attention(model: nn.Module, base: str) -> None:
    """Make a KV-quantized model's attention wrap `base` (e.g. "eager", for a double backward), keeping its
    quantizers and rotations: the model is routed through "qat_kv_<base>".

    Example:
        >>> set_base_attention(qat.prepare(model, qat.load_recipe("w4a8_kv8")), "eager")
    """
    name = _register(base)
    for module in model.modules():
        if hasattr(module, "qat_base_attention"):
            module.qat_base_attention = base
    model.set_attn_implementation(name)


def base_attention(model: nn.Module) -> str | None:
    """The attention a KV-quantized model's "qat_kv_<base>" wraps (None for a model with no KV quantizers)."""
    return next((m.qat_base_attention for m in model.modules() if hasattr(m, "qat_base_attention")), None)
