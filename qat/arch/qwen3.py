"""Qwen3 (`Qwen3ForCausalLM`): Qwen2's layout without biases, RMSNorm on q and k per head, GGUF architecture
"qwen3" (`blk.N.attn_q_norm` / `attn_k_norm`; llama.cpp's `Qwen3Model` converter writes them unchanged)."""
from __future__ import annotations

import gguf

from qat.arch.base import register_arch
from qat.arch.qwen2 import Qwen2Adapter


@register_arch
class Qwen3Adapter(Qwen2Adapter):
    """Qwen3 decoder layers: Llama's mappings (q/k norms act per head after q/k_proj, so they fold nothing)."""

    model_types = ("qwen3",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3
    config_class = "Qwen3Config"
    model_class = "Qwen3ForCausalLM"
