"""Qwen3-MoE (`Qwen3MoeForCausalLM`): GGUF architecture "qwen3moe"; rotary NEOX (no q/k permutation), per-head
q/k RMSNorm, routed experts of `moe_intermediate_size` written with `expert_feed_forward_length` (llama.cpp's
converter: Qwen3MoeModel(Qwen2MoeModel))."""
from __future__ import annotations

import gguf

from qat.arch.base import register_arch
from qat.arch.moe import MoEAdapter


@register_arch
class Qwen3MoeAdapter(MoEAdapter):
    """Qwen3-MoE decoder layers: attention with q/k norms, a top-k router over fused experts."""

    model_types = ("qwen3_moe",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE
    config_class = "Qwen3MoeConfig"
    model_class = "Qwen3MoeForCausalLM"
    experts_field = "num_experts"
    expert_size_field = "moe_intermediate_size"
    expert_ff_metadata = True
    llama_cpp_norm_topk = True  # qwen3moe.cpp: build_moe_ffn(..., norm_w = true)
    tokenizer_pre = None

    def structure_refusal(self, config):
        """transformers routes layer i through experts unless i is in mlp_only_layers or (i + 1) is off
        decoder_sparse_step; the released Qwen3-MoE models route every layer, and so do llama.cpp's graph and qat's
        mappings. A model with dense layers mixed in is refused for what assumes it (GGUF, AWQ, rotations)."""
        n = int(config.num_hidden_layers)
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        dense = [i for i in range(n) if i in set(getattr(config, "mlp_only_layers", None) or []) or (i + 1) % step]
        if not dense:
            return None
        return (f"layers {dense[:8]}{' ...' if len(dense) > 8 else ''} have a dense MLP (config mlp_only_layers="
                f"{list(getattr(config, 'mlp_only_layers', None) or [])}, decoder_sparse_step={step}), and qat's "
                "qwen3_moe adapter (GGUF layout, AWQ / rotation mappings) assumes every layer routes through experts, "
                "as the released Qwen3-MoE models and llama.cpp's qwen3moe graph do; fake quant, QAT, RTN and GPTQ "
                "work on it")

    def config_from_gguf(self, field, tensor_names, where=""):
        config = super().config_from_gguf(field, tensor_names, where)
        config.decoder_sparse_step, config.mlp_only_layers = 1, []  # every layer routed, as llama.cpp builds it
        return config
