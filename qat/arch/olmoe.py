"""OLMoE (`OlmoeForCausalLM`): GGUF architecture "olmoe"; rotary NEOX (no q/k permutation), q/k RMSNorm over
the whole projection, experts of `intermediate_size` (feed_forward_length), top-k weights not renormalised."""
from __future__ import annotations

import gguf

from qat.arch.base import register_arch
from qat.arch.moe import MoEAdapter
from qat.errors import ConfigError


@register_arch
class OlmoeAdapter(MoEAdapter):
    """OLMoE decoder layers: attention with q/k norms, a top-k router over fused experts."""

    model_types = ("olmoe",)
    gguf_arch = gguf.MODEL_ARCH.OLMOE
    config_class = "OlmoeConfig"
    model_class = "OlmoeForCausalLM"
    experts_field = "num_experts"
    expert_size_field = "intermediate_size"
    llama_cpp_norm_topk = False  # olmoe.cpp: build_moe_ffn(..., norm_w = false)

    def write_metadata(self, writer, config) -> None:
        if config.num_key_value_heads != config.num_attention_heads:
            # llama.cpp's olmoe graph sizes attn_k_norm by n_embd: it cannot load grouped-query attention
            raise ConfigError(f"GGUF olmoe: num_key_value_heads={config.num_key_value_heads} differs from "
                             f"num_attention_heads={config.num_attention_heads}; llama.cpp's olmoe architecture "
                             "has no grouped-query attention (its attn_k_norm is n_embd wide)")
        super().write_metadata(writer, config)
