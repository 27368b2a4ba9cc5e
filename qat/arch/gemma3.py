"""Gemma 3 text (`Gemma3ForCausalLM`, model_type gemma3_text): GGUF architecture "gemma3".

What llama.cpp's converter (`Gemma3Model`) and runtime do, and this adapter mirrors:
- every RMSNorm computes x * (1 + weight) in transformers; the converter stores 1 + weight (all `*norm.weight`,
  q/k norms included) and llama.cpp multiplies by it: `to_gguf` adds 1, `from_gguf` subtracts it (exact for
  the logits: 1 + ((1 + w) - 1) rounds to the same float as 1 + w);
- pre- and post-norms around attention and the MLP (`post_attention_norm`, `ffn_norm` = pre_feedforward,
  `post_ffw_norm`), q/k norms, no q/k permutation, embeddings scaled by sqrt(hidden) (both sides do it);
- sliding-window layers: `attention.sliding_window` and, so that llama.cpp's layer pattern is transformers'
  `layer_types` exactly, `attention.sliding_window_pattern` as one bool per layer; the sliding layers' rope base
  (`rope.freq_base_swa`) and the global layers' (`rope.freq_base`, linear scaling as the converter writes it);
- the attention scale: llama.cpp uses 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B), so
  query_pre_attn_scalar must be that; final logit soft-capping is written when set.
AWQ / SmoothQuant fold through the (1 + weight) norms with `Mapping.offset = 1`.
"""
from __future__ import annotations

from typing import Any, Callable

import gguf
import torch

from qat.arch.base import ArchAdapter, Mapping, register_arch
from qat.arch.llama import ATTN_QKV, MLP_IN
from qat.errors import ConfigError


def _attention_scalar(hidden: int, heads: int, layers: int, head_dim: int) -> int:
    """The query_pre_attn_scalar llama.cpp's gemma3 graph implies (it knows the 62-layer 27B by its depth)."""
    return hidden // heads if layers == 62 else head_dim


@register_arch
class Gemma3Adapter(ArchAdapter):
    """Gemma 3 decoder layers: sandwich norms, q/k norms, (1 + weight) RMSNorms, GELU-tanh gated MLP."""

    model_types = ("gemma3_text",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    config_class = "Gemma3TextConfig"
    model_class = "Gemma3ForCausalLM"
    mappings = (
        Mapping("input_layernorm", ATTN_QKV, offset=1.0),
        Mapping("self_attn.v_proj", ("self_attn.o_proj",)),
        Mapping("pre_feedforward_layernorm", MLP_IN, offset=1.0),
        Mapping("mlp.up_proj", ("mlp.down_proj",)),
    )
    smooth_mappings = (Mapping("input_layernorm", ATTN_QKV, offset=1.0),
                       Mapping("pre_feedforward_layernorm", MLP_IN, offset=1.0))
    residual_rotation_refusal = ("Gemma 3 normalises o_proj's and down_proj's outputs (post_attention_layernorm, "
                                 "post_feedforward_layernorm, elementwise (1 + weight)) before adding them to the "
                                 "residual stream: a residual rotation cannot pass those norms offline")

    def to_gguf(self, gguf_name: str, t: torch.Tensor, config: Any) -> torch.Tensor:
        return t + 1.0 if gguf_name.endswith("norm.weight") else t

    def from_gguf(self, gguf_name: str, t: torch.Tensor, config: Any) -> torch.Tensor:
        return t - 1.0 if gguf_name.endswith("norm.weight") else t

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        where = f"GGUF export of {config.model_type}"
        sliding = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {})
        problems = {
            "attn_logit_softcapping": (getattr(config, "attn_logit_softcapping", None), None,
                                       "llama.cpp's gemma3 has no attention soft-capping"),
            "use_bidirectional_attention": (bool(getattr(config, "use_bidirectional_attention", False)), False,
                                            "llama.cpp's gemma3 is causal"),
            "query_pre_attn_scalar": (config.query_pre_attn_scalar,
                                      _attention_scalar(config.hidden_size, config.num_attention_heads,
                                                        config.num_hidden_layers, config.head_dim),
                                      "llama.cpp scales queries by 1/sqrt(head_dim) (27B: hidden/heads)"),
            "rope_parameters.sliding_attention.rope_type": (sliding.get("rope_type", "default"), "default",
                                                            "llama.cpp scales no sliding-layer rope"),
        }
        for key, (value, want, why) in problems.items():
            if value != want:
                raise ConfigError(f"{where}: {key}={value!r}; the file needs {want!r} ({why})")

    def write_metadata(self, writer: gguf.GGUFWriter, config: Any) -> None:
        """The converter's keys (`Gemma3Model.set_gguf_parameters`), with the per-layer sliding pattern."""
        super().write_metadata(writer, config)
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        layer_types = list(getattr(config, "layer_types", None) or [])
        if config.sliding_window and "sliding_attention" in layer_types:
            writer.add_sliding_window(int(config.sliding_window))
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])

    def config_kwargs(self, field: Callable[[str, Any], Any], tensor_names: set[str]) -> dict[str, Any]:
        kw = super().config_kwargs(field, tensor_names)
        k = lambda key, default=None: field(f"{self.gguf_arch_name}.{key}", default)  # noqa: E731
        n = kw["num_hidden_layers"]
        full = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
        if k("rope.scaling.type") == "linear":
            full.update(rope_type="linear", factor=float(k("rope.scaling.factor")))
        window = int(k("attention.sliding_window", 0) or 0)
        pattern = k("attention.sliding_window_pattern", None)
        if isinstance(pattern, (int, float)):  # a period: llama.cpp's set_swa_pattern (every n-th layer global)
            pattern = [(i % int(pattern)) < int(pattern) - 1 for i in range(n)]
        elif pattern is None:
            pattern = [(i % 6) < 5 for i in range(n)] if window else [False] * n
        kw.update(
            rope_parameters={"full_attention": full,
                             "sliding_attention": {"rope_type": "default",
                                                   "rope_theta": float(k("rope.freq_base_swa", 10000.0))}},
            sliding_window=window or None,
            layer_types=["sliding_attention" if s and window else "full_attention" for s in pattern],
            final_logit_softcapping=k("final_logit_softcapping", None),
            rms_norm_eps=float(k("attention.layer_norm_rms_epsilon", 1e-6)),
            pad_token_id=field("tokenizer.ggml.padding_token_id", None),
        )
        kw["query_pre_attn_scalar"] = _attention_scalar(kw["hidden_size"], kw["num_attention_heads"], n,
                                                        kw["head_dim"])
        return kw
