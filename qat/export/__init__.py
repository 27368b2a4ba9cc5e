"""Export to formats runtimes load, and import from them.

    from qat.export import export, load_any
    export(model, "out/m.gguf", format="gguf", gguf_type="Q4_K_M", tokenizer=tok)
    model = load_any("out/m.gguf")

Formats: "native" (qat's safetensors + JSON), "compressed_tensors" (pack-quantized, vLLM / transformers),
"gptq" (v1 qweight/qzeros/scales/g_idx), "gguf" (llama.cpp / Ollama). See docs/export.md.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from qat.errors import ConfigError
from qat.export import compressed, gptq
from qat.export.compressed import export_compressed_tensors, load_compressed_tensors
from qat.export.gguf_export import MIXES, export_gguf
from qat.export.gguf_import import load_gguf
from qat.export.gptq import export_gptq, load_gptq
from qat.export.imatrix import collect_importance
from qat.export.load import detect_format, load_any, load_any_tokenizer, quantize_on_load
from qat.export.native import load_native, save_native
from qat.testing import rounded_rope
from qat.transform import QuantRecipe
from qat.transform.match import EXPERTS_PATTERNS

log = logging.getLogger(__name__)
FORMATS = ("native", "compressed_tensors", "gptq", "gguf")

__all__ = ["FORMATS", "MIXES", "export", "save_native", "load_native", "export_gguf", "load_gguf",
           "export_compressed_tensors", "load_compressed_tensors", "export_gptq", "load_gptq", "load_any",
           "load_any_tokenizer", "detect_format", "quantize_on_load", "collect_importance", "check_recipe_format"]
_SCHEME_CHECKS = {"compressed_tensors": compressed.check_schemes, "gptq": gptq.check_schemes}  # the writers' own


def check_recipe_format(recipe: QuantRecipe, format: str, experts: bool = False) -> None:
    """Refuse a recipe whose schemes (its base and each override's) `format` cannot hold, before anything loads.

    Native holds every scheme; GGUF quantizes by its own types. The checks are the writers' own
    (`check_schemes` of `qat.export.compressed` / `qat.export.gptq`), so a recipe passed here is not refused
    by the writer for its schemes (model-dependent refusals, such as GPTQ's quantized embeddings, remain).
    `experts`: the model has fused MoE experts (`qat.models.has_fused_experts`); the schemes that reach them
    (targets Linear / Experts or a pattern naming experts) are checked as compressed-tensors writes experts (int only).
    Raises:
        ConfigError: naming the recipe, its key and what the format takes.
    Example:
        >>> check_recipe_format(load_recipe("w8a8_static"), "compressed_tensors")  # ConfigError: static input
    """
    check = _SCHEME_CHECKS.get(format)
    if check is None:
        return
    where = f"recipe {recipe.name!r}"
    on_experts = experts and format == "compressed_tensors"
    by_override = [on_experts and _selects_experts(o.targets) for o in recipe.overrides]
    base_on_experts = (on_experts and _selects_experts(recipe.targets) and not _selects_experts(recipe.ignore)
                       and not any(by_override))  # an override naming the experts replaces the base's scheme there
    compressed.check_schemes(recipe.base, where, base_on_experts) if on_experts else check(recipe.base, where)
    for i, override in enumerate(recipe.overrides):
        key = f"{where} overrides[{i}] ({', '.join(override.targets)})"
        if on_experts:
            compressed.check_schemes(override.apply(recipe.base, key), key, by_override[i])
        else:
            check(override.apply(recipe.base, key), key)


def _selects_experts(patterns) -> bool:
    """Whether module patterns may select fused experts: the class names that do, or a pattern naming experts."""
    return any(p in EXPERTS_PATTERNS or ("experts" in p.lower() and "shared_expert" not in p.lower())
               for p in patterns)  # shared experts (Qwen2-MoE `shared_expert`, DeepSeek `shared_experts`) are Linear


def export(model: nn.Module, output: str | os.PathLike, format: str = "native", gguf_type: str = "Q8_0",
           tokenizer=None, importance: dict | None = None, gguf_pure: bool = False,
           overwrite: bool = True) -> Path:
    """Write `model` (float for GGUF; prepared or converted for every format) to `output`.

    Args:
        model: the model.
        output: a folder (native, compressed_tensors, gptq) or a .gguf file.
        format: one of FORMATS.
        gguf_type: GGUF tensor type or mix (format="gguf" only).
        tokenizer: saved with the export when given.
        importance: per-linear input importances (`collect_importance`, llama.cpp's imatrix) that weigh
            the K-quant fits; format="gguf" only.
        gguf_pure: every GGUF tensor in `gguf_type` (llama-quantize --pure) instead of llama.cpp's rules.
        overwrite: replace an existing export, which stays whole until the new one is complete; else refuse
            it. Every export is written under a temporary name beside `output` and renamed into place, under a
            lock that refuses a concurrent export to the same output (`qat.export.publish`).
    Raises:
        ValueError: an unknown format (listing the valid ones) and everything the writers raise.
    Example:
        >>> export(qat.prepare(model, qat.load_recipe("gguf_q4_0")), "out/m.gguf", "gguf", "Q4_0")
    """
    if format not in FORMATS:
        raise ConfigError(f"export format={format!r}; choose from {list(FORMATS)}")
    if rounded := rounded_rope(model):
        log.warning("export: %s is %s (a plain model.to(dtype) rounded it); every loader computes RoPE's frequencies "
                    "in float32, so the reloaded model's logits differ slightly from this model's although the "
                    "weights are exact: cast as a checkpoint loads (qat.testing.cast_as_loaded) for an exact reload",
                    rounded[0], dict(model.named_buffers())[rounded[0]].dtype)
    if format == "gguf":
        return export_gguf(model, output, gguf_type, tokenizer=tokenizer, importance=importance, pure=gguf_pure,
                           overwrite=overwrite)
    if importance is not None:
        raise ConfigError(f"importance (imatrix) weighs GGUF K-quant fits; it needs format='gguf', not {format!r}")
    writer = {"native": save_native, "compressed_tensors": export_compressed_tensors, "gptq": export_gptq}[format]
    return writer(model, output, tokenizer=tokenizer, overwrite=overwrite)
