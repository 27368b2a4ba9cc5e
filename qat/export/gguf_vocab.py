"""Embed a Hugging Face byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) into a GGUF file.

Written keys: tokenizer.ggml.model = "gpt2", .pre, .tokens, .token_type (CONTROL for special added
tokens, NORMAL otherwise), .merges, bos / eos / unknown / padding ids, and the chat template.
.pre is llama.cpp's name for the tokenizer's pre-tokenizer (its split regex): a wrong one makes llama.cpp
tokenize differently (e.g. " (" or " $" split in two). The token list is padded to the model's vocab_size
with unused "[PAD{i}]" tokens, as llama.cpp's converter does (llama.cpp sizes token_embd by the list).
"""
from __future__ import annotations

import json
import logging

import gguf

from qat.errors import ConfigError

_BYTE_LEVEL_REGEX = {"type": "ByteLevel", "use_regex": True}
_QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _is(step: dict, want: dict) -> bool:
    return all(step.get(k) == v for k, v in want.items())


def llama_cpp_pre(pre_tokenizer: dict | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a Hugging Face pre-tokenizer (tokenizer.json's "pre_tokenizer").

    ByteLevel with its GPT-2 regex -> "gpt-2"; individual Digits then that ByteLevel -> "smollm" (SmolLM);
    Llama-3's Split regex then a regex-free ByteLevel -> "llama-bpe"; Qwen2's (Qwen2, Qwen2.5, Qwen3: single
    digits) -> "qwen2"; anything else -> "default", with a warning (llama.cpp's default split may tokenize
    differently).

    Example:
        >>> llama_cpp_pre({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True})
        'gpt-2'
    """
    pre = pre_tokenizer or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _is(steps[0], _BYTE_LEVEL_REGEX):
        return "gpt-2"
    if len(steps) == 2 and _is(steps[0], {"type": "Digits", "individual_digits": True}) and \
            _is(steps[1], _BYTE_LEVEL_REGEX):
        return "smollm"
    if len(steps) == 2 and steps[0].get("type") == "Split" and _is(steps[1], {"type": "ByteLevel"}):
        named = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(steps[0].get("pattern", {}).get("Regex"))
        if named:
            return named
    logging.getLogger(__name__).warning(
        "GGUF tokenizer: pre-tokenizer %s has no known llama.cpp name; writing 'default' (llama.cpp may split "
        "text differently from transformers)", json.dumps(pre)[:200])
    return "default"


def add_tokenizer(writer, tokenizer, pre: str | None = None, n_vocab: int | None = None) -> None:
    """Add `tokenizer`'s vocabulary to a `gguf.GGUFWriter` (before the header is written).

    Args:
        writer: the GGUF writer.
        tokenizer: a Hugging Face fast tokenizer whose model is BPE.
        pre: llama.cpp's pre-tokenizer name ("gpt-2", "smollm", "llama-bpe", ...); default: `llama_cpp_pre`
            of the tokenizer's own pre-tokenizer.
        n_vocab: the model's vocab_size: the token list is padded to it.
    Raises:
        ValueError: a tokenizer that is not a fast BPE tokenizer, or one with more tokens than n_vocab.
    Example:
        >>> add_tokenizer(writer, AutoTokenizer.from_pretrained(folder), pre="smollm")
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(f"GGUF tokenizer: only fast BPE tokenizers are supported, got {model.get('type') or type(tokenizer).__name__}")
    if model.get("byte_fallback"):  # written as "gpt2", llama.cpp would split its "▁" pieces as bytes: garbage ids
        raise ConfigError("GGUF tokenizer: a SentencePiece-style BPE (byte_fallback: Gemma, Phi-3, Llama 2, Mistral) "
                         "needs tokenizer.ggml.model=llama with SentencePiece scores, which qat does not write; only "
                         "byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen) are embedded")
    vocab = tokenizer.get_vocab()
    size = max(max(vocab.values()) + 1, len(vocab))
    if n_vocab is not None and size > n_vocab:
        raise ConfigError(f"GGUF tokenizer: {size} tokens but the model's vocab_size is {n_vocab}")
    size = max(size, n_vocab or 0)
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, i in vocab.items():
        tokens[i] = text
    special = set(getattr(tokenizer, "all_special_ids", [])) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    ids = set(vocab.values())
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL if i in ids else gguf.TokenType.UNUSED
             for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or llama_cpp_pre(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id",
                             "unk": "add_unk_token_id", "pad": "add_pad_token_id"}[key])(int(value))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
