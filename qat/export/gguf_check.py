"""A GGUF file checked before any reader trusts it, and qat's checksum in the files it writes.

`scan_gguf` walks the header once with bounded reads: every count (metadata pairs, tensors, array items, string
lengths) against the bytes left in the file, every value type against the known ones and the types the
well-known keys must have, non-finite float values, and every tensor's name, dimensions, type (one the reference
decoder reads), offset, alignment, size and overlap against the file. A small hostile file therefore cannot make
the reader loop or allocate for long (gguf's own reader trusts the counts).

Files qat writes carry `qat.sha256`: the SHA-256 of the whole file (with that value read as zeros) and of its
tensor-info table. `verify_gguf_checksum` refuses a file that differs from what was written. A tool that rewrites
the file (llama-quantize) copies the key along but writes a new tensor table, so the checksum is not applied there;
such files, and files from other tools, are checked structurally only.
"""
from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from qat.errors import BadFileError

# the value: SHA-256 of the file (this value read as PLACEHOLDER) ":" SHA-256 of the tensor-info table
CHECKSUM_KEY, PLACEHOLDER = "qat.sha256", "0" * 64 + ":" + "0" * 64
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_INTS = {0, 1, 2, 3, 4, 5, 10, 11}
# the value types well-known keys must have (a wrong type here is what made gguf's reader run away)
_EXPECTED = {"general.architecture": ({_STRING}, None), "general.alignment": ({4}, None),
             "general.name": ({_STRING}, None), "tokenizer.ggml.model": ({_STRING}, None),
             "tokenizer.ggml.tokens": ({_ARRAY}, {_STRING}), "tokenizer.ggml.merges": ({_ARRAY}, {_STRING}),
             "tokenizer.ggml.token_type": ({_ARRAY}, _INTS), "tokenizer.ggml.scores": ({_ARRAY}, {6}),
             CHECKSUM_KEY: ({_STRING}, None)}
_ARCH_INTS = ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "vocab_size", "rope.dimension_count")
_ARCH_FLOATS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.freq_base",
                "rope.scaling.factor")
MAX_DIMS, MAX_NAME = 4, 256
MAX_STRINGS = 1 << 22  # items of a string array (the largest vocabularies are ~256k); gguf's reader keeps one object each


def _decodable() -> set[int]:
    out = set()
    integers = {gguf.GGMLQuantizationType[n] for n in ("I8", "I16", "I32", "I64")}  # no weight is stored as these
    for t, (block, size) in gguf.GGML_QUANT_SIZES.items():
        if t in integers:
            continue
        try:
            gguf.quants.dequantize(np.zeros(size, dtype=np.uint8), t)
            out.add(int(t))
        except Exception:  # a type this gguf version cannot decode: refused by the scan, not mid-load
            continue
    return out


_DECODABLE: set[int] | None = None


@dataclass
class GGUFLayout:
    """What `scan_gguf` found: metadata values of scalars and strings, tensor infos, where the data starts, and
    where the qat.sha256 value lies (or None)."""
    values: dict = field(default_factory=dict)
    tensors: list = field(default_factory=list)  # (name, dims, type, offset, nbytes)
    data_start: int = 0
    checksum_at: int | None = None
    table: tuple[int, int] = (0, 0)  # byte span of the tensor-info table


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise BadFileError(self.path, f"truncated or corrupted GGUF file: {what} needs {n} bytes at byte "
                                          f"{self.pos}, the file has {self.size}")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str, limit: int | None = None, text: bool = True):
        n = self.scalar("<Q", what)
        if limit is not None and n > limit:
            raise BadFileError(self.path, f"corrupted GGUF file: {what} is {n} bytes long (at most {limit})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        if not text:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadFileError(self.path, f"corrupted GGUF file: {what} is not UTF-8") from None


def _value(cur: _Cursor, vtype: int, key: str, layout: GGUFLayout):
    if vtype in _SCALARS:
        v = cur.scalar(_SCALARS[vtype], f"the value of {key}")
        if vtype in (6, 12) and not math.isfinite(v):
            raise BadFileError(cur.path, f"GGUF metadata {key} = {v}: not a finite number")
        return v
    if vtype == _STRING:
        if key == CHECKSUM_KEY:
            layout.checksum_at = cur.pos + 8
        return cur.string(f"the value of {key}")
    if vtype != _ARRAY:
        raise BadFileError(cur.path, f"corrupted GGUF file: metadata {key} has unknown value type {vtype}")
    itype, count = cur.scalar("<I", f"the item type of {key}"), cur.scalar("<Q", f"the length of {key}")
    expected = _EXPECTED.get(key, (None, None))[1]
    if expected is not None and itype not in expected:
        raise BadFileError(cur.path, f"GGUF metadata {key} is an array of value type {itype}; expected {sorted(expected)}")
    if itype == _STRING:
        if count > (cur.size - cur.pos) // 8 or count > MAX_STRINGS:
            raise BadFileError(cur.path, f"corrupted GGUF file: {key} claims {count} strings, more than the file holds "
                                         f"or than {MAX_STRINGS} (no vocabulary is that large)")
        for i in range(count):
            cur.string(f"{key}[{i}]", text=False)
        return count
    if itype not in _SCALARS:
        raise BadFileError(cur.path, f"corrupted GGUF file: {key} is an array of value type {itype} (nested or unknown)")
    cur.need(count * struct.calcsize(_SCALARS[itype]), f"the {count} items of {key}")
    cur.pos += count * struct.calcsize(_SCALARS[itype])
    return count


def _check_value(path: Path, key: str, vtype: int, value, arch: str | None) -> None:
    expected = _EXPECTED.get(key, (None, None))[0]
    if expected is not None and vtype not in expected:
        raise BadFileError(path, f"GGUF metadata {key} has value type {vtype}; expected {sorted(expected)}")
    if arch and key.startswith(f"{arch}.") and key.removeprefix(f"{arch}.") in _ARCH_INTS and vtype != _ARRAY:
        if vtype not in _INTS or not 0 < value <= 1 << 31:  # (some architectures give per-layer arrays)
            raise BadFileError(path, f"GGUF metadata {key} = {value!r}: not a positive integer")
    if arch and key.startswith(f"{arch}.") and key.removeprefix(f"{arch}.") in _ARCH_FLOATS:
        if vtype not in (6, 12) or not value > 0:
            raise BadFileError(path, f"GGUF metadata {key} = {value!r} (value type {vtype}): not a float > 0")


def _tensor_infos(cur: _Cursor, n_tensors: int) -> list:
    global _DECODABLE
    if _DECODABLE is None:
        _DECODABLE = _decodable()
    infos, names = [], set()
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor {i}", MAX_NAME)
        if name in names:
            raise BadFileError(cur.path, f"corrupted GGUF file: tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.scalar("<I", f"the dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise BadFileError(cur.path, f"corrupted GGUF file: tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
        dims = [cur.scalar("<Q", f"the shape of {name}") for _ in range(n_dims)]
        ttype, offset = cur.scalar("<I", f"the type of {name}"), cur.scalar("<Q", f"the offset of {name}")
        if ttype not in _DECODABLE:
            raise BadFileError(cur.path, f"tensor {name!r} has GGML type {ttype}, which this reader cannot decode")
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        numel = math.prod(dims)
        if not all(d > 0 for d in dims) or numel > 1 << 40 or dims[0] % block:
            raise BadFileError(cur.path, f"tensor {name!r} has shape {dims}, which GGML type "
                                         f"{gguf.GGMLQuantizationType(ttype).name} (blocks of {block}) cannot hold")
        infos.append((name, dims, ttype, offset, numel // block * size))
    return infos


def _check_data(path: Path, layout: GGUFLayout, alignment: int, size: int) -> None:
    """Tensors lie back to back, each at the next aligned offset (as every GGUF writer lays them out): an overlap,
    a gap, or a size that does not reach the next tensor means a changed type, shape or offset."""
    end_prev, prev = 0, None
    for name, dims, ttype, offset, nbytes in sorted(layout.tensors, key=lambda t: t[3]):
        if offset % alignment:
            raise BadFileError(path, f"tensor {name!r} at offset {offset}, not a multiple of the alignment {alignment}")
        if offset < end_prev:
            raise BadFileError(path, f"tensor {name!r} overlaps tensor {prev!r} in the data")
        if layout.data_start + offset + nbytes > size:
            what = "truncated" if layout.data_start + offset < size else "corrupted"
            raise BadFileError(path, f"{what} GGUF file: tensor {name!r} needs bytes up to "
                                     f"{layout.data_start + offset + nbytes}, the file has {size}")
        if offset - end_prev >= alignment:
            raise BadFileError(path, f"tensor {name!r} starts {offset - end_prev} bytes after the end of "
                                     f"{prev or 'the header'}: a changed type, shape or offset")
        end_prev, prev = offset + nbytes, name
    if size - (layout.data_start + end_prev) >= alignment:
        raise BadFileError(path, f"{size - layout.data_start - end_prev} bytes follow the last tensor: a changed type, "
                                 "shape or offset, or a damaged file")


def scan_gguf(path: str | os.PathLike) -> GGUFLayout:
    """Check a GGUF file's header, metadata and tensor infos against the file (see the module docstring).

    Raises:
        FileNotFoundError: no such file. BadFileError: what is wrong, naming the file.
    Example:
        >>> scan_gguf("out/m.gguf").values["general.architecture"]
        'llama'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no such GGUF file")
    size = path.stat().st_size
    if size < 24:
        raise BadFileError(path, f"not a GGUF file ({size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur, layout = _Cursor(buf, path), GGUFLayout()
        if bytes(buf[:4]) != b"GGUF":
            raise BadFileError(path, "corrupted GGUF file: no GGUF magic (not a GGUF file)")
        cur.pos = 4
        version = cur.scalar("<I", "the version")
        if version not in (2, 3):
            raise BadFileError(path, f"GGUF version {version}; this reader takes 2 and 3")
        n_tensors, n_kv = cur.scalar("<Q", "the tensor count"), cur.scalar("<Q", "the metadata count")
        if n_tensors > size // 32 or n_kv > size // 13:
            raise BadFileError(path, f"corrupted GGUF file: {n_tensors} tensors and {n_kv} metadata pairs cannot fit "
                                     f"in {size} bytes")
        types = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}", 1 << 16)
            if key in types:
                raise BadFileError(path, f"corrupted GGUF file: metadata key {key!r} appears twice")
            types[key] = cur.scalar("<I", f"the value type of {key}")
            layout.values[key] = _value(cur, types[key], key, layout)
        arch = layout.values.get("general.architecture")
        for key, vtype in types.items():
            _check_value(path, key, vtype, layout.values[key], arch if isinstance(arch, str) else None)
        alignment = layout.values.get("general.alignment", 32)
        if not 0 < alignment <= 1 << 16 or alignment & (alignment - 1):
            raise BadFileError(path, f"general.alignment = {alignment}: not a power of two up to 65536")
        table_start = cur.pos
        layout.tensors = _tensor_infos(cur, n_tensors)
        layout.table = (table_start, cur.pos)
        layout.data_start = cur.pos + (-cur.pos) % alignment
        _check_data(path, layout, alignment, size)
    return layout


def _digests(path: Path, layout: GGUFLayout) -> str:
    """The `qat.sha256` value the file should hold: file digest ":" tensor-table digest."""
    at, (t0, t1) = layout.checksum_at, layout.table
    whole = hashlib.sha256()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        whole.update(buf[:at])
        whole.update(PLACEHOLDER.encode())
        for start in range(at + len(PLACEHOLDER), len(buf), 64 << 20):
            whole.update(buf[start:start + (64 << 20)])
        table = hashlib.sha256(buf[t0:t1]).hexdigest()
    return f"{whole.hexdigest()}:{table}"


def seal_gguf(path: str | os.PathLike) -> None:
    """Write the file's checksums into its `qat.sha256` value (written as PLACEHOLDER by the exporter)."""
    path = Path(path)
    layout = scan_gguf(path)
    if layout.checksum_at is None or len(layout.values[CHECKSUM_KEY]) != len(PLACEHOLDER):
        raise ValueError(f"{path}: no {CHECKSUM_KEY} placeholder to seal")
    value = _digests(path, layout)
    with open(path, "r+b") as f:
        f.seek(layout.checksum_at)
        f.write(value.encode())


def verify_gguf_checksum(path: str | os.PathLike, layout: GGUFLayout) -> bool:
    """True when the file has a `qat.sha256` that applies and holds; False when it has none, or when its tensor
    table is not the one qat wrote (a tool such as llama-quantize rewrote the file and copied the key along: the
    structural checks alone apply then).

    Raises:
        BadFileError: the file differs from what qat wrote.
    """
    if layout.checksum_at is None:
        return False
    stored = layout.values[CHECKSUM_KEY]
    actual = _digests(Path(path), layout)
    if len(stored) != len(PLACEHOLDER) or stored[65:] != actual[65:]:
        return False
    if stored != actual:
        raise BadFileError(path, f"content differs from its {CHECKSUM_KEY}, which qat wrote: the file is corrupted, or "
                                 "was changed after export (re-export it; or, if you changed it on purpose, drop the key: "
                                 f"gguf_new_metadata.py --remove-metadata {CHECKSUM_KEY})")
    return True
