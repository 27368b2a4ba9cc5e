"""File plumbing shared by the exporters and loaders: atomic writes, checked reads, model walks.

Every file is written under a temporary name in its destination folder and renamed into place only
when complete (`os.replace` is atomic on POSIX), so a crash never leaves a partial file that looks
finished. Reads check what they can before trusting a file: safetensors headers and sizes, and
`torch.load(weights_only=True)` only (no code-carrying pickles).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from qat.modules.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedWeight
from qat.modules.registry import QUANTIZED


def check_writable(path: str | os.PathLike) -> Path:
    """Create `path`'s parent folder if needed and check that a file can be written there.

    Raises:
        ValueError: the folder cannot be created or written to, naming it.
    Example:
        >>> check_writable("/tmp/out/model.gguf")
        PosixPath('/tmp/out/model.gguf')
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".qat-probe-"):
            pass
    except OSError as err:
        raise ValueError(f"output path {str(path)!r} is not writable: {err.strerror or err}") from None
    if path.is_dir():
        raise ValueError(f"output path {str(path)!r} is a folder; give a file name")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Example:
        >>> with atomic_path("/tmp/x.json") as tmp:
        ...     tmp.write_text("{}")
    """
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; a shipped checkpoint gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors.torch.save_file, atomically, with contiguous CPU copies."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def check_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a safetensors header: the file holds every byte the header promises.

    Returns:
        the header (tensor name -> {dtype, shape, data_offsets}).
    Raises:
        FileNotFoundError: no such file.
        ValueError: truncated or corrupted, naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no such safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{str(path)!r}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{str(path)!r}: corrupted safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{str(path)!r}: corrupted safetensors header ({err})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{str(path)!r}: truncated safetensors file ({size} bytes; the header needs {8 + n + end})")
    return header


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checked safetensors file (see `check_safetensors`)."""
    from safetensors.torch import load_file

    check_safetensors(path)
    return load_file(str(path))


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A .bin / .pt state dict through `torch.load(weights_only=True)`: pickles that need code are refused.

    Raises:
        ValueError: the file needs arbitrary code to unpickle, or is truncated / corrupted.
    """
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ValueError(f"{str(path)!r}: cannot load as a weights-only checkpoint (refusing pickles that need "
                         f"code; the file may be truncated or corrupted): {str(err).splitlines()[0]}") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not any(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{str(path)!r}: expected a state dict of tensors, got {type(data).__name__}")
    return data


def converted_copy(model: nn.Module) -> nn.Module:
    """`model` with real-integer modules: a converted copy of a prepared model, or the model itself."""
    from qat.transform import convert

    if any(type(m) in QUANTIZED for m in model.modules()):
        return convert(copy.deepcopy(model))
    return model


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> QuantizedLinear / QuantizedEmbedding of a converted model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), leaf


def weight_spec(model: nn.Module, name: str):
    """(QuantSpec or None, has an act-order g_idx) of parameter `name`, without quantizing anything."""
    module, leaf = _owner(model, name)
    if leaf != "weight":
        return None, False
    if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
        return module.qweight.spec, module.qweight.group_index() is not None
    quantizer = getattr(module, "weight_quantizer", None) if type(module) in QUANTIZED else None
    if quantizer is None:
        return None, False
    return quantizer.spec, quantizer.group_index() is not None


def weight_of(model: nn.Module, name: str) -> torch.Tensor | QuantizedWeight:
    """The float parameter `name`, or the QuantizedWeight standing for `<module>.weight`: the one a
    converted module holds, or (fake-quant module) one made now with its qparams, as `convert` would,
    so that a prepared model exports tensor by tensor without a converted copy in memory."""
    module, leaf = _owner(model, name)
    if leaf == "weight" and isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
        return module.qweight
    quantizer = getattr(module, "weight_quantizer", None) if type(module) in QUANTIZED else None
    if leaf == "weight" and quantizer is not None:
        with torch.no_grad():
            weight = module.weight.detach()
            quantizer.observe(weight)
            scale, zero_point = quantizer.qparams(weight)
            zero_point = None if zero_point is None else zero_point.detach()
            return QuantizedWeight.from_tensor(weight, quantizer.spec, scale.detach(), zero_point, name,
                                               quantizer.group_index())
    return getattr(module, leaf)


def float_weight_names(model: nn.Module) -> list[str]:
    """Names of the model's weights as a float model would call them (`x.qweight.*` -> `x.weight`)."""
    names = []
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in seen:
            continue
        seen.add(name)
        names.append(name)
    for name in quantized_modules(model):
        names.append(f"{name}.weight")
    return names


def load_rest_and_tie(model, rest: dict, folder, config):
    """Load the non-quantized tensors of an exported folder into `model` (its quantized linears already
    swapped in), refusing missing or unexpected tensors; re-tie embeddings when the config says so.

    Raises:
        ValueError: naming the folder and the tensors that do not match the config.
    """
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if ".qweight." not in k and k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{str(folder)!r}: tensors do not match the config: missing {missing}, unexpected {unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()
