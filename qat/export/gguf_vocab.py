"""Embed a Hugging Face byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) into a GGUF file.

Written keys: tokenizer.ggml.model = "gpt2", .pre, .tokens, .token_type (CONTROL for special added
tokens, NORMAL otherwise), .merges, bos / eos / unknown / padding ids, and the chat template.
"""
from __future__ import annotations

import json


def add_tokenizer(writer, tokenizer, pre: str = "default") -> None:
    """Add `tokenizer`'s vocabulary to a `gguf.GGUFWriter` (before the header is written).

    Args:
        writer: the GGUF writer.
        tokenizer: a Hugging Face fast tokenizer whose model is BPE.
        pre: llama.cpp's pre-tokenizer name ("default", "smollm", "llama-bpe", ...).
    Raises:
        ValueError: a tokenizer that is not a fast BPE tokenizer.
    Example:
        >>> add_tokenizer(writer, AutoTokenizer.from_pretrained(folder), pre="smollm")
    """
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF tokenizer: only fast BPE tokenizers are supported, got {model.get('type') or type(tokenizer).__name__}")
    vocab = tokenizer.get_vocab()
    size = max(max(vocab.values()) + 1, len(vocab))
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, i in vocab.items():
        tokens[i] = text
    special = set(getattr(tokenizer, "all_special_ids", [])) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
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
