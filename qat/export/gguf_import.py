"""Read a GGUF file (llama architecture) into a Hugging Face model with dequantized float weights.

Every tensor is decoded with `gguf.quants.dequantize` (the reference decoder), q/k rows are put back in
Hugging Face order, and a LlamaConfig is rebuilt from the metadata. A truncated or corrupted file, or an
architecture other than llama, is refused with an error naming the file.

Example:
    >>> model = load_gguf("out/model-Q4_K_M.gguf")
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qat.export.gguf_export import _LAYER_MAP, _TOP_MAP

_INV_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_INV_TOP = {v: k for k, v in _TOP_MAP.items()}


def open_gguf(path: str | os.PathLike):
    """A checked `gguf.GGUFReader`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a GGUF file, or truncated / corrupted (naming the file).
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:  # the reader raises ValueError / IndexError / struct errors on bad files
        raise ValueError(f"{str(path)!r}: truncated or corrupted GGUF file ({type(err).__name__}: {err})") from None
    if end > path.stat().st_size:
        raise ValueError(f"{str(path)!r}: truncated GGUF file (tensor data needs {end} bytes, file has {path.stat().st_size})")
    return reader


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def hf_name(name: str) -> str:
    """Hugging Face parameter name of a GGUF llama tensor name (inverse of `gguf_name`)."""
    module, _, leaf = name.rpartition(".")
    if module in _INV_TOP:
        return f"{_INV_TOP[module]}.{leaf}"
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", module)
    if m and m.group(2) in _INV_LAYER:
        return f"model.layers.{m.group(1)}.{_INV_LAYER[m.group(2)]}.{leaf}"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face llama name")


def _unpermute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def gguf_config(reader, path: str | os.PathLike | None = None):
    """A LlamaConfig from the metadata of a llama GGUF file (`path` names it in errors).

    Raises:
        ValueError: another architecture, or llama metadata missing, naming the file and the key.
    """
    from transformers import LlamaConfig

    where = f"{str(path)!r}: " if path is not None else ""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{where}GGUF architecture {arch!r} (general.architecture) is not supported by this "
                         "importer; known: ['llama']")
    needed = ("attention.head_count", "embedding_length", "feed_forward_length", "block_count")
    missing = [f"llama.{k}" for k in needed if _field(reader, f"llama.{k}") is None]
    if missing:
        raise ValueError(f"{where}GGUF metadata lacks {missing}, which a llama model needs")
    k = lambda key, default=None: _field(reader, f"llama.{key}", default)  # noqa: E731
    heads = int(k("attention.head_count"))
    hidden = int(k("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = k("vocab_size") or (len(tokens) if tokens is not None else None)
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(k("feed_forward_length")),
        num_hidden_layers=int(k("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(k("attention.head_count_kv", heads)),
        head_dim=int(k("attention.key_length", hidden // heads)),
        max_position_embeddings=int(k("context_length", 2048)), rms_norm_eps=float(k("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(k("rope.freq_base", 10000.0)), tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"), eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )


def gguf_state_dict(reader, config) -> dict[str, torch.Tensor]:
    """Dequantized float32 tensors, one at a time, under Hugging Face names."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        values = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        values = values.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
        if ".self_attn.q_proj." in name:
            values = _unpermute_rows(values, config.num_attention_heads)
        elif ".self_attn.k_proj." in name:
            values = _unpermute_rows(values, config.num_key_value_heads)
        out[name] = values
    return out


def load_gguf(path: str | os.PathLike) -> nn.Module:
    """A LlamaForCausalLM holding the dequantized weights of a GGUF file.

    Raises:
        ValueError: a corrupted file, an unknown architecture, or tensors that do not fit the config.
    """
    from transformers import LlamaForCausalLM

    reader = open_gguf(path)
    config = gguf_config(reader, path)
    model = LlamaForCausalLM(config)
    state = gguf_state_dict(reader, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{str(path)!r}: tensors do not match the config: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
