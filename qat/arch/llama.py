"""Llama (and the families laid out like it): `LlamaForCausalLM`, GGUF architecture "llama"."""
from __future__ import annotations

import math
from typing import Any, Callable

import gguf
import torch

from qat.arch.base import ARCHS, ArchAdapter, Mapping, register_arch, rope_parameters
from qat.errors import ConfigError

ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_IN = ("mlp.gate_proj", "mlp.up_proj")


def permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (undoes the Hugging Face rotary half-split); any [O, ...] tensor."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def unpermute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `permute_rows`: GGUF q/k rows back in Hugging Face order."""
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


ROPE_FREQS = "rope_freqs.weight"


def llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """Llama 3's rope frequency factors, as llama.cpp's converter computes them (`LlamaModel.generate_extra_tensors`,
    same float32 steps): 1 for short wavelengths, `factor` for long ones, smoothly between; llama.cpp divides each
    rotary frequency by its factor, as transformers' llama3 rope does.

    Example:
        >>> llama3_rope_factors({"factor": 8.0, "original_max_position_embeddings": 64}, 32)[:2]
        tensor([1., 1.])
    """
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _nice(x: float) -> float:
    return float(f"{x:.4g}")


def llama3_rope_parameters(factors: torch.Tensor, theta: float, head_dim: int) -> dict | None:
    """rope_parameters (llama3) that give `factors` (a GGUF file's rope_freqs), or None when every factor is 1.

    Only two combinations of (low_freq_factor, high_freq_factor, original_max_position_embeddings) show in the
    factors, so low_freq_factor is taken as 1 (Llama 3.x's value); with fewer than two smoothed frequencies the
    boundaries are any that separate the scaled from the unscaled ones. Values are rounded to 4 digits where the
    rounded ones give the same factors.

    Raises:
        ValueError: factors no llama3 rope gives.
    """
    f = factors.double()
    factor = float(f.max())
    if factor <= 1.0:
        return None
    x = 1.0 / (2 * math.pi / (1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))))
    tol = 1e-5 * factor
    scaled, unscaled = (f - factor).abs() < tol, (f - 1).abs() < tol
    mid = ~(scaled | unscaled)
    s = (1 / f - 1 / factor) / (1 - 1 / factor)  # the smoothing weight of each factor
    x_lo = float(x[scaled].max()) if scaled.any() else None
    x_hi = float(x[unscaled].min()) if unscaled.any() else None
    if int(mid.sum()) >= 2:
        a, b = torch.linalg.lstsq(torch.stack([x[mid], torch.ones_like(x[mid])], 1), s[mid, None]).solution[:, 0]
        x0, x1 = float(-b / a), float((1 - b) / a)  # where the smoothing weight is 0 and 1
    elif int(mid.sum()) == 1:
        xm, sm = float(x[mid]), float(s[mid])
        widths = [(xm - x_lo) / sm] if x_lo is not None else [xm / sm]
        widths += [(x_hi - xm) / (1 - sm)] if x_hi is not None else []
        w = 0.5 * min(widths)
        x0, x1 = xm - sm * w, xm + (1 - sm) * w
    else:
        x_lo = x_lo if x_lo is not None else 0.0
        x_hi = x_hi if x_hi is not None else 2 * float(x.max())
        x0, x1 = x_lo + (x_hi - x_lo) / 3, x_lo + 2 * (x_hi - x_lo) / 3
    raw = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": x1 / x0,
           "original_max_position_embeddings": 1.0 / x0, "rope_theta": theta}
    for rope in ({**raw, "high_freq_factor": _nice(x1 / x0), "original_max_position_embeddings": round(1 / x0)},
                 raw):
        if torch.allclose(llama3_rope_factors(rope, head_dim).double(), f, rtol=1e-5, atol=1e-6):
            return rope
    raise ConfigError(f"rope_freqs {factors.tolist()} are not the factors of a llama3 rope scaling")


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
    # llama3 is written as the rope_freqs tensor (extra_tensors), linear as rope.scaling.* keys
    rope_types = ("default", "linear", "llama3")
    extra_tensor_names = (ROPE_FREQS,)

    @staticmethod
    def _head_dim(config: Any) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def extra_tensors(self, config: Any) -> dict[str, torch.Tensor]:
        """Llama 3's rope scaling as llama.cpp's `rope_freqs` tensor (`llama3_rope_factors`)."""
        rope = rope_parameters(config)
        if str(rope.get("rope_type", "default")).lower() != "llama3":
            return {}
        return {ROPE_FREQS: llama3_rope_factors(rope, self._head_dim(config))}

    def read_extra_tensors(self, config: Any, tensors: dict[str, torch.Tensor], where: str = "") -> None:
        """A file's `rope_freqs` back as llama3 rope_parameters of `config` (`llama3_rope_parameters`)."""
        tensors = dict(tensors)
        factors = tensors.pop(ROPE_FREQS, None)
        super().read_extra_tensors(config, tensors, where)
        if factors is None:
            return
        theta = rope_parameters(config).get("rope_theta", 10000.0)
        try:
            rope = llama3_rope_parameters(factors.reshape(-1), theta, self._head_dim(config))
        except ConfigError as err:
            raise ConfigError(f"{where}{err}") from None
        if rope is not None:
            config.rope_parameters = rope

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
        if rope.get("rope_type", "default") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)

    def config_from_gguf(self, field: Callable[[str, Any], Any], tensor_names: set[str], where: str = ""):
        if type(self) is LlamaAdapter and field(f"{self.gguf_arch_name}.expert_count", None):
            # llama.cpp writes Mixtral as "llama" with experts: a mixture of experts reads back as Mixtral
            return ARCHS["mixtral"].config_from_gguf(field, tensor_names, where)
        return super().config_from_gguf(field, tensor_names, where)
