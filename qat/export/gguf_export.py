"""GGUF writer (through the `gguf` package), with llama.cpp's type mixes; names, q/k layout and metadata come
from the model's architecture adapter (`qat.arch`).

    export_gguf(model, "out/model-Q4_K_M.gguf", "Q4_K_M", tokenizer=tok)

`gguf_type` is a tensor type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS, MXFP4,
TQ1_0, TQ2_0) or a mix (Q4_K_S,
Q4_K_M, Q5_K_S, Q5_K_M), and for the types that are also llama.cpp file types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
Q6_K) the file follows llama.cpp's llama_tensor_get_type for dense models, as `llama-quantize` does
(IQ4_NL, IQ4_XS, MXFP4, TQ1_0 and TQ2_0 follow its output / token_embd rules only: output and a tied
embedding in Q6_K, the ternary types' untied token_embd in Q4_K):
output.weight (token_embd when tied) in Q6_K unless the type is Q8_0; in *_M, attn_v (or a fused attn_qkv) and ffn_down in Q6_K
for layers i < n/8, i >= 7n/8 and every third layer between; in Q4_K_S, attn_v of the first 4 layers and
ffn_down of the first n/8 in Q5_K; with an imatrix, Q4_0 / Q5_0 put ffn_down of the first n/8 layers in
Q4_1 / Q5_1. `pure=True` (llama-quantize --pure) gives every 2-D tensor the one type. The single K types
Q2_K, Q3_K, Q4_K, Q5_K are always pure. 1-D tensors (norms) are F32. A row length that is not a multiple of
256 falls back as llama.cpp does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL; Q2_K / Q3_K /
TQ1_0 / TQ2_0 -> Q4_0) and a warning names the tensor (a recipe with `gguf_fallback: true` trains such
modules on the fallback type: `qat.transform.prepare`). The tensor types, their block sizes, encoders and
fallbacks come from the formats in `qat.formats` (`gguf_types()`): a format that registers a GGUF type is
written and read with no change here.

Format-exact export: a converted (or prepared) model whose weights were trained or quantized on a
ggml grid (`QuantSpec(grid="ggml")` or `"ggml_k"`, recipes gguf_q8_0 ... gguf_q5_1, gguf_q2_k ... gguf_q6_k) keeps its trained type and its
blocks are built from its own codes and scales: the file computes exactly what the model computed. Where two
GGUF types store the same grid (the ternary g256: TQ2_0 and TQ1_0), the one asked for is written.
Other quantized weights are dequantized and re-quantized to the target type (a warning says so).

Tensors are quantized and written one at a time into a temporary file renamed on success.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from qat.arch import ArchAdapter, get_arch
from qat.errors import ConfigError
from qat.export.common import float_weight_names, stored_shape, warn_unstored, weight_of, weight_spec
from qat.export.ggml_blocks import BLOCK, encode_blocks
from qat.export.gguf_check import CHECKSUM_KEY, PLACEHOLDER, seal_gguf
from qat.export.gguf_vocab import add_tokenizer
from qat.export.publish import atomic_export
from qat.formats import get_format, gguf_types
from qat.modules.quantized import QuantizedWeight
from qat.primitives import choose_qparams, compute_range

log = logging.getLogger(__name__)

MIXES = {"Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0",
         "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1"}  # llama.cpp file types: per-tensor rules
FALLBACK = {n: t.fallback for n, t in gguf_types().items() if t.fallback}  # as each format registers it
HEAD_RULES = ("IQ4_NL", "IQ4_XS", "MXFP4", "TQ1_0", "TQ2_0")  # llama_tensor_get_type's output / token_embd rules
MULTIPLIED = {n for n, t in gguf_types().items() if t.tensor_scale}  # written with a "<name>.scale" tensor


def export_arch(model: nn.Module, source: str | None = None) -> ArchAdapter:
    """The architecture adapter `model` is exported through (`source` names the model in the error).

    Raises:
        ValueError: an architecture with no adapter, listing the known ones, or a config its GGUF file
            cannot describe (`ArchAdapter.check_config`).
    """
    try:
        arch = get_arch(model, f" of {source}" if source else "")
    except ValueError as err:
        raise ConfigError(f"GGUF export: {err}") from None
    arch.check_config(model.config)
    return arch


def check_names(model: nn.Module, source: str | None = None) -> ArchAdapter:
    """`plan_types`' architecture and name checks alone: every weight of `model` has a GGUF tensor name.

    Returns:
        the model's architecture adapter.
    Raises:
        ValueError: an unknown architecture (naming `source`), or a parameter the GGUF layout has no place for.
    Example:
        >>> check_names(model, "'tiny'").gguf_arch_name
        'llama'
    """
    arch = export_arch(model, source)
    for name in float_weight_names(model):
        arch.gguf_parts(name, model.config)  # a fused MoE weight is two GGUF tensors: its parts are what is named
    return arch


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(name: str, shape: tuple[int, ...], mix: str, n_layer: int, tied: bool, imatrix: bool = False,
             pure: bool = False, n_expert: int = 0) -> str:
    """The tensor type llama.cpp's rules give GGUF tensor `name` in `mix` (before the row-size fallback).

    MoE (`n_expert` routed experts): the router ffn_gate_inp stays F32 (the converter writes it so and
    llama-quantize never quantizes it); ffn_down_exps follows ffn_down's layer rules; with exactly 8 experts
    attn_v and attn_k go to Q8_0 and, in the K mixes, attn_output to Q5_K (llama_tensor_get_type_impl).

    Example:
        >>> mix_type("token_embd.weight", (49152, 576), "Q4_0", 30, tied=True)
        'Q6_K'
    """
    if len(shape) == 1 or re.fullmatch(r"blk\.\d+\.ffn_gate_inp\.weight", name):
        return "F32"
    if mix in HEAD_RULES and not pure:
        # llama.cpp file types whose layer rules qat does not mirror still keep the output (and the tied
        # embedding) in Q6_K and, for the ternary types, the untied token embedding in Q4_K
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            return "Q6_K"
        if name == "token_embd.weight" and mix in ("TQ1_0", "TQ2_0"):
            return "Q4_K"
    if mix not in MIXES:
        return mix
    base = MIXES[mix]
    if pure:
        return base
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return base if base == "Q8_0" else "Q6_K"
    if n_expert == 8 and re.fullmatch(r"blk\.\d+\.attn_[kv]\.weight", name):
        return "Q8_0"
    if n_expert == 8 and mix in ("Q4_K_S", "Q4_K_M") and re.fullmatch(r"blk\.\d+\.attn_output\.weight", name):
        return "Q5_K"
    m = re.fullmatch(r"blk\.(\d+)\.(attn_v|attn_qkv|ffn_down)(?:_exps)?\.weight", name)
    if m:  # llama.cpp counts a fused attn_qkv (Phi-3) as an attn_v
        i, kind = int(m.group(1)), m.group(2).replace("attn_qkv", "attn_v")
        if mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n_layer):
            return "Q6_K"
        if mix == "Q4_K_S" and (i < 4 if kind == "attn_v" else i < n_layer // 8):
            return "Q5_K"
        if mix in ("Q4_0", "Q5_0") and imatrix and kind == "ffn_down" and i < n_layer // 8:
            return {"Q4_0": "Q4_1", "Q5_0": "Q5_1"}[mix]
    return base


def fit_type(type_name: str, row: int) -> str:
    """`type_name`, or llama.cpp's fallback when `row` is not a multiple of its block size.

    Example:
        >>> fit_type("Q4_K", 576)
        'Q5_0'
    """
    if row % BLOCK[type_name][0] == 0:
        return type_name
    new = FALLBACK.get(type_name, "F16")
    return "F16" if row % BLOCK[new][0] else new


def _warn_fallbacks(fallbacks: dict[tuple[str, str], list[str]]) -> None:
    for (old, new), names in sorted(fallbacks.items()):
        log.warning("GGUF: %d tensor(s) have rows that are not a multiple of %d, so %s falls back to %s "
                    "(as llama.cpp does): %s", len(names), BLOCK[old][0], old, new,
                    ", ".join(names[:4]) + (", ..." if len(names) > 4 else ""))


@dataclass
class _Entry:
    hf: str
    name: str
    type: str
    shape: tuple[int, ...]
    rows: tuple[int, int | None] = (0, None)  # the rows (dim -2) of the Hugging Face tensor this GGUF tensor holds
    full: tuple[int, ...] = ()  # the Hugging Face tensor's shape
    multiplier_of: str | None = None  # this is the per-tensor multiplier ("<name>.scale") of a tensor of this type


def _part(t: torch.Tensor, entry: _Entry) -> torch.Tensor:
    """The rows of `entry` from `t` (a weight, or its codes / scales, with rows first): the 2-D view of a 3-D
    expert weight ([E * O, ...]) is cut per expert and stays 2-D."""
    start, stop = entry.rows
    if start == 0 and stop is None:
        return t
    if tuple(t.shape) == entry.full:  # the weight itself
        return t[..., start:stop, :]
    if len(entry.full) != 3:
        return t[start:stop]
    return t.reshape(entry.full[0], -1, *t.shape[1:])[:, start:stop].reshape(-1, *t.shape[1:])


def _trained_type(spec, has_g_idx: bool = False, wanted: str | None = None) -> str | None:
    """The GGUF type a weight was trained / quantized on (its format's GGUF type), else None. `wanted`, the
    type asked for, is taken instead when it stores the same grid (TQ1_0 and TQ2_0 both hold the ternary g256)."""
    if spec is None or has_g_idx:
        return None
    trained = get_format(spec).gguf_type(spec)
    types = gguf_types()
    if trained is not None and wanted in types and types[wanted].spec() == types[trained].spec():
        return wanted
    return trained


def plan_types(model: nn.Module, gguf_type: str, imatrix: bool = False, pure: bool = False) -> list[_Entry]:
    """Every tensor's GGUF name, type and shape, checked before anything is written (`imatrix`, `pure`: as
    `mix_type`).

    Raises:
        ValueError: an unknown type or mix, an unknown architecture, or a parameter with no GGUF name.
    """
    config = model.config
    arch = export_arch(model)
    if gguf_type not in BLOCK and gguf_type not in MIXES:
        raise ConfigError(f"gguf_type={gguf_type!r}; choose a type {sorted(BLOCK)} or a mix {sorted(MIXES)}")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    entries, fallbacks, requantized, held = [], {}, {}, []
    for hf in float_weight_names(model):
        if tied and hf == "lm_head.weight":
            _warn_tied_head(model)
            continue
        spec, has_g_idx = weight_spec(model, hf)
        full = stored_shape(model, hf)
        for name, start, stop in arch.gguf_parts(hf, config):  # a fused MoE gate_up_proj is two GGUF tensors
            shape = full if stop is None and start == 0 else (*full[:-2], (stop or full[-2]) - start, full[-1])
            trained = _trained_type(spec, has_g_idx, gguf_type)
            type_name = trained or mix_type(name, shape, gguf_type, config.num_hidden_layers,
                                            tied, imatrix, pure, arch.n_experts(config))
            if type_name in MULTIPLIED and name == "token_embd.weight":
                # llama.cpp's row lookup applies no per-tensor scale (converted NVFP4 checkpoints keep it in 16 bits)
                log.warning("GGUF: token_embd.weight is written in F16, not %s, whose per-tensor scale llama.cpp "
                            "does not apply to the embedding lookup", type_name)
                type_name = "F16"
            if len(shape) > 1 and (fitted := fit_type(type_name, shape[-1])) != type_name:
                fallbacks.setdefault((type_name, fitted), []).append(name)
                type_name = fitted
            if spec is not None and spec.static_global and trained == type_name:
                held.append(name)
            if spec is not None and trained != type_name:
                why = ("its trained GGUF type does not fit these rows" if trained
                       else "not a GGUF grid: a gguf_* recipe exports exactly")
                requantized.setdefault(f"{spec.describe()} weights ({why})", []).append(f"{name} ({type_name})")
            entries.append(_Entry(hf, name, type_name, shape, (start, stop), full))
            if type_name in MULTIPLIED:  # NVFP4: its global scale, one per tensor (per expert: all the same)
                entries.append(_Entry(hf, name.removesuffix(".weight") + ".scale", "F32", tuple(shape[:-2]) or (1,),
                                      (start, stop), full, multiplier_of=type_name))
    _warn_fallbacks(fallbacks)
    if held:
        log.warning("GGUF: %d NVFP4 tensor(s) hold a global that is not a power of two (read from another tool's "
                    "checkpoint): written with the same values (E4M3 block scales times a power of two, E2M1 codes "
                    "re-encoded) under the multiplier 1 / G (over that power of two) rounded to float32, which "
                    "llama.cpp applies to the matmul output: within a float32 rounding of "
                    "the loaded weights, not bit-exact: %s", len(held),
                    ", ".join(held[:4]) + (", ..." if len(held) > 4 else ""))
    for scheme, names in requantized.items():
        log.warning("GGUF: %d tensor(s) hold %s; dequantized and re-quantized to their GGUF type, "
                    "not format-exact: %s", len(names), scheme,
                    ", ".join(names[:4]) + (", ..." if len(names) > 4 else ""))
    return entries


def _warn_tied_head(model: nn.Module) -> None:
    """A tied model has one GGUF tensor, token_embd, written from the embedding: a quantized lm_head whose grid
    the embedding does not share exactly (another scheme, or scales of its own: learned, pinned) is not in the file."""
    head = weight_spec(model, "lm_head.weight")[0]
    if head is None:
        return
    names = {id(m): n for n, m in model.named_modules()}
    embed = weight_spec(model, f"{names[id(model.get_input_embeddings())]}.weight")[0]
    quantizer = getattr(model.get_output_embeddings(), "weight_quantizer", None)
    own = head.learn != "none" or bool(getattr(quantizer, "pinned", False))
    if embed == head and not own:
        return
    log.warning("GGUF: lm_head is tied to the embedding, and GGUF stores one tensor for both (token_embd), written "
                "from the embedding (%s): lm_head's trained %s grid%s is not in the file, so the output logits are "
                "not format-exact; quantize the embedding on the same grid (targets: [Linear, Embedding]) with scales "
                "from the weights, or leave lm_head out (ignore: [lm_head])", "float" if embed is None else
                embed.describe(), head.describe(), " and its own scales" if own else "")


def _multiplier(model: nn.Module, entry: _Entry) -> np.ndarray:
    """The "<name>.scale" tensor of a weight in a type with a per-tensor multiplier: from the weight's own
    scales (trained on the type's grid) or from the type's qparams of the float weight (what `encode` takes)."""
    arch, config, t = export_arch(model), model.config, gguf_types()[entry.multiplier_of]
    weight_name = entry.name.removesuffix(".scale") + ".weight"
    part = lambda x: arch.to_gguf(weight_name, _part(x, entry), config)  # noqa: E731
    w = weight_of(model, entry.hf)
    held = w.stored_global() if isinstance(w, QuantizedWeight) else None
    if held is not None:  # 1 / G of a held global, rounded once (a power of two times it: exact on top)
        return np.full(entry.shape, float((t.tensor_scale(part(held[0])) / held[1])[0]), dtype=np.float32)
    if isinstance(w, QuantizedWeight) and _trained_type(w.spec, w.group_index() is not None, t.name) == t.name:
        scale = part(w.qparams()[0])
    else:
        w = w.dequantize(torch.float32).reshape(entry.full) if isinstance(w, QuantizedWeight) else w.detach().float()
        flat = part(w.cpu()).reshape(-1, entry.full[-1])
        spec = t.spec()
        scale = choose_qparams(*compute_range(flat, spec), spec)[0]
    m = t.tensor_scale(scale).float().cpu().numpy()
    return np.full(entry.shape, m[0], dtype=np.float32)


def _tensor_bytes(model: nn.Module, entry: _Entry, importance: dict | None = None) -> np.ndarray:
    if entry.multiplier_of:
        return _multiplier(model, entry)
    arch, config = export_arch(model), model.config
    w = weight_of(model, entry.hf)
    perm = lambda t: arch.to_gguf(entry.name, _part(t, entry), config)  # noqa: E731  (codes, scales, weights)
    if isinstance(w, QuantizedWeight) and _trained_type(w.spec, w.group_index() is not None, entry.type) == entry.type:
        scale, zero_point = (None if t is None else t.cpu() for t in w.qparams())  # the block writers run on the CPU
        held = w.stored_global()
        if held is not None:  # the stored E4M3 block scales, relative to the multiplier (`_multiplier`)
            scale = held[0].cpu()
        zp = None if zero_point is None else perm(zero_point)
        return gguf_types()[entry.type].blocks(perm(w.codes().cpu()), perm(scale), zp).numpy()
    if isinstance(w, QuantizedWeight):  # plan_types warned (once for all such tensors)
        w = w.dequantize(torch.float32).reshape(entry.full)  # an expert weight's 2-D view back to [E, O, I]
    w = perm(w.detach().float().cpu())  # a model on a GPU: the encoders and the writer work on the CPU
    if len(entry.full) == 3:
        w = w.reshape(entry.shape)
    if entry.type == "F32":
        return w.numpy()
    if w.ndim == 1:
        w = w.unsqueeze(0)
    imp = (importance or {}).get(entry.hf)
    return encode_blocks(w, entry.type, None if imp is None else imp.cpu()).numpy()


def export_gguf(model: nn.Module, path: str | os.PathLike, gguf_type: str = "Q8_0", tokenizer=None,
                importance: dict[str, torch.Tensor] | None = None, pure: bool = False,
                overwrite: bool = True) -> Path:
    """Write `model` (float, prepared or converted; an architecture of `qat.arch`) as a GGUF file.

    Args:
        model: a Hugging Face causal LM whose model_type has an adapter in `qat.arch` (docs/models.md).
        path: the .gguf file to write (atomically).
        gguf_type: a tensor type or a mix (see the module docstring).
        tokenizer: a Hugging Face byte-level BPE tokenizer to embed (llama.cpp needs one to run).
        importance: {"<module>.weight": mean x^2 per input column} from `qat.export.imatrix.collect_importance`,
            to weigh the K-quant fits of float weights (an imatrix).
        pure: every 2-D tensor in `gguf_type` itself (llama-quantize --pure), not llama.cpp's per-tensor rules.
        overwrite: replace an existing file (it stays whole until the new one is); else refuse it
            (`qat.export.publish.atomic_export`).
    Returns:
        the path written.
    Raises:
        ValueError: unknown architecture / type, a parameter with no GGUF name, an unwritable path.
    Example:
        >>> export_gguf(model, "out/m.gguf", "Q4_K_M", tokenizer=tok)
    """
    entries = plan_types(model, gguf_type, importance is not None, pure)  # float, prepared or converted: weights are taken one at a time
    warn_unstored(model, "GGUF", stores_input=False)
    path = Path(path)
    with atomic_export(path, overwrite) as tmp, torch.no_grad():
        arch = export_arch(model)
        writer = gguf.GGUFWriter(str(tmp), arch.gguf_arch_name)
        _write_metadata(writer, arch, model.config, gguf_type, path.stem)
        writer.add_string(CHECKSUM_KEY, PLACEHOLDER)  # sealed below: qat's loader refuses an edited file
        if tokenizer is not None:
            add_tokenizer(writer, tokenizer, pre=arch.tokenizer_pre, n_vocab=model.config.vocab_size)
        else:
            log.warning("%s: written without a tokenizer; llama.cpp and Ollama refuse such files "
                        "(tokenizer.ggml.model is required): pass a Hugging Face tokenizer (tokenizer=<folder>) to embed one", path)
        extra = arch.extra_tensors(model.config)  # generated from the config (Llama 3's rope_freqs): F32, first
        for name, t in extra.items():             # as the converter writes them
            writer.add_tensor_info(name, tuple(t.shape), np.dtype(np.float32), t.numel() * 4)
        for e in entries:
            raw = None if e.type in ("F32", "F16") else gguf.GGMLQuantizationType[e.type]
            nbytes = int(np.prod(e.shape)) // BLOCK[e.type][0] * BLOCK[e.type][1]
            dtype = {"F32": np.float32, "F16": np.float16}.get(e.type, np.uint8)
            shape = e.shape if raw is None else (*e.shape[:-1], e.shape[-1] // BLOCK[e.type][0] * BLOCK[e.type][1])
            writer.add_tensor_info(e.name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in extra.values():
            writer.write_tensor_data(t.float().cpu().numpy())
        for e in entries:
            data = _tensor_bytes(model, e, importance)
            writer.write_tensor_data(data.view(np.float16) if e.type == "F16" else data)
        writer.close()
        seal_gguf(tmp)
    return path


def _write_metadata(writer, arch: ArchAdapter, config, gguf_type: str, name: str) -> None:
    writer.add_name(name)
    arch.write_metadata(writer, config)
    # a single K type has no file type of its own: write the one llama.cpp's loader guesses for such a file
    # (Ollama shows general.file_type as the quantization label, "unknown" without it)
    label = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}.get(gguf_type, gguf_type)
    ftype = getattr(gguf.LlamaFileType, "MOSTLY_" + label, None) or getattr(gguf.LlamaFileType, "ALL_" + label, None)
    if ftype is not None:
        writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
