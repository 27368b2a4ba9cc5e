"""Qwen2 (`Qwen2ForCausalLM`): Llama's block with biased q/k/v, GGUF architecture "qwen2".

llama.cpp's converter (`Qwen2Model`) writes the tensors as they are: no q/k row permutation (llama.cpp runs
Qwen's rope in the Hugging Face half-split layout), and the biases under the same names (`blk.N.attn_q.bias`).
"""
from __future__ import annotations

from typing import Any

import gguf

from qat.arch.base import ArchAdapter, register_arch
from qat.arch.llama import LlamaAdapter
from qat.errors import ConfigError


@register_arch
class Qwen2Adapter(ArchAdapter):
    """Qwen2 decoder layers: Llama's names and mappings (v_proj's bias folds with its rows), no q/k permutation."""

    model_types = ("qwen2",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2
    config_class = "Qwen2Config"
    model_class = "Qwen2ForCausalLM"
    mappings = LlamaAdapter.mappings
    smooth_mappings = LlamaAdapter.smooth_mappings

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        # llama.cpp's qwen2 graph has no sliding-window attention: such a file would attend to the whole context
        if getattr(config, "use_sliding_window", False) and "sliding_attention" in (config.layer_types or ()):
            raise ConfigError(f"GGUF export of {config.model_type}: use_sliding_window=True (layer_types has "
                             "sliding_attention layers), which llama.cpp's qwen2 architecture does not run; "
                             "set use_sliding_window=False")
