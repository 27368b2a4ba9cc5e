"""File plumbing for everything qat writes or reads: atomic writes, streaming safetensors, safe loading.

Every file is written under a temporary name in its destination folder and renamed into place only when
complete (`os.replace` is atomic on POSIX), so a crash never leaves a partial file that looks finished.
Reads check what they can before trusting a file: safetensors headers and sizes, and
`torch.load(weights_only=True)` only (no code-carrying pickles).

`write_safetensors` takes (name, tensor) pairs as a generator yields them, so an exporter that quantizes one
module at a time keeps one tensor in memory, never a converted copy of the model
(tests/export/test_streaming.py). A leaf module: it imports nothing from qat.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from qat.errors import BadFileError, ConfigError

__all__ = ["ST_DTYPES", "atomic_folder", "atomic_path", "atomic_write_bytes", "check_creatable", "check_safetensors",
           "check_writable", "load_safetensors", "load_torch_checkpoint", "probe_folder", "save_safetensors",
           "is_distributed_checkpoint", "load_distributed_checkpoint", "torch_load", "write_json",
           "write_safetensors"]


def probe_folder(folder: str | os.PathLike) -> None:
    """Write and remove a probe file in an existing `folder`.

    Raises:
        OSError: the folder cannot be written to (the caller names what the folder is for).
    Example:
        >>> probe_folder("/tmp")
    """
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".qat-probe-"):
        pass


def check_writable(path: str | os.PathLike) -> Path:
    """Create `path`'s parent folder if needed and check that a file can be written there.

    Raises:
        ValueError: the folder cannot be created or written to, or `path` is a folder, naming it.
    Example:
        >>> check_writable("/tmp/out/model.gguf")
        PosixPath('/tmp/out/model.gguf')
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe_folder(path.parent)
    except OSError as err:
        raise ValueError(f"output path {str(path)!r} is not writable: {err.strerror or err}") from None
    if path.is_dir():
        raise ValueError(f"output path {str(path)!r} is a folder; give a file name")
    return path


def check_creatable(path: str | os.PathLike) -> Path:
    """Check that `path` (a file or folder) can be created, creating nothing: a run that fails later leaves no
    empty folders behind. The nearest existing folder above it is probed.

    Raises:
        ValueError: naming `path` and the folder that refused, e.g. "a file is in the way".
    Example:
        >>> check_creatable("/tmp/new/run/model.gguf")
        PosixPath('/tmp/new/run/model.gguf')
    """
    path = Path(path)
    base = path.parent if not path.is_dir() else path
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        if not base.is_dir():
            raise NotADirectoryError(20, "a file is in the way", str(base))
        probe_folder(base)
    except OSError as err:
        raise ConfigError(f"output path {str(path)!r} is not writable ({str(base)!r}: {err.strerror or err})") from None
    return path


def _publish_mode(tmp: str | os.PathLike) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; a shipped file gets the usual mode


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Raises:
        ValueError: `path` is not writable (see `check_writable`).
    Example:
        >>> with atomic_path("/tmp/x.json") as tmp:
        ...     tmp.write_text("{}")
    """
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (an old folder there is removed
    first, so the new one appears whole or not at all; the old one is gone once the new one is complete).

    Example:
        >>> with atomic_folder(cache / "model") as tmp:
        ...     model.save_pretrained(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON with sorted keys, atomically."""
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
        parts: dict[int, Any] = {}  # element size -> open data file
        sizes: dict[int, int] = {}
        for name, tensor in items:
            size = tensor.element_size()
            if size not in parts:
                parts[size] = files.enter_context(_data_file(tmp, size))
            sizes[size] = sizes.get(size, 0) + _append(parts[size], header, name, tensor, sizes.get(size, 0))
        order = sorted(parts, reverse=True)
        _place(header, order, sizes)
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


def _place(header: dict, order: list[int], sizes: dict[int, int]) -> None:
    """Shift each element size's offsets behind the larger-element parts written before it."""
    base = 0
    for size in order:
        for entry in header.values():
            if entry["size"] == size:
                entry["data_offsets"] = [base + o for o in entry["data_offsets"]]
        base += sizes[size]
    for entry in header.values():
        del entry["size"]


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


_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_ST_MAX_HEADER = 100 << 20  # safetensors' own limit


def unique_keys(pairs):
    """json's object_pairs_hook that refuses a key appearing twice (a JSON header must not say two things)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_entry(name: str, entry: Any) -> tuple[int, int]:
    """(begin, end) of one header entry, every field checked: a known dtype, a shape of non-negative ints,
    offsets that hold exactly shape x dtype bytes."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor {name!r}: entry {str(entry)[:80]} is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _ST_SIZES:
        raise ValueError(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(_ST_SIZES)}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and 0 <= d < 1 << 48 for d in shape):
        raise ValueError(f"tensor {name!r}: shape {str(shape)[:80]} is not a list of at most 8 non-negative ints")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets) \
            or not 0 <= offsets[0] <= offsets[1]:
        raise ValueError(f"tensor {name!r}: data_offsets {str(offsets)[:80]} are not [begin, end] with 0 <= begin <= end")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * _ST_SIZES[dtype]:
        raise ValueError(f"tensor {name!r}: {dtype} {shape} needs {numel * _ST_SIZES[dtype]} bytes, its data_offsets "
                         f"hold {offsets[1] - offsets[0]}")
    return offsets[0], offsets[1]


def check_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a safetensors header before anything trusts it: its length, JSON (no repeated keys),
    every tensor's dtype, shape and offsets (exactly shape x dtype bytes, no overlap, no gap, the data ends where
    the file does), and string metadata.

    Returns:
        the header (tensor name -> {dtype, shape, data_offsets}).
    Raises:
        FileNotFoundError: no such file.
        BadFileError: truncated or corrupted, naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no such safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BadFileError(path, f"truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > _ST_MAX_HEADER:
            raise BadFileError(path, f"corrupted safetensors header (claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=unique_keys)
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise BadFileError(path, f"corrupted safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise BadFileError(path, "corrupted safetensors header (not a JSON object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BadFileError(path, "corrupted safetensors header (__metadata__ is not a map of strings)")
    try:
        spans = sorted(_check_entry(k, v) for k, v in header.items() if k != "__metadata__")
    except ValueError as err:
        raise BadFileError(path, f"corrupted safetensors header: {err}") from None
    end = 0
    for begin, stop in spans:
        if begin != end:
            raise BadFileError(path, f"corrupted safetensors header: tensor data {'overlaps' if begin < end else 'has a gap'} "
                                     f"at byte {min(begin, end)}")
        end = stop
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "corrupted"
        raise BadFileError(path, f"{what} safetensors file ({size} bytes; the header describes {8 + n + end})")
    return header


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checked safetensors file (see `check_safetensors`).

    Raises:
        FileNotFoundError: no such file. BadFileError: a corrupted header or a file safetensors refuses.
    """
    check_safetensors(path)
    try:
        return load_file(str(path))
    except Exception as err:  # SafetensorError and friends on what the header check let through
        raise BadFileError(path, f"corrupted safetensors file ({type(err).__name__}: {err})") from None


def torch_load(path: str | os.PathLike, mmap: bool = False) -> Any:
    """`torch.load` on CPU with `weights_only=True`: tensors, containers and plain values; pickles that need
    code are refused (torch raises UnpicklingError).

    Example:
        >>> hparams = torch_load("runs/last.ckpt", mmap=True).get("hyper_parameters")
    """
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A .bin / .pt state dict through `torch.load(weights_only=True)`: pickles that need code are refused.

    A Lightning checkpoint's "state_dict" is returned as the state dict; a sharded checkpoint folder is read
    with `load_distributed_checkpoint`.
    Raises:
        BadFileError: the file needs arbitrary code to unpickle, is truncated / corrupted, or holds no tensors.
    """
    if is_distributed_checkpoint(path):
        return load_distributed_checkpoint(path)
    try:
        data = torch_load(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        # torch's own text advises weights_only=False, which would run the file's code: keep only the cause
        cause = next((line.strip() for line in str(err).splitlines()
                      if line.strip() and "weights_only" not in line and "Weights only load failed" not in line), "")
        raise BadFileError(path, "cannot load as a weights-only checkpoint (refusing pickles that need code; the "
                                 f"file may be truncated or corrupted){': ' + cause if cause else ''}") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not any(isinstance(v, torch.Tensor) for v in data.values()):
        raise BadFileError(path, f"expected a state dict of tensors, got {type(data).__name__}")
    return data


def is_distributed_checkpoint(path: str | os.PathLike) -> bool:
    """True for a torch.distributed.checkpoint folder (a sharded Lightning / FSDP checkpoint: `.metadata` and
    one `.distcp` file per rank)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor entries are unpickled with weights_only=True (no code runs)."""

    def load_bytes(self, read_item, value) -> None:
        self.original_state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


def load_distributed_checkpoint(folder: str | os.PathLike, prefix: str = "state_dict.") -> dict[str, Any]:
    """The full (unsharded) model state dict of a sharded checkpoint folder, read in one process.

    Only entries under `prefix` (Lightning's model state; optimizer states are not read) are loaded, each
    allocated from the checkpoint's own metadata; extra states that DCP flattened (`<module>._extra_state.<key>`)
    are put back together as dicts.
    Raises:
        BadFileError: the folder's metadata or shards cannot be read.
    Example:
        >>> state = load_distributed_checkpoint("runs/checkpoints/last.ckpt")
    """
    reader = FileSystemReader(str(folder))
    planner = _WeightsOnlyLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    try:
        metadata = reader.read_metadata()
        state: dict[str, Any] = {}
        for key, meta in metadata.state_dict_metadata.items():
            if key.startswith(prefix):
                state[key] = (torch.empty(meta.size, dtype=meta.properties.dtype)
                              if isinstance(meta, TensorStorageMetadata) else None)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp_load(state, storage_reader=reader, planner=planner, no_dist=True)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - CheckpointException is a BaseException
        raise BadFileError(folder, f"cannot read as a sharded (torch.distributed.checkpoint) checkpoint: "
                                   f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    out: dict[str, Any] = {}
    for key, value in state.items():
        key = key.removeprefix(prefix)
        head, sep, field = key.partition("._extra_state.")
        if sep:
            out.setdefault(head + "._extra_state", {})[field] = value
        elif key.startswith("_extra_state."):
            out.setdefault("_extra_state", {})[key.removeprefix("_extra_state.")] = value
        else:
            out[key] = value
    if not any(isinstance(v, torch.Tensor) for v in out.values()):
        raise BadFileError(folder, f"a sharded checkpoint with no model state under {prefix!r}")
    return out
