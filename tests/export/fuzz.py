"""Corrupted copies of exports, for the fuzz test (tests/export/test_fuzz_loaders.py) and scripts/fuzz_loaders.py.

`make_exports(folder)` writes the four formats of one tiny model; `mutate(kind, src, dst, rng)` writes a corrupted
copy of an export. Two families of mutation:
- sealed: bytes changed under qat's checksums (truncation, bit flips anywhere): the checksum or a structural check
  must refuse them;
- resealed: a structural edit (a tensor type, offset, count, dtype, shape, a scheme's num_bits...) with the checksum
  recomputed, as a file from a tool without checksums would be: the structural checks alone must refuse them, or
  the file must still load as the same model. (A scheme edited into another valid one, e.g. native `signed: false`,
  is a different model no structure can tell apart: only the checksum refuses it, so it is a sealed-only case.)
"""
from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import torch

import qat
from qat import testing
from qat.export import export
from qat.export.gguf_check import CHECKSUM_KEY, seal_gguf
from qat.export.validate import CHECKSUMS, write_checksums

FORMATS = ("gguf", "native", "compressed_tensors", "gptq")
SEALED = ("truncate", "flip_header", "flip_any")
RESEALED = {"gguf": ("tensor_type", "tensor_offset", "tensor_dims", "kv_type", "count", "kv_float"),
            "native": ("st_dtype", "st_shape", "st_offsets", "json_scheme", "json_value"),
            "compressed_tensors": ("st_dtype", "st_shape", "st_offsets", "json_scheme", "json_value"),
            "gptq": ("st_dtype", "st_shape", "st_offsets", "json_scheme", "json_value")}


def fuzz_model():
    """The tiny model the fuzzers corrupt exports of (rows of 128: Q8_0 blocks and groups of 128 fit)."""
    return testing.tiny_llama(vocab_size=96, hidden_size=128, intermediate_size=256, num_layers=1,
                              max_position_embeddings=64, seed=3)


def make_exports(folder: Path) -> dict[str, Path]:
    """One export per format of `fuzz_model()`; returns format -> path."""
    model = fuzz_model()
    prepared = qat.prepare(model, qat.load_recipe("gptq_w4a16_g128"))
    paths = {"gguf": folder / "m.gguf", "native": folder / "native", "compressed_tensors": folder / "ct",
             "gptq": folder / "gptq"}
    export(model, paths["gguf"], "gguf", "Q8_0")
    for fmt in FORMATS[1:]:
        export(prepared, paths[fmt], fmt)
    return paths


def kinds(fmt: str) -> tuple[str, ...]:
    return SEALED + RESEALED[fmt]


def _flip(data: bytearray, lo: int, hi: int, rng: random.Random) -> None:
    i = rng.randrange(lo, max(hi, lo + 1))
    data[i] ^= 1 << rng.randrange(8)


def _gguf_fields(path: Path):
    """(kv value-type positions, float value positions, tensor (dims, type, offset) positions, count positions,
    data start) of a trusted GGUF file."""
    reader = gguf.GGUFReader(str(path))
    base = reader.data.__array_interface__["data"][0]
    pos = lambda part: part.__array_interface__["data"][0] - base  # noqa: E731
    vtypes, floats, counts = [], [], [16, 8]
    for f in reader.fields.values():
        if f.name == CHECKSUM_KEY or len(f.parts) < 3:
            continue
        vtypes.append(pos(f.parts[2]))
        if f.types and f.types[0] == gguf.GGUFValueType.FLOAT32:
            floats.append(pos(f.parts[-1]))
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            counts.append(pos(f.parts[4]))
        counts.append(pos(f.parts[0]))
    tensors = [(pos(t.field.parts[3]), pos(t.field.parts[4]), pos(t.field.parts[5])) for t in reader.tensors]
    return vtypes, floats, tensors, counts, int(reader.data_offset)


def _mutate_gguf(kind: str, data: bytearray, src: Path, rng: random.Random) -> bool:
    """Edit `data` in place; True when the checksum is to be recomputed."""
    vtypes, floats, tensors, counts, start = _gguf_fields(src)
    dims, ttype, offset = rng.choice(tensors)
    if kind == "tensor_type":
        data[ttype:ttype + 4] = struct.pack("<I", rng.choice([0, 1, 2, 3, 6, 7, 8, 10, 12, 14, 20, 30, 99, 1 << 31]))
    elif kind == "tensor_offset":
        old = struct.unpack_from("<Q", data, offset)[0]
        new = rng.choice([old + 32, max(old - 32, 0), old + 1, 0, 1 << 40, rng.randrange(1 << 64)])
        data[offset:offset + 8] = struct.pack("<Q", new)
    elif kind == "tensor_dims":
        data[dims:dims + 8] = struct.pack("<Q", rng.choice([0, 1, 31, 33, 64 * 2, 1 << 31, 1 << 62]))
    elif kind == "kv_type":
        p = rng.choice(vtypes)
        data[p:p + 4] = struct.pack("<I", rng.randrange(14))
    elif kind == "count":
        p = rng.choice(counts)
        data[p:p + 8] = struct.pack("<Q", rng.choice([0, 1 << 31, 1 << 63, rng.randrange(1 << 20)]))
    elif kind == "kv_float":
        p = rng.choice(floats)
        data[p:p + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), -1.0, 0.0]))
    return True


def _read_st(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_st(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _mutate_st(kind: str, data: bytes, rng: random.Random) -> bytes:
    header, body = _read_st(data)
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    if kind == "st_dtype":  # not F16 <-> BF16: scales may be stored in either, a valid other model
        halves = {"F16", "BF16"}
        choices = ["F32", "I32", "F16", "BF16", "U8", "I8", "I64", "F64", "BOOL", "X9"]
        entry["dtype"] = rng.choice([d for d in choices if not {d, entry["dtype"]} <= halves or d == entry["dtype"]])
    elif kind == "st_shape":
        shape = entry["shape"] or [1]
        i = rng.randrange(len(shape))
        shape[i] = rng.choice([0, shape[i] + 1, max(shape[i] - 1, 0), shape[i] * 2, 1 << 40, -1])
        entry["shape"] = shape
    else:
        b, e = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b + 4, e + 4], [b, e - 4], [max(b - 4, 0), e], [0, e - b], [e, b],
                                            [b, 1 << 50]])
    return _write_st(header, body)


_JSON_EDITS = {
    "native": [("qat_quant.json", "modules.*.weight.bits", [2, 3, 8]),
               ("qat_quant.json", "modules.*.weight.group_size", [32, 64, 0, -1]),
               ("qat_quant.json", "modules.*.weight.symmetric", [False]),
               ("qat_quant.json", "modules.*.shape", [[64, 63], [1, 64]]),
               ("qat_quant.json", "modules.*.kind", ["embedding", "conv"])],
    "compressed_tensors": [("config.json", "quantization_config.config_groups.*.weights.num_bits", [2, 8, 3, 0]),
                           ("config.json", "quantization_config.config_groups.*.weights.symmetric", [False]),
                           ("config.json", "quantization_config.config_groups.*.weights.group_size", [32, 64, 0]),
                           ("config.json", "quantization_config.config_groups.*.weights.strategy", ["channel", "tensor"]),
                           ("config.json", "quantization_config", [None, {}])],
    "gptq": [("quantize_config.json", "bits", [2, 8, 3]), ("quantize_config.json", "sym", [False]),
             ("quantize_config.json", "group_size", [32, 64, -1, 0]),
             ("quantize_config.json", "checkpoint_format", ["gptq_v2"])],
}
_VALUE_EDITS = [("config.json", "rms_norm_eps", [0.0, -1.0, float("nan"), float("inf")]),
                ("config.json", "num_attention_heads", [0, 3, -4, 1 << 31]),
                ("config.json", "num_hidden_layers", [0, 1 << 31]), ("config.json", "hidden_size", [0, 1 << 20]),
                ("config.json", "rope_theta", [0.0, float("nan"), -10000.0])]


def _set(obj, keys: list[str], value, rng: random.Random):
    for k in keys[:-1]:
        obj = obj[rng.choice(sorted(obj))] if k == "*" else obj[k]
    obj[keys[-1]] = value


def _mutate_json(fmt: str, kind: str, folder: Path, rng: random.Random) -> None:
    file, path, values = rng.choice(_JSON_EDITS[fmt] if kind == "json_scheme" else _VALUE_EDITS)
    data = json.loads((folder / file).read_text())
    _set(data, path.split("."), rng.choice(values), rng)
    (folder / file).write_text(json.dumps(data))


def mutate(fmt: str, kind: str, src: Path, dst: Path, rng: random.Random) -> None:
    """Write a corrupted copy of export `src` (format `fmt`) at `dst` (see the module docstring)."""
    if fmt == "gguf":
        data = bytearray(src.read_bytes())
        start = _gguf_fields(src)[4]
        if kind == "truncate":
            data = data[:rng.randrange(len(data))]
        elif kind == "flip_header":
            _flip(data, 0, start, rng)
        elif kind == "flip_any":
            _flip(data, 0, len(data), rng)
        else:
            _mutate_gguf(kind, data, src, rng)
        dst.write_bytes(bytes(data))
        if kind in RESEALED["gguf"]:
            try:
                seal_gguf(dst)
            except Exception:  # a header the scan refuses cannot be resealed: the loader must refuse it too
                pass
        return
    shutil.copytree(src, dst)
    if kind in SEALED:
        files = ["model.safetensors", "config.json", CHECKSUMS] + [f for f in ("qat_quant.json", "quantize_config.json")
                                                                   if (dst / f).exists()]
        target = dst / rng.choice(files)
        data = bytearray(target.read_bytes())
        if kind == "truncate":
            data = data[:rng.randrange(len(data))]
        else:
            hi = struct.unpack_from("<Q", data)[0] + 8 if kind == "flip_header" and target.suffix == ".safetensors" \
                else len(data)
            _flip(data, 0, min(hi, len(data)), rng)
        target.write_bytes(bytes(data))
        return
    (dst / CHECKSUMS).unlink()
    if kind.startswith("st_"):
        target = dst / "model.safetensors"
        target.write_bytes(_mutate_st(kind, target.read_bytes(), rng))
    else:
        _mutate_json(fmt, kind, dst, rng)
    write_checksums(dst)


def reference_logits(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Logits of each intact export, loaded, on fixed ids."""
    return {fmt: logits_of(qat.export.load_any(p)) for fmt, p in paths.items()}


IDS = torch.arange(24).reshape(2, 12) * 3 % 96


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def outcome(path: Path, reference: torch.Tensor) -> str:
    """'refused' (BadFileError), 'identical' (loads as the original), 'SILENT' (loads, differs) or
    'unexpected <type>' for a corrupted export at `path`."""
    from qat.errors import BadFileError

    try:
        model = qat.export.load_any(path)
    except BadFileError:
        return "refused"
    except Exception as err:  # noqa: BLE001  (what the fuzzers count)
        return f"unexpected {type(err).__name__}: {str(err)[:200]}"
    try:
        out = logits_of(model)
    except Exception as err:  # noqa: BLE001  (loaded, then failed: what the loaders must refuse instead)
        return f"unexpected at forward {type(err).__name__}: {str(err)[:200]}"
    return "identical" if out.shape == reference.shape and torch.equal(out, reference) else "SILENT"


def seeded(seed: int) -> random.Random:
    return random.Random(seed)


__all__ = ["FORMATS", "fuzz_model", "kinds", "make_exports", "mutate", "outcome", "reference_logits", "seeded",
           "np"]
