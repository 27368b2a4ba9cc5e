"""The one tiny-model builder for tests, the demo, benchmarks and `load_model("tiny")`: a real Llama from
`transformers.LlamaConfig` with random weights, deterministic per seed, nothing downloaded.

    model = tiny_llama()                                   # 2 layers, hidden 128, vocab 512
    model = tiny_llama(hidden_size=256, intermediate_size=512, vocab_size=320, tie_word_embeddings=True)
"""
from __future__ import annotations

import inspect

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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
        dtype: cast the weights (default: float32).
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
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


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
