"""Read a GGUF file into a Hugging Face model with dequantized float weights.

The file's general.architecture picks the adapter of `qat.arch` that reads it (llama: LlamaConfig and
LlamaForCausalLM). Every tensor is decoded with `gguf.quants.dequantize` (the reference decoder), its rows put
back in Hugging Face order by the adapter (the q/k permutation), and the config is rebuilt from the metadata. A
truncated or corrupted file, or an architecture no adapter reads, is refused with an error naming the file.

Example:
    >>> model = load_gguf("out/model-Q4_K_M.gguf")
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from torch import nn

from qat.arch import ArchAdapter, get_arch, gguf_reader_arch, gguf_reader_archs
from qat.errors import BadFileError, ConfigError
from qat.export.gguf_check import scan_gguf, verify_gguf_checksum
from qat.export.validate import bad_file, check_config, check_model, check_state


def open_gguf(path: str | os.PathLike):
    """A checked `gguf.GGUFReader`.

    Raises:
        FileNotFoundError: no such file.
        BadFileError: not a GGUF file, truncated / corrupted / edited, or hostile (`qat.export.gguf_check`).
    """
    path = Path(path)
    layout = scan_gguf(path)  # every count, type, offset and size checked before gguf's reader trusts them
    verify_gguf_checksum(path, layout)
    try:
        reader = gguf.GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:  # the reader raises ValueError / IndexError / struct errors on bad files
        raise BadFileError(path, f"truncated or corrupted GGUF file ({type(err).__name__}: {err})") from None
    if end > path.stat().st_size:
        raise BadFileError(path, f"truncated GGUF file (tensor data needs {end} bytes, file has {path.stat().st_size})")
    return reader


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def reader_arch(reader, path: str | os.PathLike | None = None) -> ArchAdapter:
    """The adapter that reads this file's general.architecture (`path` names the file in errors).

    Raises:
        ValueError: an architecture no adapter of `qat.arch` reads, listing the ones read.
    """
    where = f"{str(path)!r}: " if path is not None else ""
    arch = _field(reader, "general.architecture")
    adapter = gguf_reader_arch(arch)
    if adapter is None:
        raise ConfigError(f"{where}GGUF architecture {arch!r} (general.architecture) is not supported by this "
                         f"importer; known: {gguf_reader_archs()} (an adapter in qat/arch/ reads each)")
    return adapter


def gguf_config(reader, path: str | os.PathLike | None = None):
    """The transformers config (LlamaConfig for llama) from the metadata of a GGUF file (`path` names it in errors).

    Raises:
        ValueError: an architecture no adapter reads, or metadata missing, naming the file and the key.
    """
    where = f"{str(path)!r}: " if path is not None else ""
    arch = reader_arch(reader, path)
    config = arch.config_from_gguf(lambda key, default=None: _field(reader, key, default),
                                   {t.name for t in reader.tensors}, where)
    adapter = get_arch(config)  # the family read (a "llama" file with experts is Mixtral)
    extra = {t.name: _values(t) for t in reader.tensors if t.name in adapter.extra_tensor_names}
    adapter.read_extra_tensors(config, extra, where)  # generated tensors (rope_freqs) back into the config
    return config


def _values(t) -> torch.Tensor:
    """A GGUF tensor dequantized to float32, in its logical (row-major) shape."""
    values = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
    return values.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))


def gguf_state_dict(reader, config, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Dequantized float32 tensors, one at a time, under Hugging Face names.

    Args:
        config: the model's config (its model_type picks the adapter).
        names: the model's parameter names (default: those of the adapter's model class for `config`).
    Raises:
        ValueError: a GGUF tensor with no parameter of the model.
    """
    arch = get_arch(config)
    if names is None:
        with torch.device("meta"):
            names = list(arch.build_model(config).state_dict())
    to_hf = arch.hf_parts(names, config)
    multipliers = _multipliers(reader)
    out, parts = {}, {}
    for t in reader.tensors:
        if t.name in arch.extra_tensor_names:  # generated from the config (gguf_config read them)
            continue
        if t.name in multipliers.values():
            continue
        if t.name not in to_hf:
            raise ConfigError(f"GGUF tensor {t.name!r} has no Hugging Face {config.model_type} name")
        values = _values(t)
        if t.name in multipliers:
            values = _multiply(values, reader, multipliers[t.name])
        hf, start, stop = to_hf[t.name]
        if start == 0 and stop is None:
            out[hf] = arch.from_gguf(t.name, values, config)
        else:  # one of the GGUF tensors a fused Hugging Face tensor was split into (MoE ffn_gate_exps / ffn_up_exps)
            parts.setdefault(hf, []).append((start, arch.from_gguf(t.name, values, config)))
    for hf, pieces in parts.items():
        out[hf] = torch.cat([v for _, v in sorted(pieces, key=lambda p: p[0])], dim=-2)
    return out


def _multipliers(reader) -> dict[str, str]:
    """{weight name: its "<name>.scale" tensor} for the NVFP4 weights of a file: llama.cpp multiplies the
    matmul output by that per-tensor (per-expert) scale (convert_hf_to_gguf's NVFP4 scale2)."""
    types = {t.name: t.tensor_type for t in reader.tensors}
    return {w: w.removesuffix(".weight") + ".scale" for w, ty in types.items()
            if ty == gguf.GGMLQuantizationType.NVFP4 and w.removesuffix(".weight") + ".scale" in types}


def _multiply(values: torch.Tensor, reader, name: str) -> torch.Tensor:
    """`values` [..., O, I] times the scale tensor `name` ([1], or one per expert of a 3-D tensor)."""
    t = next(t for t in reader.tensors if t.name == name)
    m = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(-1)
    if m.numel() not in (1, values.shape[0] if values.ndim == 3 else 1):
        raise ConfigError(f"GGUF tensor {name!r} has {m.numel()} values; expected 1 (or one per expert)")
    return values * (m.reshape(-1, 1, 1) if values.ndim == 3 else m)


def load_gguf(path: str | os.PathLike) -> nn.Module:
    """A causal LM (LlamaForCausalLM for llama files) holding the dequantized weights of a GGUF file.

    Raises:
        BadFileError: a corrupted or hostile file, non-finite hyper-parameters or weights, or tensors that do not
            fit the config. ValueError: an unknown architecture.
    """
    reader = open_gguf(path)
    with bad_file(path, "GGUF file"):
        config = gguf_config(reader, path)
        check_config(config, path, Path(path).stat().st_size)
        model = get_arch(config).build_model(config)
        state = gguf_state_dict(reader, config, list(model.state_dict()))
        check_state(model, state, path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise BadFileError(path, f"tensors do not match the config: missing {missing}, unexpected {unexpected}")
        if config.tie_word_embeddings:
            model.tie_weights()
    return check_model(model.eval(), path)
