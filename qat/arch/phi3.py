"""Phi-3 (`Phi3ForCausalLM`): fused q/k/v (`qkv_proj`) and gate/up (`gate_up_proj`) linears, GGUF architecture
"phi3".

llama.cpp's converter (`Phi3MiniModel`) writes the fused tensors as they are (`blk.N.attn_qkv`, and
`blk.N.ffn_up` holding gate then up, which llama.cpp's fused SwiGLU splits in halves as transformers does), no
q/k permutation, and its own metadata: the rope dimension count from partial_rotary_factor, the original
context length, and the sliding window (0 when there is none).
"""
from __future__ import annotations

from typing import Any, Callable

import gguf

from qat.arch.base import ArchAdapter, Mapping, register_arch, rope_parameters


def _rope_dims(config: Any) -> int:
    factor = rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return int((factor or 1.0) * config.hidden_size) // config.num_attention_heads


@register_arch
class Phi3Adapter(ArchAdapter):
    """Phi-3 decoder layers: the norms scale into the fused linears (v -> o and up -> down are rows of fused
    outputs, so they are not folded)."""

    model_types = ("phi3",)
    gguf_arch = gguf.MODEL_ARCH.PHI3
    config_class = "Phi3Config"
    model_class = "Phi3ForCausalLM"
    mappings = (Mapping("input_layernorm", ("self_attn.qkv_proj",)),
                Mapping("post_attention_layernorm", ("mlp.gate_up_proj",)))
    smooth_mappings = mappings
    value_proj = "self_attn.qkv_proj"  # rows: q (heads * d), k (kv_heads * d), then v

    def value_rows(self, config: Any) -> int:
        head_dim = config.hidden_size // config.num_attention_heads
        return (config.num_attention_heads + config.num_key_value_heads) * head_dim
    # longrope (Phi-3 128k) needs llama.cpp's rope_factors_long / _short tensors, which qat does not write
    rope_types = ("default",)

    def write_metadata(self, writer: gguf.GGUFWriter, config: Any) -> None:
        """llama.cpp's `Phi3MiniModel.set_gguf_parameters`, then vocab_size."""
        rope = rope_parameters(config)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_rope_scaling_orig_ctx_len(int(getattr(config, "original_max_position_embeddings", None)
                                                 or config.max_position_embeddings))
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(_rope_dims(config))
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
        writer.add_vocab_size(config.vocab_size)

    def config_kwargs(self, field: Callable[[str, Any], Any], tensor_names: set[str]) -> dict[str, Any]:
        kw = super().config_kwargs(field, tensor_names)
        k = lambda key, default=None: field(f"{self.gguf_arch_name}.{key}", default)  # noqa: E731
        head_dim = kw["hidden_size"] // kw["num_attention_heads"]
        kw.pop("head_dim")  # Phi3Config derives it
        rope_dims = int(k("rope.dimension_count", head_dim))
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta"),
                                 "partial_rotary_factor": rope_dims / head_dim}
        kw["original_max_position_embeddings"] = int(k("rope.scaling.original_context_length",
                                                      kw["max_position_embeddings"]))
        kw["sliding_window"] = int(k("attention.sliding_window", 0)) or None
        kw["pad_token_id"] = field("tokenizer.ggml.padding_token_id", None)
        return kw
