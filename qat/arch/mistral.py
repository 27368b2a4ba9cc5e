"""Mistral (`MistralForCausalLM`): Llama's layout, so llama.cpp's converter writes it as GGUF architecture "llama"
(its `LlamaModel` is registered for MistralForCausalLM too) and a GGUF file of it reads back as a Llama."""
from __future__ import annotations

from qat.arch.base import register_arch
from qat.arch.llama import LlamaAdapter


@register_arch
class MistralAdapter(LlamaAdapter):
    """Mistral decoder layers: Llama's names, mappings, q/k permutation and metadata."""

    model_types = ("mistral",)
    config_class = "MistralConfig"
    model_class = "MistralForCausalLM"
    reads_gguf = False  # its files say general.architecture = llama: the Llama adapter reads them
