"""Llama (and the families laid out like it): `LlamaForCausalLM`, GGUF architecture "llama"."""
from __future__ import annotations

from typing import Any, Callable

import gguf
import torch

from qat.arch.base import ARCHS, ArchAdapter, Mapping, register_arch

ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_IN = ("mlp.gate_proj", "mlp.up_proj")


def permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (undoes the Hugging Face rotary half-split); any [O, ...] tensor."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def unpermute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `permute_rows`: GGUF q/k rows back in Hugging Face order."""
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


@register_arch
class LlamaAdapter(ArchAdapter):
    """Llama decoder layers: pre-norm attention with rotary q/k, SwiGLU MLP, RMSNorm (weight * x)."""

    model_types = ("llama",)
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    config_class = "LlamaConfig"
    model_class = "LlamaForCausalLM"
    mappings = (
        Mapping("input_layernorm", ATTN_QKV),
        Mapping("self_attn.v_proj", ("self_attn.o_proj",)),
        Mapping("post_attention_layernorm", MLP_IN),
        Mapping("mlp.up_proj", ("mlp.down_proj",)),
    )
    # the SmoothQuant reference smooths only the norm -> linear pairs
    smooth_mappings = (Mapping("input_layernorm", ATTN_QKV), Mapping("post_attention_layernorm", MLP_IN))
    rope_types = None  # as before the adapters (llama3 rope scaling is not written: see docs/models.md)

    def _heads(self, gguf_name: str, config: Any) -> int | None:
        """The head count whose rows llama.cpp permutes for this tensor (attn_q / attn_k), else None."""
        if not gguf_name.startswith("blk."):
            return None
        return {"attn_q": config.num_attention_heads,
                "attn_k": config.num_key_value_heads}.get(gguf_name.split(".")[-2])

    def to_gguf(self, gguf_name: str, t: torch.Tensor, config: Any) -> torch.Tensor:
        n_head = self._heads(gguf_name, config)
        return permute_rows(t, n_head) if n_head else t

    def from_gguf(self, gguf_name: str, t: torch.Tensor, config: Any) -> torch.Tensor:
        n_head = self._heads(gguf_name, config)
        return unpermute_rows(t, n_head) if n_head else t

    def write_metadata(self, writer: gguf.GGUFWriter, config: Any) -> None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or {}
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(head_dim)
        if head_dim * config.num_attention_heads != config.hidden_size:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)

    def config_from_gguf(self, field: Callable[[str, Any], Any], tensor_names: set[str], where: str = ""):
        if type(self) is LlamaAdapter and field(f"{self.gguf_arch_name}.expert_count", None):
            # llama.cpp writes Mixtral as "llama" with experts: a mixture of experts reads back as Mixtral
            return ARCHS["mixtral"].config_from_gguf(field, tensor_names, where)
        return super().config_from_gguf(field, tensor_names, where)
