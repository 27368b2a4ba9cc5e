"""Embed a Hugging Face tokenizer into a GGUF file: byte-level BPE (GPT-2 style, as SmolLM2's) as
tokenizer.ggml.model "gpt2", SentencePiece-style ones (Unigram, or BPE with byte fallback: Llama 2, Mistral,
Gemma, Phi-3) as "llama" with scores (`add_sentencepiece_tokenizer`), both read from tokenizer.json.

Written keys: tokenizer.ggml.model = "gpt2", .pre, .tokens, .token_type (CONTROL for special added
tokens, NORMAL otherwise), .merges, bos / eos / unknown / padding ids, and the chat template.
.pre is llama.cpp's name for the tokenizer's pre-tokenizer (its split regex): a wrong one makes llama.cpp
tokenize differently (e.g. " (" or " $" split in two). The token list is padded to the model's vocab_size
with unused "[PAD{i}]" tokens, as llama.cpp's converter does (llama.cpp sizes token_embd by the list).
"""
from __future__ import annotations

import json
import logging
import re

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
    if is_sentencepiece(model):  # Llama 2, Mistral, Gemma, Phi-3: "▁" pieces, byte fallback
        add_sentencepiece_tokenizer(writer, tokenizer, spec, n_vocab)
        return
    if backend is None and getattr(tokenizer, "sp_model", None) is not None:  # a sentencepiece-backed tokenizer
        add_sentencepiece_tokenizer(writer, tokenizer, {}, n_vocab)
        return
    if model.get("type") != "BPE":
        raise ConfigError(f"GGUF tokenizer: only fast BPE (byte-level or byte-fallback) and Unigram tokenizers are "
                          f"supported, got {model.get('type') or type(tokenizer).__name__}")
    vocab = tokenizer.get_vocab()
    size = _vocab_size(vocab, n_vocab)
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
    _add_special_ids(writer, tokenizer)
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _vocab_size(vocab: dict[str, int], n_vocab: int | None) -> int:
    """The token list's length: the tokenizer's ids, padded to the model's vocab_size (refused if larger)."""
    size = max(max(vocab.values()) + 1, len(vocab))
    if n_vocab is not None and size > n_vocab:
        raise ConfigError(f"GGUF tokenizer: {size} tokens but the model's vocab_size is {n_vocab}")
    return max(size, n_vocab or 0)


def _add_special_ids(writer, tokenizer) -> None:
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(int(value))


# -- SentencePiece-style tokenizers: tokenizer.ggml.model = "llama" --------------------------------------
def is_sentencepiece(model: dict) -> bool:
    """Whether tokenizer.json's "model" is SentencePiece-style (Unigram, or BPE with byte fallback), which
    llama.cpp runs as tokenizer.ggml.model "llama" (not "gpt2")."""
    return model.get("type") == "Unigram" or (model.get("type") == "BPE" and bool(model.get("byte_fallback")))


def sentencepiece_vocab(tokenizer, spec: dict, n_vocab: int | None = None) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) as llama.cpp's converter writes a SentencePiece vocabulary
    (`_create_vocab_sentencepiece`), read from tokenizer.json (no sentencepiece package needed); a tokenizer with
    no tokenizer.json but a sentencepiece `sp_model` (tokenizer.model) gives its pieces, scores and types as the
    converter reads them there.

    Scores: a Unigram piece's log-probability; a BPE piece made by merge r gets -r (llama.cpp merges the
    adjacent pair with the highest score first, so that is BPE's merge order, as SentencePiece's own BPE
    scores are), a piece no merge makes (single characters, bytes) ranks below every merge. Types: <0xXX> BYTE,
    the unknown token UNKNOWN, special added tokens CONTROL, other added tokens USER_DEFINED (their "▁" written
    as spaces) with score -1000, ids past the tokenizer's UNUSED "[PAD{i}]" with score -10000.
    """
    model, vocab = spec.get("model", {}), tokenizer.get_vocab()
    size = _vocab_size(vocab, n_vocab)
    tokens, scores = [f"[PAD{i}]" for i in range(size)], [-10000.0] * size
    types = [int(gguf.TokenType.UNUSED)] * size
    sp = getattr(tokenizer, "sp_model", None)
    if not model and sp is not None:  # tokenizer.model through the sentencepiece package, as the converter reads it
        pieces, unk = [], None
        for i in range(min(sp.vocab_size(), size)):
            pieces.append((sp.IdToPiece(i), i, float(sp.GetScore(i))))
            kind = ("UNKNOWN" if sp.IsUnknown(i) else "CONTROL" if sp.IsControl(i) else "UNUSED" if sp.IsUnused(i)
                    else "BYTE" if sp.IsByte(i) else "NORMAL")
            unk = i if kind == "UNKNOWN" else unk
            types[i] = int(gguf.TokenType[kind])
    elif model["type"] == "Unigram":
        pieces = [(piece, i, float(score)) for i, (piece, score) in enumerate(model["vocab"])]
        unk = model.get("unk_id")
    else:
        ranks: dict[str, int] = {}
        for r, merge in enumerate(model.get("merges", [])):
            a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
            ranks.setdefault(a + b, r)
        n = len(ranks)
        pieces = [(piece, i, -float(ranks[piece] if piece in ranks else n + i)) for piece, i in model["vocab"].items()]
        unk = model["vocab"].get(model.get("unk_token"))
    for piece, i, score in pieces:
        if not model:  # the sentencepiece model's own scores and types
            tokens[i], scores[i] = piece, score
            continue
        byte = re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece)
        tokens[i], scores[i] = piece, 0.0 if byte or i == unk else score
        types[i] = int(gguf.TokenType.BYTE if byte else gguf.TokenType.UNKNOWN if i == unk else gguf.TokenType.NORMAL)
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        special = bool(getattr(added, "special", False))
        content = str(added.content if hasattr(added, "content") else added)
        tokens[i] = content if special else content.replace(SPM_SPACE, " ")
        scores[i] = -1000.0
        types[i] = int(gguf.TokenType.UNKNOWN if i == unk else gguf.TokenType.CONTROL if special
                       else gguf.TokenType.USER_DEFINED)
    return tokens, scores, types


SPM_SPACE = "\u2581"  # "▁", SentencePiece's space


def add_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (normalizer Prepend("▁"), or a Metaspace pre-tokenizer
    with prepend_scheme first / always): llama.cpp's tokenizer.ggml.add_space_prefix."""
    def steps(node):
        node = node or {}
        return node.get("normalizers") or node.get("pretokenizers") or [node]

    if any(s.get("type") == "Prepend" and s.get("prepend") == SPM_SPACE for s in steps(spec.get("normalizer"))):
        return True
    return any(s.get("type") == "Metaspace" and (s.get("prepend_scheme") in ("first", "always")
                                                 or s.get("add_prefix_space") is True)
               for s in steps(spec.get("pre_tokenizer")))


def add_sentencepiece_tokenizer(writer, tokenizer, spec: dict, n_vocab: int | None = None) -> None:
    """Write a SentencePiece-style tokenizer (`is_sentencepiece`) as llama.cpp's converter does
    (`_set_vocab_sentencepiece`): model "llama", pre "default", tokens, scores, types, special ids, whether
    BOS / EOS are added (as the tokenizer itself does) and the space prefix, and the chat template."""
    tokens, scores, types = sentencepiece_vocab(tokenizer, spec, n_vocab)
    if spec.get("model", {}).get("type") == "Unigram":
        logging.getLogger(__name__).warning(
            "GGUF tokenizer: a Unigram vocabulary is written as llama.cpp's 'llama' (SentencePiece) tokenizer, as "
            "llama.cpp's converter writes it; llama.cpp merges pieces greedily by score where transformers finds "
            "the most likely segmentation, so some texts get other ids")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    _add_special_ids(writer, tokenizer)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(ids) and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)
    writer.add_add_space_prefix(add_space_prefix(spec))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
