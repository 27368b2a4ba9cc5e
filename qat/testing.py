"""The one tiny-model builder for tests, the demo, benchmarks and `load_model("tiny")`: a real Llama from
`transformers.LlamaConfig` with random weights, deterministic per seed, nothing downloaded.

    model = tiny_llama()                                   # 2 layers, hidden 128, vocab 512
    model = tiny_llama(hidden_size=256, intermediate_size=512, vocab_size=320, tie_word_embeddings=True)
    model = tiny_model("qwen3", hidden_size=256)              # any family of FAMILIES, from its config class
"""
from __future__ import annotations

import inspect

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from qat.errors import ConfigError


def tiny_llama(*, vocab_size: int = 512, hidden_size: int = 128, intermediate_size: int = 256, num_layers: int = 2,
               num_heads: int = 4, num_kv_heads: int = 2, max_position_embeddings: int = 256,
               tie_word_embeddings: bool = False, special_token_ids: bool = False, seed: int | None = 0,
               fork_rng: bool = False, dtype: torch.dtype | None = None) -> LlamaForCausalLM:
    """A small random LlamaForCausalLM in eval mode.

    Args:
        vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, max_position_embeddings,
            tie_word_embeddings: the LlamaConfig fields of the same meaning.
        special_token_ids: set bos=1, eos=2, pad=0 (the pad row of the embedding starts at zero), as
            `load_model("tiny")` does for its byte tokenizer; otherwise LlamaConfig's defaults.
        seed: `torch.manual_seed(seed)` before the weights are drawn; None draws from the RNG as it stands.
        fork_rng: restore the global RNG afterwards (the caller's random stream is left untouched); by default
            the global RNG is left where building the model put it, as tests that draw inputs next expect.
        dtype: cast the weights (default: float32) as a checkpoint of that dtype loads (`cast_as_loaded`).
    Returns:
        the model, `.eval()`.
    Example:
        >>> tiny_llama(num_layers=1)(torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 512])
    """
    check_tiny(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
               num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
               max_position_embeddings=max_position_embeddings)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"tiny.seed={seed!r}; must be an integer or null")
    tokens = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0} if special_token_ids else {}
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                         **tokens)
    with torch.random.fork_rng(devices=[], enabled=fork_rng):
        if seed is not None:
            torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return cast_as_loaded(model, dtype).eval()


def cast_as_loaded(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """`model.to(dtype)` as a checkpoint of that dtype loads (transformers' from_pretrained / from_config with a
    dtype, and every qat loader): RoPE frequencies (`inv_freq`, computed in float32 whatever the dtype, not stored
    in checkpoints) stay float32. A plain `.to(torch.bfloat16)` rounds them to bfloat16, and that model's logits
    differ from its exported-then-loaded copy (a tiny Llama: max |diff| 0.0046, NVFP4 or int4 alike).

    Example:
        >>> cast_as_loaded(tiny_llama(num_layers=1), torch.bfloat16).model.rotary_emb.inv_freq.dtype
        torch.float32
    """
    if dtype is None:
        return model
    kept = {}
    for m in model.modules():
        own = dict(m.named_buffers(recurse=False))
        if "inv_freq" in own:  # a rotary embedding: all its float32 buffers (original_inv_freq too)
            kept.update({(m, key): buf for key, buf in own.items() if buf.dtype == torch.float32})
    model = model.to(dtype)
    for (m, key), buf in kept.items():
        setattr(m, key, buf.to(getattr(m, key).device))
    return model


def rounded_rope(model: torch.nn.Module) -> list[str]:
    """The RoPE frequency buffers (`*.inv_freq`) of `model` held below float32: a plain `model.to(torch.bfloat16)`
    rounded them, where every loader computes them in float32 (see `cast_as_loaded`)."""
    return [n for n, b in model.named_buffers() if n.endswith("inv_freq") and b.is_floating_point()
            and torch.finfo(b.dtype).bits < 32]


def check_tiny(**sizes: object) -> None:
    """Refuse sizes a Llama cannot have, naming every offending `tiny.<key>` (before transformers divides by zero).

    Raises:
        ConfigError: a size that is not a positive integer, hidden_size not a multiple of num_heads (the head
            size, which RoPE needs even), or num_heads not a multiple of num_kv_heads (grouped-query attention).
    Example:
        >>> check_tiny(hidden_size=100, num_heads=3)  # ConfigError: tiny.hidden_size=100 is not a multiple ...
    """
    errors = [f"tiny.{k}={v!r}; must be a positive integer" for k, v in sizes.items()
              if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if not errors:
        hidden, heads, kv = sizes.get("hidden_size", 128), sizes.get("num_heads", 4), sizes.get("num_kv_heads", 2)
        if hidden % heads or (hidden // heads) % 2:  # RoPE rotates pairs: the head size must be even
            errors.append(f"tiny.hidden_size={hidden} is not an even multiple of tiny.num_heads={heads} "
                          f"(the head size hidden_size / num_heads must be an even integer)")
        if heads % kv:
            errors.append(f"tiny.num_heads={heads} is not a multiple of tiny.num_kv_heads={kv}")
    if errors:
        raise ConfigError("bad tiny model size:\n" + "\n".join(f"  - {e}" for e in errors))


TINY_KEYS = frozenset(inspect.signature(tiny_llama).parameters)  # what a `tiny:` config node may set


# per family: what makes its tiny config small and exercises its particulars (Qwen2's q/k/v biases come with the
# class; Gemma 3: sliding and global layers in turn, a short window; Phi-3: its default pad / eos ids 32000 are
# past a tiny vocabulary)
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {},
    "gemma3_text": {"sliding_window": 16, "tie_word_embeddings": True},
    "phi3": {"pad_token_id": None, "eos_token_id": 2},
}

# tiny_model config variants the GGUF metadata must carry: Gemma 3 4B+'s linear rope scaling of the global layers
# and a final logit soft-cap, Phi-4-mini-style partial rotary, tied Qwen embeddings (the small Qwen models)
VARIANTS: dict[str, tuple[str, dict]] = {
    "gemma3_softcap_linear_rope": ("gemma3_text", {
        "final_logit_softcapping": 1.0,
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    "phi3_partial_rotary": ("phi3", {"partial_rotary_factor": 0.5}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3_tied": ("qwen3", {"tie_word_embeddings": True}),
    # Llama 3.x's rope scaling (llama.cpp's rope_freqs tensor), with a short original context so that tiny
    # models' head dims have smoothed frequencies
    "llama3_rope": ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                                  "rope_theta": 10000.0}}),
    # linear position interpolation (Llama 2 long-context fine-tunes, CodeLlama-style): rope.scaling.* keys
    "llama_linear_rope": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}),
}


def tiny_model(model_type: str, *, vocab_size: int = 512, hidden_size: int = 128, intermediate_size: int = 256,
               num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, max_position_embeddings: int = 256,
               seed: int | None = 0, vector_noise: float = 0.0, **overrides) -> torch.nn.Module:
    """A small random causal LM of any family in `FAMILIES`, from its real transformers config class, in eval mode.

    Args:
        model_type: a Hugging Face model_type ("qwen2", "qwen3", "gemma3_text", "phi3", "llama", "mistral").
        vocab_size ... max_position_embeddings: the config fields of the same meaning; Qwen3's and
            Gemma 3's head_dim is hidden_size / num_heads (and Gemma's query_pre_attn_scalar head_dim) unless
            overridden.
        seed: `torch.manual_seed(seed)` before the weights are drawn; None draws from the RNG as it stands.
        vector_noise: add N(0, vector_noise^2) to every 1-D parameter, norm weights and biases (transformers
            starts them all equal, which hides a wrong norm offset or bias layout).
        overrides: any other config field (they win over the family's defaults).
    Raises:
        ValueError: a model_type not in FAMILIES.
    Example:
        >>> tiny_model("qwen2", num_layers=1)(torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 512])
    """
    if model_type not in FAMILIES:
        raise ValueError(f"tiny_model: model_type={model_type!r}; choose from {sorted(FAMILIES)}")
    fields = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=max_position_embeddings)
    if model_type in ("qwen3", "gemma3_text"):  # their configs default to head_dim 128 / 256 whatever the width
        fields["head_dim"] = hidden_size // num_heads
    if model_type == "gemma3_text":
        fields["query_pre_attn_scalar"] = overrides.get("head_dim", fields["head_dim"])
        fields["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)]
    config = AutoConfig.for_model(model_type, **{**fields, **FAMILIES[model_type], **overrides})
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if vector_noise:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(torch.randn_like(p) * vector_noise)
    return model.eval()


MOE_FAMILIES = ("qwen3_moe", "mixtral", "olmoe")


def tiny_moe(model_type: str = "qwen3_moe", *, vocab_size: int = 512, hidden_size: int = 128,
             expert_size: int = 128, num_experts: int = 8, top_k: int = 2, num_layers: int = 2, num_heads: int = 4,
             num_kv_heads: int | None = None, seed: int | None = 0, experts_implementation: str | None = None,
             dtype: torch.dtype | None = None):
    """A small random mixture-of-experts causal LM from its real transformers config class, in eval mode.

    Args:
        model_type: "qwen3_moe", "mixtral" or "olmoe" (`MOE_FAMILIES`).
        expert_size: each expert's intermediate size (Qwen3-MoE's moe_intermediate_size).
        num_experts, top_k: experts per layer and experts each token is routed to.
        experts_implementation: "eager", "batched_mm" or "grouped_mm" (transformers' default when None).
        num_kv_heads: default 2, but num_heads for OLMoE (which has no GQA; llama.cpp's olmoe graph assumes none).
        the rest: as `tiny_llama`.
    Example:
        >>> tiny_moe("mixtral", num_experts=4)(torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 512])
    """
    if model_type not in MOE_FAMILIES:
        raise ValueError(f"tiny_moe: model_type={model_type!r}; choose from {list(MOE_FAMILIES)}")
    if num_kv_heads is None:
        num_kv_heads = num_heads if model_type == "olmoe" else 2
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, max_position_embeddings=256,
                  num_experts_per_tok=top_k, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if model_type == "qwen3_moe":
        extra = dict(num_experts=num_experts, moe_intermediate_size=expert_size, intermediate_size=2 * expert_size,
                     head_dim=hidden_size // num_heads, norm_topk_prob=True)
    elif model_type == "mixtral":
        extra = dict(num_local_experts=num_experts, intermediate_size=expert_size)
    else:
        extra = dict(num_experts=num_experts, intermediate_size=expert_size)
    config = AutoConfig.for_model(model_type, **common, **extra)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    with torch.random.fork_rng(devices=[], enabled=False):
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    return cast_as_loaded(model, dtype).eval()
