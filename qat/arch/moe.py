"""What the mixture-of-experts families share (Qwen3-MoE, Mixtral, OLMoE): fused 3-D expert weights in GGUF.

transformers 5.x holds each MoE layer's experts as `mlp.experts.gate_up_proj` [E, 2I, H] and
`mlp.experts.down_proj` [E, H, I], and the router as `mlp.gate.weight` [E, H]. llama.cpp's converter
(`conversion/qwen.py` Qwen2MoeModel.modify_tensors, and the per-expert merge of Mixtral / OLMoE) writes them as
`blk.N.ffn_gate_exps` / `ffn_up_exps` (the two row halves of gate_up_proj, each [E, I, H]) and `ffn_down_exps`,
stacked 3-D, and the router `blk.N.ffn_gate_inp` in F32 (llama-quantize never quantizes it). The metadata adds
`{arch}.expert_count` and `{arch}.expert_used_count` (and `expert_feed_forward_length` where the family has a
separate expert size). This module registers no family; each family's file subclasses `MoEAdapter`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar

import gguf

from qat.arch.base import Mapping, tensor_name_map
from qat.arch.llama import ATTN_QKV, LlamaAdapter
from qat.errors import ConfigError

log = logging.getLogger(__name__)

GATE_UP, DOWN = "experts.gate_up_proj", "experts.down_proj"


class MoEAdapter(LlamaAdapter):
    """A Llama-like decoder whose MLP is a routed mixture of fused experts.

    Class attributes (besides ArchAdapter's):
        experts_field: the config field holding the number of routed experts.
        expert_size_field: the config field holding each expert's intermediate size.
        expert_ff_metadata: whether the converter writes `expert_feed_forward_length` (Qwen-MoE) or the expert
            size is `feed_forward_length` itself (Mixtral, OLMoE).
        llama_cpp_norm_topk: whether llama.cpp's graph for the architecture renormalises the top-k routing
            weights (its build_moe_ffn norm_w); a model whose config says otherwise computes something else there.
        permute_qk: llama.cpp's q/k row permutation (rotary "NORM" families: Mixtral); NEOX families have none.
    """

    experts_field: ClassVar[str] = "num_experts"
    expert_size_field: ClassVar[str] = "intermediate_size"
    expert_ff_metadata: ClassVar[bool] = False
    llama_cpp_norm_topk: ClassVar[bool] = True
    permute_qk: ClassVar[bool] = False
    # AWQ scales the attention and the experts (`qat.ptq.awq_experts`): one scale shared by the router and every
    # expert (folded into the norm), and per expert up rows -> down_proj; SmoothQuant the attention only
    mappings = (Mapping("input_layernorm", ATTN_QKV), Mapping("self_attn.v_proj", ("self_attn.o_proj",)),
                Mapping("post_attention_layernorm", ("mlp.gate", "mlp." + GATE_UP)),
                Mapping("mlp." + GATE_UP, ("mlp." + DOWN,)))
    smooth_mappings = (Mapping("input_layernorm", ATTN_QKV),)
    # rotations: the router and the fused experts read the residual stream, the experts' down_proj writes it
    residual_writes = ("self_attn.o_proj", "mlp." + DOWN)
    down_proj = None

    @property
    def residual_reads(self) -> tuple[Mapping, ...]:
        return (Mapping("input_layernorm", ATTN_QKV),
                Mapping("post_attention_layernorm", ("mlp.gate", "mlp." + GATE_UP)))

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        if why := self.structure_refusal(config):
            raise ConfigError(f"GGUF export of {config.model_type}: {why}")

    def n_experts(self, config: Any) -> int:
        return int(getattr(config, self.experts_field))

    def _experts_name(self, module: str, n_blocks: int) -> str:
        base = tensor_name_map(self.gguf_arch, n_blocks).get_name(module)
        if base is None:
            raise ConfigError(f"{module!r} has no GGUF {self.gguf_arch_name} tensor name")
        return f"{base}.weight"

    def gguf_name(self, hf_name: str, n_blocks: int) -> str:
        if hf_name.endswith(DOWN):
            return self._experts_name(hf_name, n_blocks)
        if hf_name.endswith(GATE_UP):
            raise ConfigError(f"{hf_name!r} is written as two GGUF tensors (ffn_gate_exps, ffn_up_exps): see gguf_parts")
        return super().gguf_name(hf_name, n_blocks)

    def gguf_parts(self, hf_name: str, config: Any) -> list[tuple[str, int, int | None]]:
        if hf_name.endswith(GATE_UP):
            stem, size, n = hf_name[: -len("gate_up_proj")], int(getattr(config, self.expert_size_field)), config.num_hidden_layers
            return [(self._experts_name(stem + "gate_proj", n), 0, size), (self._experts_name(stem + "up_proj", n), size, None)]
        return super().gguf_parts(hf_name, config)

    def to_gguf(self, gguf_name: str, t, config: Any):
        return super().to_gguf(gguf_name, t, config) if self.permute_qk else t

    def from_gguf(self, gguf_name: str, t, config: Any):
        return super().from_gguf(gguf_name, t, config) if self.permute_qk else t

    def write_metadata(self, writer: gguf.GGUFWriter, config: Any) -> None:
        super().write_metadata(writer, config)
        if self.expert_ff_metadata:
            writer.add_expert_feed_forward_length(int(getattr(config, self.expert_size_field)))
        writer.add_expert_count(self.n_experts(config))
        writer.add_expert_used_count(int(config.num_experts_per_tok))
        norm = getattr(config, "norm_topk_prob", self.llama_cpp_norm_topk)
        if bool(norm) != self.llama_cpp_norm_topk:
            log.warning("GGUF %s: this model's norm_topk_prob=%s, but llama.cpp's %s graph %s the top-k routing "
                        "weights; llama.cpp will compute a different mixture than transformers", self.gguf_arch_name,
                        norm, self.gguf_arch_name, "renormalises" if self.llama_cpp_norm_topk else "does not renormalise")

    def config_from_gguf(self, field: Callable[[str, Any], Any], tensor_names: set[str], where: str = ""):
        k = lambda key, default=None: field(f"{self.gguf_arch_name}.{key}", default)  # noqa: E731
        if k("expert_count") is None or k("expert_used_count") is None:
            raise ConfigError(f"{where}GGUF metadata lacks {self.gguf_arch_name}.expert_count / expert_used_count, "
                             f"which a {self.model_types[0]} model needs")
        config = super().config_from_gguf(field, tensor_names, where)
        setattr(config, self.experts_field, int(k("expert_count")))
        config.num_experts_per_tok = int(k("expert_used_count"))
        size = k("expert_feed_forward_length") if self.expert_ff_metadata else k("feed_forward_length")
        setattr(config, self.expert_size_field, int(size))
        if hasattr(config, "norm_topk_prob"):
            config.norm_topk_prob = self.llama_cpp_norm_topk  # what the file computes in llama.cpp
        return config
