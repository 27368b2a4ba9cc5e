"""One loader for everything qat writes or imports: `load_any(path)`.

    native export folder (qat_quant.json)        -> QuantizedLinear model (load_native)
    compressed-tensors folder (pack-quantized)    -> QuantizedLinear model (load_compressed_tensors)
    GPTQ folder (quantize_config.json)            -> QuantizedLinear model (load_gptq)
    .gguf file                                    -> float model, dequantized (load_gguf)
    .bin / .pt / .pth file (config.json beside)   -> float model, torch.load(weights_only=True) only
    Hugging Face folder / .safetensors / "tiny"   -> float model (qat.models.load_model)

`quantize_on_load(model, recipe)` quantizes a float model in flight (no calibration: weight ranges
from the weights, activation ranges dynamic), as vLLM's quantization="fp8" does.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qat.errors import BadFileError, ConfigError
from qat.export.compressed import load_compressed_tensors
from qat.export.gguf_check import scan_gguf
from qat.export.gguf_import import load_gguf
from qat.export.gptq import load_gptq
from qat.export.native import load_native
from qat.export.validate import bad_file, check_config, read_json
from qat.io import check_safetensors, load_torch_checkpoint
from qat.models import ByteTokenizer, load_model, load_tokenizer, resolve_dtype
from qat.testing import cast_as_loaded
from qat.transform import as_recipe, convert, prepare

TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def detect_format(path: str | os.PathLike) -> str:
    """"native", "compressed_tensors", "gptq", "gguf", "torch" or "hf" for a path; "hf" covers aliases.

    Example:
        >>> detect_format("out/model.gguf")
        'gguf'
    """
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf"
        if p.suffix in TORCH_SUFFIXES:
            return "torch"
        return "hf"
    if (p / "qat_quant.json").is_file():
        return "native"
    if (p / "quantize_config.json").is_file():
        return "gptq"
    config = p / "config.json"
    if config.is_file():
        q = read_json(config, "model config").get("quantization_config") or {}
        q = q if isinstance(q, dict) else {}
        if q.get("quant_method") == "compressed-tensors":
            return "compressed_tensors"
        if q.get("quant_method") == "gptq":
            return "gptq"
        if not any(p.glob("*.safetensors")) and any(p.glob("*.bin")):
            return "torch"
    return "hf"


def load_torch_file(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model from a .bin / .pt state dict (weights-only unpickling) and the config.json beside it.

    Raises:
        FileNotFoundError: no config.json beside the file. ValueError: a pickle that needs code, a
            truncated file, or weights that do not fit the config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"{str(p)!r}: no .bin checkpoint inside")
        state = {}
        for f in files:
            state.update(load_torch_checkpoint(f))
        folder = p
    else:
        folder, state = p.parent, load_torch_checkpoint(p)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(p)!r}: needs the model's config.json beside it")
    config = AutoConfig.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k.removeprefix("model.") if k.startswith("model.model.") else k: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{str(p)!r}: weights do not fit config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()


def load_any(path: str | os.PathLike, dtype: str | torch.dtype = "float32", **tiny_kwargs) -> nn.Module:
    """Load any export or starting checkpoint (see the module docstring) in eval mode.

    Args:
        dtype: of a float checkpoint (GGUF, .bin, Hugging Face folder), as a checkpoint of that dtype loads (RoPE's
            inv_freq stays float32: `qat.testing.cast_as_loaded`); quantized exports load in the dtype they were
            stored in.
    Raises:
        FileNotFoundError / ValueError: from the format's loader, naming the file and the problem.
    Example:
        >>> model = load_any("out/model-Q4_K_M.gguf")
    """
    fmt = detect_format(path)
    if fmt == "native":
        return load_native(path)
    if fmt == "compressed_tensors":
        return load_compressed_tensors(path)
    if fmt == "gptq":
        return load_gptq(path)
    if fmt == "gguf":
        return cast_as_loaded(load_gguf(path), resolve_dtype(dtype))  # RoPE's inv_freq stays float32
    if fmt == "torch":
        return check_parameters(load_torch_file(path, resolve_dtype(dtype)), path)
    p = Path(path).expanduser()
    files = [p] if p.is_file() and p.suffix == ".safetensors" else sorted(p.glob("*.safetensors")) if p.is_dir() else []
    for f in files:
        refuse_incomplete_export(f, check_safetensors(f))
    if p.is_dir() and (p / "config.json").is_file():
        from transformers import AutoConfig

        with bad_file(p, "model folder"):
            read_json(p / "config.json", "model config")
            check_config(AutoConfig.from_pretrained(str(p)), p)
    return check_parameters(load_model(path, dtype, **tiny_kwargs), p)


def check_parameters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Refuse a loaded float model with a NaN or infinite parameter (a corrupted checkpoint), naming `path`."""
    bad = [n for n, t in model.named_parameters() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise BadFileError(path, f"the stored weights hold NaN or infinite values: {bad[:5]}")
    return model


# tensor names only quantized exports hold (native, compressed-tensors, GPTQ): a plain model never has them
_PACKED = (".qweight.packed", ".weight_packed", ".weight_scale", ".qweight", ".qzeros", ".scales")


def refuse_incomplete_export(path: str | os.PathLike, header: dict) -> None:
    """Refuse a safetensors file of a quantized export whose folder lacks the description that says how to read it
    (an interrupted or edited export: native without qat_quant.json, compressed-tensors or GPTQ without their
    quantization_config): loaded as a plain model, its packed tensors would be ignored and the weights random.

    Raises:
        BadFileError: naming the file and what the folder lacks.
    """
    meta = header.get("__metadata__", {})
    packed = sorted(k for k in header if k.endswith(_PACKED))
    if meta.get("qat") == "qat-native" or packed:
        what = "a qat native export" if meta.get("qat") == "qat-native" else f"packed quantized tensors ({packed[0]}, ...)"
        raise BadFileError(path, f"holds {what}, but its folder has no qat_quant.json / quantization_config to read "
                                 "them with: an incomplete (interrupted) or edited export; export it again")


def load_any_tokenizer(path: str | os.PathLike):
    """The tokenizer stored with an export (folder files, or a GGUF's vocabulary); None if there is none."""
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        scan_gguf(p)  # transformers' GGUF tokenizer reader trusts the file's counts: check them first
    try:
        if p.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        if str(path) in ("tiny", "tiny-llama"):
            return ByteTokenizer()

        return load_tokenizer(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def in_flight_recipe(recipe, advice: str = "use a dynamic scheme, or quantize with qat-ptq"):
    """The recipe (a name, file, mapping or QuantRecipe) checked for in-flight use, before any model loads;
    `advice` ends the refusal (what the caller's user can do instead).

    Raises:
        ValueError: an unknown recipe, or one with static activation or KV ranges (they need calibration).
    Example:
        >>> in_flight_recipe("fp8_dynamic").name
        'fp8_dynamic'
    """
    recipe = as_recipe(recipe)
    for role in ("input", "kv_cache"):
        spec = getattr(recipe.base, role)
        if spec is not None and not spec.dynamic:
            raise ConfigError(f"quant: recipe {recipe.name!r} has a static {role} scheme ({spec.describe()}), which "
                              f"needs calibration (a float model quantized on load gets none); {advice}")
    return recipe


def quantize_on_load(model: nn.Module, recipe) -> nn.Module:
    """Quantize a float model in flight: prepare with `recipe` (a name, file or mapping), then convert
    (no calibration).

    Raises:
        ValueError: a recipe with static activation or KV ranges (they need calibration: use qat-ptq).
    Example:
        >>> model = quantize_on_load(load_any("smollm2-135m"), qat.load_recipe("fp8_dynamic"))
    """
    return convert(prepare(model, in_flight_recipe(recipe))).eval()
