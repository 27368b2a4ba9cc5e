"""File plumbing shared by the exporters and loaders: atomic writes, checked reads, model walks.

Every file is written under a temporary name in its destination folder and renamed into place only
when complete (`os.replace` is atomic on POSIX), so a crash never leaves a partial file that looks
finished. Reads check what they can before trusting a file: safetensors headers and sizes, and
`torch.load(weights_only=True)` only (no code-carrying pickles).

Exports stream: `write_safetensors` takes (name, tensor) pairs as a generator yields them, and the
writers (native, compressed-tensors, GPTQ; GGUF likewise) quantize one module at a time from the
prepared (fake-quant or PTQ-pinned) model through `weight_of` / `as_converted`, so peak memory is the
model plus about one tensor's temporaries, never a converted copy (tests/export/test_streaming.py).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from qat.modules.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedWeight
from qat.modules.registry import QUANTIZED

log = logging.getLogger(__name__)


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


EXPORT_MARKERS = ("qat_quant.json", "quantize_config.json", "config.json")


def clear_export_markers(folder: str | os.PathLike) -> None:
    """Remove the files that mark `folder` as a finished export of any format (native's qat_quant.json,
    GPTQ's quantize_config.json, the config.json every folder export writes last), before a folder writer
    starts: a new export written over an old one (of the same or another format) then reads as complete
    only once its own marker is written, never as a mix of the two, even if interrupted.

    Example:
        >>> clear_export_markers("out/native")
    """
    for name in EXPORT_MARKERS:
        with contextlib.suppress(FileNotFoundError):
            (Path(folder) / name).unlink()


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


ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_COPY_CHUNK = 16 << 20


def _raw_bytes(t: torch.Tensor):
    """A zero-copy byte view of a contiguous CPU tensor (what is written to the file)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(items: Iterable[tuple[str, torch.Tensor]], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write tensors as they come, one at a time, into a safetensors file (atomically).

    Each tensor's bytes go to a temporary data file as soon as the iterable yields it and the tensor is
    dropped, so memory holds one tensor at a time, never a second copy of the model. The header (which
    safetensors puts first: 8-byte little-endian length, JSON {name: {dtype, shape, data_offsets}},
    space-padded to 8 bytes) is written once every shape is known, followed by the data, copied by the
    kernel; the cost is a second pass over the bytes on disk, not in memory. As safetensors' own writer
    does, tensors are laid out by element size, largest first (one temporary file per size), so every
    tensor starts at a multiple of its element size and loaders may map it in place.

    Args:
        items: (name, tensor) pairs; names must be unique.
        path: the .safetensors file to write.
        metadata: string -> string pairs stored as `__metadata__`.
    Returns:
        the header written.
    Raises:
        ValueError: a repeated name, an unsupported dtype, or an unwritable path.
    Example:
        >>> write_safetensors(((n, p.detach()) for n, p in model.named_parameters()), "out/model.safetensors")
    """
    header: dict[str, Any] = {}
    with atomic_path(path) as tmp, contextlib.ExitStack() as files:
        parts: dict[int, Any] = {}  # element size -> (open data file, bytes written so far)
        sizes: dict[int, int] = {}
        for name, tensor in items:
            size = tensor.element_size()
            if size not in parts:
                parts[size] = files.enter_context(_data_file(tmp, size))
            sizes[size] = sizes.get(size, 0) + _append(parts[size], header, name, tensor, sizes.get(size, 0))
        base, order = 0, sorted(parts, reverse=True)
        for size in order:  # shift each part's offsets behind the larger-element parts
            for entry in header.values():
                if entry["size"] == size:
                    entry["data_offsets"] = [base + o for o in entry["data_offsets"]]
            base += sizes[size]
        for entry in header.values():
            del entry["size"]
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for size in order:
                parts[size].flush()
                with open(parts[size].name, "rb") as data:
                    _copy_rest(data, out)
    return header


@contextlib.contextmanager
def _data_file(tmp: Path, size: int):
    path = tmp.with_name(f"{tmp.name}.data{size}")
    try:
        with open(path, "wb") as f:
            yield f
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _copy_rest(src, dst) -> None:
    """Append `src` (from its start) to `dst` in the kernel (no buffer in this process's memory)."""
    dst.flush()
    start = dst.tell()
    try:
        while os.copy_file_range(src.fileno(), dst.fileno(), _COPY_CHUNK):
            pass
    except (AttributeError, OSError):  # not Linux, or a filesystem without it: a bounded user-space copy
        src.seek(0)
        dst.seek(start)
        dst.truncate()
        shutil.copyfileobj(src, dst, 1 << 20)
    dst.seek(0, os.SEEK_END)


def _append(data, header: dict, name: str, tensor: torch.Tensor, offset: int) -> int:
    if name in header or name == "__metadata__":
        raise ValueError(f"safetensors writer: tensor name {name!r} given twice (or reserved)")
    if tensor.dtype not in ST_DTYPES:
        raise ValueError(f"safetensors writer: {name} has dtype {tensor.dtype}; supported: {sorted(map(str, ST_DTYPES))}")
    tensor = tensor.detach().cpu().contiguous()
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes:
        data.write(_raw_bytes(tensor))
    header[name] = {"dtype": ST_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                    "data_offsets": [offset, offset + nbytes], "size": tensor.element_size()}
    return nbytes


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """A dict of tensors as a safetensors file, atomically (see `write_safetensors`)."""
    write_safetensors(tensors.items(), path, metadata)


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


def warn_unstored(model: nn.Module, fmt: str, stores_input: bool) -> dict[str, list[str]]:
    """Warn, once per scheme, about the quantization a format cannot store: activation (input) schemes
    when `stores_input` is False, and KV-cache schemes (no writer stores them). The runtime then computes
    those tensors as it chooses, not as the model was trained or calibrated.

    Returns:
        {"input <scheme>" / "KV cache <scheme>": [module names]} of what is not stored.
    Example:
        >>> warn_unstored(qat.prepare(model, qat.load_recipe("w4a8_kv8")), "GPTQ", stores_input=False)
    """
    dropped: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        quantizer = getattr(module, "input_quantizer", None) if not stores_input else None
        if quantizer is not None:
            dropped.setdefault(f"input {quantizer.spec.describe()}", []).append(name)
        if getattr(module, "k_quantizer", None) is not None:
            dropped.setdefault(f"KV cache {module.k_quantizer.spec.describe()}", []).append(name)
    for what, names in dropped.items():
        log.warning("%s export: the %s quantization of %d module(s) (%s) has no place in this format and is "
                    "not stored; runtimes will compute those tensors their own way", fmt, what, len(names),
                    ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""))
    return dropped


def converted_copy(model: nn.Module) -> nn.Module:
    """`model` with real-integer modules: a converted copy of a prepared model, or the model itself.

    The writers do not use it (they convert one module at a time: see `integer_modules`)."""
    from qat.transform import convert

    if any(type(m) in QUANTIZED for m in model.modules()):
        return convert(copy.deepcopy(model))
    return model


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> QuantizedLinear / QuantizedEmbedding of a converted model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}


def integer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of every module an export stores as integers: converted ones, and fake-quant ones
    with a weight quantizer (`convert` would swap those; `as_converted` does it for one module)."""
    out = {}
    for name, module in model.named_modules():
        converted = isinstance(module, (QuantizedLinear, QuantizedEmbedding))
        if converted or (type(module) in QUANTIZED and getattr(module, "weight_quantizer", None) is not None):
            out[name] = module
    return out


def integer_kind(module: nn.Module) -> type:
    """QuantizedLinear or QuantizedEmbedding: the class `module` is, or converts to."""
    return type(module) if isinstance(module, (QuantizedLinear, QuantizedEmbedding)) else QUANTIZED[type(module)]


def owning_module(key: str, modules: dict[str, nn.Module]) -> str | None:
    """The name in `modules` that state-dict `key` lies under (`a.b.weight_quantizer.lo` -> `a.b`), or None."""
    module = key.rpartition(".")[0]
    while module and module not in modules:
        module = module.rpartition(".")[0]
    return module if module in modules else None


def as_converted(module: nn.Module) -> nn.Module:
    """`module` itself when converted; else a new QuantizedLinear / QuantizedEmbedding made from it as
    `convert` would (sharing its bias and input quantizer), for one module at a time."""
    if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
        return module
    with torch.no_grad():
        return QUANTIZED[type(module)].from_fake(module)


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
