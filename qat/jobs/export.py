"""The qat-export job: any checkpoint or export -> native / compressed-tensors / GPTQ / GGUF, every value checked
before the model loads (plain functions; the CLI only composes the config).

    run_export("smollm2-135m", "out/m.gguf", format="gguf", gguf_type="Q4_K_M")
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.data import build_blocks
from qat.errors import BadFileError, ConfigError, UserError
from qat.export import FORMATS, MIXES, check_recipe_format
from qat.export import export as _export
from qat.export.common import integer_modules
from qat.export.ggml_blocks import BLOCK, WEIGHTED
from qat.export.gguf_export import check_names
from qat.export.imatrix import collect_importance
from qat.export.load import in_flight_recipe, load_any, quantize_on_load
from qat.io import (check_creatable, is_distributed_checkpoint, load_safetensors, load_torch_checkpoint,
                    save_safetensors)
from qat.jobs.config import EXPORT, EXPORT_CALIBRATION, as_bool, as_count, check_keys
from qat.jobs.eval import corpus_config, tokenizer_for
from qat.jobs.measure import file_bits_per_weight
from qat.models import has_fused_experts
from qat.recipes import recipe_names
from qat.transform.recipe import load_recipe
from qat.transform import QuantRecipe, as_recipe, convert, prepare
from qat.transform.rotations.learned import learned_rotations_in, load_learned_rotations

log = logging.getLogger(__name__)


def _read_checkpoint(model: nn.Module, checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in `checkpoint`, with a Lightning wrapper's key prefix removed, checked against the
    float `model`'s parameter shapes (a checkpoint of another model is named before `prepare` complains
    about every layer)."""
    path = Path(checkpoint)
    try:
        state = load_safetensors(path) if path.suffix == ".safetensors" else load_torch_checkpoint(path)
    except (UserError, FileNotFoundError):
        raise
    except ValueError as err:  # the readers name the file and what is wrong with it
        raise BadFileError(path, f"checkpoint= cannot be read: {err}") from None
    own = model.state_dict()
    if not set(own) & set(state):  # a Lightning checkpoint prefixes the wrapped model's keys
        for prefix in ("model.", "net.", "module."):
            if set(own) & {k.removeprefix(prefix) for k in state}:
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                break
    wrong = [f"{k}: {tuple(v.shape)} there, {tuple(own[k].shape)} here" for k, v in state.items()
             if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ConfigError(f"checkpoint {str(path)!r} is for another model than this one (set model= to the model it "
                         f"was trained from): " + "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""))
    return state


def _load_checkpoint_into(model: nn.Module, state: dict[str, torch.Tensor], checkpoint: str | os.PathLike) -> None:
    """Load `state` into the prepared `model`; learned rotations saved unfused (a QAT run with
    module.learned_rotations) are attached, loaded and fused as the run fused them when fit ended."""
    rotated = learned_rotations_in(model, state)
    missing, unexpected = load_learned_rotations(model, state)
    if missing or unexpected:
        hint = (f"a checkpoint with learned rotations {rotated}: same base model and quant recipe as in training?"
                if rotated else "same base model and quant recipe as in training?")
        raise ConfigError(f"checkpoint {str(checkpoint)!r} does not fit the prepared model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} ({hint})")


def prepare_source(model: str, quant: Any = None, checkpoint: str | None = None, dtype: str = "float32",
                   tiny: dict | None = None, format: str = "native") -> nn.Module:
    """The model to export: `model` loaded by `load_any`; with `quant`, prepared with that recipe and,
    with `checkpoint` (a QAT / PTQ state dict), loaded from it; else quantized in flight (RTN). `format` (the
    export's) is named in the advice for a static recipe without a checkpoint.

    Raises:
        ValueError: a checkpoint without a recipe, or one that does not fit.
    """
    if quant is None and checkpoint is not None:
        raise ConfigError("export: checkpoint= needs quant=<the recipe it was trained with>")
    if checkpoint is not None and not (Path(checkpoint).expanduser().is_file()
                                       or is_distributed_checkpoint(Path(checkpoint).expanduser())):
        raise FileNotFoundError(f"checkpoint={str(checkpoint)!r} does not exist; give the state dict of a QAT / PTQ "
                                "run (.ckpt / .pt / .safetensors, or a sharded FSDP checkpoint folder)")
    if quant is not None and checkpoint is None:  # checked before the model loads
        name = quant if isinstance(quant, (str, os.PathLike)) else as_recipe(quant).name
        name = name if str(name) in recipe_names() or "/" in str(name) else "<the same recipe file>"  # a quant=<path>
        recipe = in_flight_recipe(quant, "give checkpoint=<a calibrated qat-ptq / qat-train checkpoint> with it, "
                                         f"or quantize and export in one run: qat-ptq quant={name} export={format}")
    elif quant is not None:
        recipe = load_recipe(quant) if isinstance(quant, (str, os.PathLike)) else QuantRecipe.from_dict(quant)
    loaded = load_any(model, dtype, **(tiny or {}))
    if quant is None:
        return loaded
    if checkpoint is None:
        return quantize_on_load(loaded, recipe)
    state = _read_checkpoint(loaded, checkpoint)
    prepared = prepare(loaded, recipe)
    _load_checkpoint_into(prepared, state, checkpoint)
    return convert(prepared)


IMATRIX_TYPES = tuple(sorted(WEIGHTED))  # the fits an imatrix weighs, as each format registers it
CALIBRATION = {"samples": 32, "seq_len": 256, "split": "train", "batch_size": 4, "save": None}


def check_imatrix(imatrix: str | None, format: str, data: Any, calibration: dict | None) -> dict:
    """Check the imatrix options before anything is loaded; return the calibration settings with defaults.

    Raises:
        ValueError: imatrix with a format other than gguf, "calibrate" without data, an unknown calibration
            key, or a value that is neither null, "calibrate" nor an existing .safetensors file.
    Example:
        >>> check_imatrix("calibrate", "gguf", "wiki", {"samples": 16})["seq_len"]
        256
    """
    check_keys(calibration or {}, EXPORT_CALIBRATION, "calibration")
    cal = {**CALIBRATION, **(calibration or {})}
    if imatrix is None:
        return cal
    if format != "gguf":
        raise ConfigError(f"imatrix={imatrix!r} weighs GGUF K-quant fits; it needs format=gguf (got format={format!r})")
    if imatrix == "calibrate":
        if not data:
            raise ConfigError("imatrix=calibrate needs calibration text: data=<corpus> (e.g. data=fixture, data=wiki)")
        for key, least in (("samples", 1), ("seq_len", 2), ("batch_size", 1)):
            as_count(cal[key], f"calibration.{key}", least)
        return cal
    path = Path(str(imatrix)).expanduser()
    if path.suffix != ".safetensors" or not path.is_file():
        raise ConfigError(f"imatrix={imatrix!r}: choose null, 'calibrate', or an existing .safetensors file of "
                         "importances (written by imatrix=calibrate calibration.save=<file>)")
    return cal


def load_importance(path: str | os.PathLike, model: nn.Module) -> dict[str, torch.Tensor]:
    """Importances saved by `importance_for` (calibration.save), checked against `model`'s linear layers.

    Raises:
        ValueError: tensors that name no linear layer of the model, or whose length is not its in_features.
    """
    found = load_safetensors(path)
    expected = {f"{n}.weight": m.in_features for n, m in model.named_modules() if n and hasattr(m, "in_features")}
    bad = [f"{k} (no such linear layer)" for k in sorted(set(found) - set(expected))]
    bad += [f"{k} (shape {tuple(v.shape)}, expected ({expected[k]},))" for k, v in sorted(found.items())
            if k in expected and tuple(v.shape) != (expected[k],)]
    if bad or not found:
        raise ConfigError(f"imatrix file {str(path)!r} does not fit the model:\n  - " + "\n  - ".join(bad or ["it is empty"]))
    return {k: v.float() for k, v in found.items()}


def importance_for(model: nn.Module, imatrix: str | None, data: Any, cal: dict, tokenizer: Any,
                   gguf_type: str) -> dict[str, torch.Tensor] | None:
    """The importances to export with: None, collected now on `data` (imatrix="calibrate"; saved to
    cal["save"] when set), or read from the file `imatrix`.

    Raises:
        ValueError: an empty corpus split, or a file that does not fit the model.
    """
    if imatrix is None:
        return None
    if not any(t in gguf_type for t in IMATRIX_TYPES):
        log.warning("imatrix: gguf_type=%s has no %s tensors; the importances change nothing", gguf_type, "/".join(IMATRIX_TYPES))
    if imatrix != "calibrate":
        return load_importance(imatrix, model)
    corpus = corpus_config(data, int(cal["seq_len"]), None)
    corpus.max_train_blocks = int(cal["samples"])
    blocks = build_blocks(corpus, tokenizer, splits=[cal["split"]]).get(cal["split"])
    if blocks is None or not len(blocks):
        raise ConfigError(f"imatrix=calibrate: {corpus.path} gives no {cal['split']!r} blocks of {cal['seq_len']} tokens")
    rows = int(cal["batch_size"])
    importance = collect_importance(model, [blocks[i:i + rows] for i in range(0, len(blocks), rows)])
    if cal["save"]:
        save_safetensors(importance, cal["save"], metadata={"format": "qat-imatrix", "tokens": str(blocks.numel())})
    return importance


def gguf_type_error(gguf_type: Any) -> str | None:
    """Why `gguf_type` is no GGUF tensor type or mix qat writes (listing the valid ones); None when it is one."""
    if gguf_type in BLOCK or gguf_type in MIXES:
        return None
    return f"gguf_type={gguf_type!r}; choose a type {sorted(BLOCK)} or a mix {sorted(MIXES)}"


def check_output(output: str | os.PathLike, format: str, gguf_type: str, overwrite: bool = False) -> Path:
    """Check the format, the GGUF type and the output path before anything is loaded.

    Args:
        overwrite: replace an existing output (a file, or a folder that is not empty); else refuse it.
    Returns:
        the output path (nothing is created).
    Raises:
        ValueError: an unknown format or GGUF type (listing the valid ones), an output that is not
            writable, or one that exists without overwrite.
    Example:
        >>> check_output("out/m.gguf", "gguf", "Q4_K_M")
        PosixPath('out/m.gguf')
    """
    if format not in FORMATS:
        raise ConfigError(f"export format={format!r}; choose from {list(FORMATS)}")
    if format == "gguf" and (why := gguf_type_error(gguf_type)):
        raise ConfigError(why)
    out = Path(output).expanduser()
    exists = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if exists and not overwrite:
        raise ConfigError(f"output {str(out)!r} already exists; pass overwrite=true to replace it, or choose another output")
    if format == "gguf" and out.is_dir():
        raise ConfigError(f"output path {str(out)!r} is a folder; format=gguf writes a file: give a file name")
    if format != "gguf" and out.is_file():
        raise ConfigError(f"output {str(out)!r} is a file; format={format} writes a folder")
    return check_creatable(out)  # creating nothing: a failed run leaves no empty folders behind


def _check_source(source: nn.Module, model: str, format: str, gguf_type: str) -> None:
    """What the writer would refuse, said before any calibration: GGUF's architecture, no quantized weights."""
    if format == "gguf":  # plan_types' checks without its fallback warnings (the writer gives those)
        check_names(source, repr(model))
    elif not integer_modules(source):
        raise ConfigError(f"format={format} stores quantized weights, and model.path={model!r} loaded as a float model: "
                         "pass quant=<recipe> (e.g. quant=w4a16_g128) or a quantized export as model.path")


def run_export(model: str, output: str, format: str = "native", gguf_type: str = "Q8_0", quant: Any = None,
               checkpoint: str | None = None, tokenizer: str | None = None, dtype: str = "float32",
               tiny: dict | None = None, imatrix: str | None = None, data: str | dict | None = None,
               calibration: dict | None = None, overwrite: bool = False, gguf_pure: bool = False) -> dict:
    """Load, (quantize,) export; returns {"output", "format", "bytes", "file_bits_per_param", "seconds"} (+ "imatrix").
    `file_bits_per_param` is the whole file (float tensors, metadata, tokenizer) per model parameter, not the bits
    per quantized weight that `qat.summary` and the job rows report.

    Args:
        imatrix: format=gguf only: None, "calibrate" (collect importances now from `data`, see
            `importance_for`), or a .safetensors file of importances written by an earlier run.
        data / calibration: the corpus and {samples, seq_len, split, batch_size, save} for imatrix="calibrate".
        overwrite: replace an existing output (else it is refused before anything is loaded).
        gguf_pure: format=gguf: every tensor in `gguf_type` (llama-quantize --pure), not llama.cpp's rules.
    Raises:
        ValueError: a bad format, GGUF type, output path or imatrix / calibration value (before any model is
            loaded); an architecture the GGUF writer does not know or a float model for a quantized format
            (before calibration); and what the writers raise.
    Example:
        >>> run_export("tiny", "out/tiny.gguf", format="gguf", gguf_type="Q8_0")
    """
    start = time.perf_counter()
    check_output(output, format, gguf_type, overwrite)
    if quant is not None:  # the writer's refusal of the recipe's schemes, before the model loads
        check_recipe_format(as_recipe(quant), format, has_fused_experts(model))
    calibration = check_imatrix(imatrix, format, data, calibration)
    tok = tokenizer_for(tokenizer, model)
    source = prepare_source(model, quant, checkpoint, dtype, tiny, format)
    _check_source(source, model, format, gguf_type)
    importance = importance_for(source, imatrix, data, calibration, tok, gguf_type)
    tok = stored_tokenizer(tok, model, output, format)
    out = _export(source, output, format, gguf_type, tokenizer=tok, importance=importance, gguf_pure=gguf_pure,
                  overwrite=overwrite)
    size, bpw = file_bits_per_weight(out, source)
    result = {"output": str(out), "format": format, "bytes": size, "file_bits_per_param": round(bpw, 3),
              "seconds": round(time.perf_counter() - start, 2)}
    if imatrix is not None:
        result["imatrix"] = str(imatrix)
    return result


def stored_tokenizer(tok: Any, model: str, output: Any, format: str) -> Any:
    """The tokenizer an export stores: `tok`, or None with a warning saying why (qat's byte-level stand-in of the
    tiny models has no vocabulary to store; no tokenizer was found with the model)."""
    if tok is not None and not hasattr(tok, "save_pretrained"):  # tiny models' byte stand-in is not saved
        log.warning("tokenizer: qat's byte-level stand-in of tiny models is not stored in the export (%s has no "
                    "vocabulary llama.cpp could run); read it back with `qat-eval model.path=%s tokenizer=tiny`",
                    output, output)
        return None
    if tok is None and format != "gguf":  # GGUF warns itself (its file needs a vocabulary)
        log.warning("tokenizer: none found with %s (no tokenizer files there), so %s will have none; give "
                    "tokenizer=<the model's tokenizer: a folder or hub name> to store it with the export",
                    model, output)
    return tok


def run_export_job(cfg: dict) -> dict:
    """qat-export's job: the composed config (plain dicts) checked against `qat.jobs.config.EXPORT`, then
    `run_export`.

    Raises:
        ValueError: a misspelt key anywhere (naming it), no `output`, and what `run_export` raises.
    """
    check_keys(cfg, EXPORT)
    for key in ("overwrite", "gguf_pure"):  # before anything is loaded: overwrite=no must not replace an export
        as_bool(cfg.get(key, False), key)
    if cfg.get("output") in (None, "???"):
        raise ConfigError("qat-export: output= is required: a folder (native, compressed_tensors, gptq) or a .gguf file")
    model = cfg["model"]
    return run_export(model["path"], cfg["output"], format=cfg["format"], gguf_type=cfg["gguf_type"],
                      quant=cfg.get("quant"), checkpoint=cfg["checkpoint"], tokenizer=cfg["tokenizer"],
                      dtype=model.get("dtype", "float32"), tiny=model.get("tiny"), imatrix=cfg.get("imatrix"),
                      data=cfg.get("data"), calibration=cfg.get("calibration"),
                      overwrite=as_bool(cfg.get("overwrite", False), "overwrite"),
                      gguf_pure=as_bool(cfg.get("gguf_pure", False), "gguf_pure"))
