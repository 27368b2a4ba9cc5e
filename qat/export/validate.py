"""Checks the loaders run before they trust a file, and after they built a model from it. Each failure is a
`qat.errors.BadFileError` naming the file and what is wrong.

- `read_json`: a JSON object, bounded in size, no repeated keys.
- `check_config`: a model config's hyper-parameters are finite and positive (head counts, sizes, RMS epsilon,
  rope base), and the model it describes is not far larger than the files that hold it (a few-byte edit must not
  make a loader allocate the machine's memory).
- `check_state`: stored tensors have exactly the shapes and dtypes the model expects (load_state_dict would cast
  an I32 tensor into an F32 parameter silently).
- `check_model`: every float tensor of the loaded model is finite, every quantized weight holds the storage its
  scheme needs, with finite scales (>= 0 on the uniform grid; ggml blocks store signed ones), and dequantizes to
  finite values.
- `write_checksums` / `verify_checksums`: qat's folder exports carry `qat_checksums.json` (SHA-256 of every file),
  so an edited or bit-flipped file of a qat export is refused, not loaded as a different model; folders without it
  (written by other tools) are checked structurally only.
- `bad_file(path)`: what a loader's parsing raises on a file that passed these checks (KeyError, TypeError...)
  becomes a BadFileError naming the file.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from qat.errors import BadFileError
from qat.io import sha256_file, unique_keys
from qat.modules.quantized import QuantizedWeight

try:  # transformers' configs validate themselves with huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError
    _CONFIG_ERRORS: tuple = (StrictDataclassError,)
except ImportError:  # an older huggingface_hub
    _CONFIG_ERRORS = ()

CHECKSUMS = "qat_checksums.json"
MAX_JSON = 64 << 20
# a loaded float32 model may be this many times larger than the files that hold it (1-bit codes -> float32 is 32x;
# 4-bit is 8x), plus a fixed allowance for tiny files
BUDGET_RATIO, BUDGET_SLACK = 32, 256 << 20
_POSITIVE_INTS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
                  "num_key_value_heads", "head_dim", "max_position_embeddings")
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta", "layer_norm_eps", "layer_norm_epsilon")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """The JSON object in `path`.

    Raises:
        BadFileError: missing, too large, not UTF-8 JSON, a repeated key, or not an object (naming `what`).
    Example:
        >>> read_json("out/native/qat_quant.json", "qat export description")["format"]
        'qat-native'
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON:
            raise BadFileError(path, f"{what} is {path.stat().st_size} bytes; more than {MAX_JSON} is not one")
        data = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=unique_keys)
    except FileNotFoundError:
        raise BadFileError(path, f"missing {what}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise BadFileError(path, f"not a readable {what} ({err})") from None
    if not isinstance(data, dict):
        raise BadFileError(path, f"{what} is not a JSON object")
    return data


@contextlib.contextmanager
def bad_file(path: str | os.PathLike, what: str = "file") -> Iterator[None]:
    """Turn what parsing a checked file may still raise into a BadFileError naming `path`.

    Example:
        >>> with bad_file(folder, "compressed-tensors export"):
        ...     scheme = config["quantization_config"]["config_groups"]
    """
    try:
        yield
    except BadFileError:
        raise
    except (*_CONFIG_ERRORS, KeyError, TypeError, IndexError, ValueError, AttributeError, RuntimeError, ZeroDivisionError,
            OverflowError, UnicodeError, AssertionError, OSError) as err:
        # a KeyError's message is only the key: say what it means (an entry the file should hold is not there)
        key = err.args[0] if type(err) is KeyError and len(err.args) == 1 else None
        if isinstance(key, str) and key and not any(c.isspace() for c in key):
            detail = f"missing entry {key!r}"
        else:  # str(KeyError) is the repr of its argument: a sentence would come out quoted
            detail = f"{type(err).__name__}: {one_line(key if isinstance(key, str) else err)}"
        raise BadFileError(path, f"corrupted or inconsistent {what} ({detail})") from None


def one_line(err: BaseException | str, limit: int = 1000) -> str:
    """An inner error's message on one line: its first line whole (up to `limit` characters), and the lines after
    it when the first announces them (ends with ":"), joined by "; " (a list of what is valid is kept)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
    text = lines[0] + (" " + "; ".join(lines[1:]) if lines[0].endswith(":") and len(lines) > 1 else "")
    return text if len(text) <= limit else text[:limit] + " ..."


def check_config(config: Any, path: str | os.PathLike, stored_bytes: int | None = None) -> None:
    """Refuse a model config with a hyper-parameter that is not finite and positive, or one describing a model
    far larger than the `stored_bytes` that hold it.

    Raises:
        BadFileError: naming `path`, the key and its value.
    """
    bad = []
    for key in _POSITIVE_INTS:
        value = getattr(config, key, None)
        values = value if isinstance(value, list) and value else [value]  # some families give per-layer lists
        if value is not None and not all(type(v) is int and 0 < v <= 1 << 31 for v in values):
            bad.append(f"{key}={value!r} (a positive int)")
    for key in _POSITIVE_FLOATS:
        value = getattr(config, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            bad.append(f"{key}={value!r} (a finite number > 0)")
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    if theta is not None and (not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0):
        bad.append(f"rope_parameters.rope_theta={theta!r} (a finite number > 0)")
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if not bad and heads and kv and heads % kv:
        bad.append(f"num_key_value_heads={kv} does not divide num_attention_heads={heads}")
    if bad:
        raise BadFileError(path, "invalid model hyper-parameters: " + "; ".join(bad))
    if stored_bytes is not None:
        _check_budget(config, path, stored_bytes)


def _check_budget(config: Any, path: str | os.PathLike, stored_bytes: int) -> None:
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inter = getattr(config, "intermediate_size", None) or 4 * h
    inter = max(inter) if isinstance(inter, list) else inter
    experts = max(int(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0) or 1), 1)
    params = 2 * vocab * h + layers * (4 * h * h + 3 * h * inter * experts)
    if 4 * params > BUDGET_RATIO * stored_bytes + BUDGET_SLACK:
        raise BadFileError(path, f"the config describes a model of ~{params:.3g} parameters, far more than its "
                                 f"{stored_bytes} stored bytes can hold (hidden_size={h}, num_hidden_layers={layers}, "
                                 f"vocab_size={vocab}, intermediate_size={inter})")


def check_state(model: nn.Module, state: dict, path: str | os.PathLike, skip: tuple[str, ...] = ()) -> None:
    """Every stored tensor that the model has has its shape and dtype (QuantizedWeight storage and names
    starting with `skip` excepted: `check_model` checks those after loading).

    Raises:
        BadFileError: listing the tensors that differ.
    """
    own = model.state_dict()
    # QuantizedWeight storage (a Linear's qweight, an experts module's qweights.<name>) is shaped as stored;
    # check_model checks it after loading
    quant = re.compile(r".*\.(?:qweight|qweights\.[^.]+)\.(?:scale|zero_point|g_idx)")
    # an empty tensor of the fresh model is shaped by data (a held activation range, pinned qparams): its
    # module takes the stored shape on load
    bad = [f"{k}: stored {v.dtype} {tuple(v.shape)}, the model needs {own[k].dtype} {tuple(own[k].shape)}"
           for k, v in state.items() if isinstance(v, torch.Tensor) and k in own and not quant.fullmatch(k)
           and not k.startswith(skip) and (v.dtype != own[k].dtype or (v.shape != own[k].shape and own[k].numel()))]
    if bad:
        raise BadFileError(path, "tensors do not fit the model:\n  - " + "\n  - ".join(bad[:10]))


def _reference(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The storage a weight of this scheme and shape has (packed codes, scale, zero-point), from zeros."""
    spec = qw.spec.replace(static_global=False)  # a held global (NVFP4 read from a checkpoint): the same layout
    ref = QuantizedWeight.from_tensor(torch.zeros(qw.shape), spec, g_idx=qw.group_index())
    return {"packed": ref.packed, "scale": ref.scale, "zero_point": ref.zero_point}


def _check_qweight(name: str, qw: QuantizedWeight) -> str | None:
    for key, ref in _reference(qw).items():
        have = getattr(qw, key)
        if have.dtype != ref.dtype or have.shape != ref.shape:
            return f"{name}.{key}: stored {have.dtype} {tuple(have.shape)}, {qw.spec.describe()} needs {ref.dtype} {tuple(ref.shape)}"
    signed_scales = qw.spec.grid != "uniform"  # ggml blocks store signed scales (Q4_0's d = max / -8)
    if qw.scale.is_floating_point() and not bool(torch.isfinite(qw.scale).all() and (signed_scales or (qw.scale >= 0).all())):
        return f"{name}.scale: not finite{'' if signed_scales else ' and >= 0'}"
    g_idx = qw.group_index()
    if g_idx is not None:
        groups = -(-qw.shape[1] // (qw.spec.group_size or qw.shape[1]))
        if g_idx.shape != (qw.shape[1],) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            return f"{name}.g_idx: not {qw.shape[1]} group indices in [0, {groups})"
    with torch.no_grad():
        scale, _ = qw.qparams()
        if not bool(torch.isfinite(scale).all() and (signed_scales or (scale >= 0).all())):
            return f"{name}: scales are not finite{'' if signed_scales else ' and >= 0'}"
        w = qw.dequantize(torch.float32)
    if tuple(w.shape) != tuple(qw.shape) or not bool(torch.isfinite(w).all()):
        return f"{name}: does not dequantize to finite values of shape {qw.shape}"
    return None


def check_model(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Refuse a loaded model with a non-finite float tensor or a quantized weight whose storage does not fit its
    scheme (wrong shapes or dtypes, non-finite or negative scales, g_idx out of range).

    Returns:
        the model.
    Raises:
        BadFileError: listing the offending tensors.
    """
    bad = []
    qweights = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedWeight)}
    for name, qw in qweights.items():
        with bad_file(path, "quantized weight"):
            problem = _check_qweight(name, qw)
        if problem:
            bad.append(problem)
    skip = tuple(f"{n}." for n in qweights)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(skip) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(f"{name}: holds NaN or infinite values")
    if bad:
        raise BadFileError(path, "the stored model is corrupted:\n  - " + "\n  - ".join(bad[:10]))
    return model


def write_checksums(folder: str | os.PathLike) -> None:
    """Write `qat_checksums.json` (SHA-256 of every file in `folder`, sub-folders included) into `folder`."""
    folder = Path(folder)
    sums = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=1, sort_keys=True) + "\n")


def verify_checksums(folder: str | os.PathLike, needed: tuple[str, ...] = ()) -> bool:
    """Check a qat folder export against its `qat_checksums.json`; True when there is one (and it holds).

    Args:
        needed: files the loader reads, which the checksums must cover when there are checksums.
    Raises:
        BadFileError: a file whose content differs, a listed file missing, a needed file not listed.
    """
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        return False
    sums = read_json(folder / CHECKSUMS, "checksum list").get("sha256")
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise BadFileError(folder / CHECKSUMS, "corrupted checksum list (no sha256 map of strings)")
    for name in needed:
        if name not in sums:
            raise BadFileError(folder / CHECKSUMS, f"does not cover {name}: the list or the folder is corrupted")
    for name, digest in sums.items():
        p = folder / name
        if ".." in Path(name).parts or not p.is_file():
            raise BadFileError(p, f"listed in {CHECKSUMS} but missing: an incomplete or corrupted export")
        if sha256_file(p) != digest:
            raise BadFileError(p, f"content differs from the SHA-256 in {CHECKSUMS}: the file is corrupted or was edited")
    return True
