"""Mixtral (`MixtralForCausalLM`): llama.cpp's converter writes it as GGUF architecture "llama" (LlamaModel) with
q/k permuted as Llama's and experts merged into ffn_{gate,up,down}_exps; the expert size is feed_forward_length.
A llama GGUF file with `llama.expert_count` reads back as Mixtral (the Llama adapter hands it over)."""
from __future__ import annotations

import gguf

from qat.arch.base import register_arch
from qat.arch.moe import MoEAdapter


@register_arch
class MixtralAdapter(MoEAdapter):
    """Mixtral decoder layers: Llama attention (rotary NORM: q/k permuted), a top-k router over fused experts."""

    model_types = ("mixtral",)
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    config_class = "MixtralConfig"
    model_class = "MixtralForCausalLM"
    experts_field = "num_local_experts"
    expert_size_field = "intermediate_size"
    llama_cpp_norm_topk = True  # llama.cpp's llama graph: build_moe_ffn(..., norm_w = true)
    permute_qk = True
    # Mixtral checkpoints (and vLLM's loader) name the MoE block `block_sparse_moe` and the experts' projections
    # w1 (gate) / w3 (up) / w2 (down); transformers 5 renames them on load (conversion_mapping "mixtral")
    checkpoint_renames = ((".mlp.", ".block_sparse_moe."), (".gate_proj.", ".w1."), (".up_proj.", ".w3."),
                          (".down_proj.", ".w2."))
    reads_gguf = False  # general.architecture = llama: the Llama adapter reads the file and hands MoE ones here
