"""Loaders that validate before they trust (#15 defects 4-8): hostile GGUF counts and types, changed tensor infos,
non-finite hyper-parameters and scales, schemes that do not match the tensors; each a BadFileError, fast."""
from __future__ import annotations

import json
import struct
import time

import gguf
import pytest
import torch

from qat.errors import BadFileError, ConfigError
from qat.export import load_any
from qat.export.gguf_check import seal_gguf
from qat.export.validate import CHECKSUMS, bad_file, write_checksums

from tests.export import fuzz


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return fuzz.make_exports(tmp_path_factory.mktemp("hostile-src"))


def _patch_gguf(src, dst, edit, reseal=True):
    data = bytearray(src.read_bytes())
    edit(data, gguf.GGUFReader(str(src)))
    dst.write_bytes(bytes(data))
    if reseal:
        seal_gguf(dst)


def _pos(reader, part):
    return part.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]


def _refused_fast(path, match):
    start = time.perf_counter()
    with pytest.raises(BadFileError, match=match):
        load_any(path)
    assert time.perf_counter() - start < 5


def test_huge_block_count_is_refused_before_any_allocation(exports, tmp_path):
    def edit(data, reader):
        p = _pos(reader, reader.fields["llama.block_count"].parts[-1])
        data[p:p + 4] = struct.pack("<I", 1 << 31)
    _patch_gguf(exports["gguf"], tmp_path / "b.gguf", edit)
    _refused_fast(tmp_path / "b.gguf", "block_count|num_hidden_layers|parameters")


@pytest.mark.parametrize("key", ["general.architecture", "general.name"])
def test_wrong_value_type_is_refused_without_eating_memory(exports, tmp_path, key):
    def edit(data, reader):  # a string read as an array: its bytes become a huge item count
        p = _pos(reader, reader.fields[key].parts[2])
        data[p:p + 4] = struct.pack("<I", 9)
    _patch_gguf(exports["gguf"], tmp_path / "t.gguf", edit, reseal=False)
    _refused_fast(tmp_path / "t.gguf", "GGUF")


@pytest.mark.parametrize("part,value", [(4, 2), (4, 30), (5, 32), (5, 1 << 40)])  # type Q4_0 / BF16; offsets
def test_changed_tensor_type_or_offset_is_refused(exports, tmp_path, part, value):
    def edit(data, reader):
        t = reader.tensors[1].field.parts[part]
        p = _pos(reader, t)
        data[p:p + t.nbytes] = struct.pack("<I" if t.nbytes == 4 else "<Q", value)
    _patch_gguf(exports["gguf"], tmp_path / "o.gguf", edit, reseal=False)
    _refused_fast(tmp_path / "o.gguf", "tensor|GGUF")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_non_finite_or_non_positive_rope_base_is_refused(exports, tmp_path, value):
    def edit(data, reader):
        p = _pos(reader, reader.fields["llama.rope.freq_base"].parts[-1])
        data[p:p + 4] = struct.pack("<f", value)
    _patch_gguf(exports["gguf"], tmp_path / "r.gguf", edit, reseal=False)
    _refused_fast(tmp_path / "r.gguf", "freq_base")


def _resealed_copy(src, dst, edit):
    import shutil
    shutil.copytree(src, dst)
    edit(dst)
    (dst / CHECKSUMS).unlink()
    write_checksums(dst)
    return dst


def _edit_tensor(folder, name_part, fn):
    from qat.io import load_safetensors, save_safetensors
    t = load_safetensors(folder / "model.safetensors")
    key = next(k for k in t if name_part in k)
    t[key] = fn(t[key])
    save_safetensors(t, folder / "model.safetensors", metadata={"format": "pt", "qat": "qat-native"})


@pytest.mark.parametrize("name,fn", [("input_layernorm", lambda w: w.fill_(float("nan"))),
                                     ("qweight.scale", lambda s: -s.abs()),
                                     ("norm.weight", lambda w: w.view(torch.int32))])  # F32 stored as I32
def test_non_finite_negative_or_mistyped_tensors_are_refused(exports, tmp_path, name, fn):
    out = _resealed_copy(exports["native"], tmp_path / "n", lambda d: _edit_tensor(d, name, fn))
    _refused_fast(out, "")


def test_zero_rms_eps_is_refused(exports, tmp_path):
    def edit(d):
        c = json.loads((d / "config.json").read_text())
        c["rms_norm_eps"] = 0.0
        (d / "config.json").write_text(json.dumps(c))
    _refused_fast(_resealed_copy(exports["gptq"], tmp_path / "g", edit), "rms_norm_eps")


def test_compressed_tensors_num_bits_changed_is_refused(exports, tmp_path):
    def edit(d):
        c = json.loads((d / "config.json").read_text())
        for g in c["quantization_config"]["config_groups"].values():
            g["weights"]["num_bits"] = 8
        (d / "config.json").write_text(json.dumps(c))
    _refused_fast(_resealed_copy(exports["compressed_tensors"], tmp_path / "c", edit), "weight_packed")


def test_edited_native_scheme_is_refused_by_its_checksum(exports, tmp_path):
    import shutil
    out = tmp_path / "n"
    shutil.copytree(exports["native"], out)
    meta = json.loads((out / "qat_quant.json").read_text())
    for entry in meta["modules"].values():
        entry["weight"]["signed"] = False
    (out / "qat_quant.json").write_text(json.dumps(meta))
    _refused_fast(out, "SHA-256")


def test_metadata_changed_by_another_tool_is_refused_until_our_key_is_dropped(exports, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(sys.executable).with_name("gguf-new-metadata")
    if not tool.exists():
        pytest.skip("gguf-new-metadata (the gguf package's script) is not installed")
    renamed, dropped = tmp_path / "renamed.gguf", tmp_path / "dropped.gguf"
    subprocess.run([str(tool), str(exports["gguf"]), str(renamed), "--general-name", "other", "--force"], check=True,
                   capture_output=True, timeout=120)
    with pytest.raises(BadFileError, match="changed after export.*--remove-metadata qat.sha256"):
        load_any(renamed)
    subprocess.run([str(tool), str(renamed), str(dropped), "--remove-metadata", "qat.sha256", "--force"], check=True,
                   capture_output=True, timeout=120)
    with torch.no_grad():
        assert torch.equal(load_any(dropped)(fuzz.IDS).logits, load_any(exports["gguf"])(fuzz.IDS).logits)


def test_bad_file_keeps_the_list_an_inner_error_announces(tmp_path):
    """bad_file keeps an inner message whole on one line: a long first line (was: cut at 300 characters, losing
    the list of what qat reads) and the lines a first line ending in ":" announces."""
    known = {"mxfp4-pack-quantized": (4, 32), "nvfp4-pack-quantized": (4, 16), "mxfp8-quantized": (8, 32)}
    inner = (f"compressed-tensors: model.layers.0.self_attn.q_proj has format 'mxfp4-pack-quantized' with weights "
             f"{ {'num_bits': 4, 'group_size': 64, 'type': 'float', 'strategy': 'group', 'symmetric': True} }; "
             f"qat reads these (format: (num_bits, group_size)): {known}")
    for raised, expect in ((ConfigError(inner), str(known)), (ValueError("bad scheme; qat reads:\n  a\n  b"), "qat reads: a; b")):
        with pytest.raises(BadFileError) as err, bad_file(tmp_path / "m", "compressed-tensors export"):
            raise raised
        assert expect in str(err.value) and "\n" not in str(err.value)


def test_a_missing_entry_is_called_missing(tmp_path):
    """A KeyError while reading a checked file says which entry is missing (was: the bare key after 'KeyError:')."""
    from qat.errors import BadFileError
    from qat.export.validate import bad_file

    with pytest.raises(BadFileError, match=r"corrupted or inconsistent export \(missing entry 'm\.weight_scale'\)"):
        with bad_file(tmp_path / "model.safetensors", "export"):
            {}["m.weight_scale"]


def test_a_keyerror_with_a_sentence_is_not_called_a_missing_entry(tmp_path):
    from qat.errors import BadFileError
    from qat.export.validate import bad_file

    with pytest.raises(BadFileError, match=r"\(KeyError: 'Q9_9' has no grid\)"):
        with bad_file(tmp_path / "m.gguf", "GGUF file"):
            raise KeyError("'Q9_9' has no grid")
