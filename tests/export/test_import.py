"""Importers: HF folders, .bin / .pt through weights-only unpickling, GGUF; bad files are refused."""
from __future__ import annotations

import pytest
import torch

from qat.export import detect_format, load_any
from tests.export.conftest import logits


class NeedsCode:  # a pickle of this needs code to load: must be refused
    pass


def test_hf_folder_and_safetensors(model, ids, tmp_path):
    model.save_pretrained(tmp_path / "hf")
    assert detect_format(tmp_path / "hf") == "hf"
    assert torch.equal(logits(load_any(tmp_path / "hf"), ids), logits(model, ids))


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_torch_file_weights_only(model, ids, tmp_path, suffix):
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / f"w{suffix}")
    assert torch.equal(logits(load_any(tmp_path / f"w{suffix}"), ids), logits(model, ids))


def test_pickles_that_need_code_and_truncated_files_are_refused(model, tmp_path):
    model.config.save_pretrained(tmp_path)
    torch.save({"x": NeedsCode()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing pickles that need code"):
        load_any(tmp_path / "evil.pt")
    torch.save(model.state_dict(), tmp_path / "w.bin")
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_any(tmp_path / "cut.bin")


def test_truncated_safetensors_folder_is_refused(model, tmp_path):
    model.save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated safetensors"):
        load_any(tmp_path / "hf")


@pytest.mark.parametrize("arch,match", [("gpt2", "GGUF architecture 'gpt2' \\(general.architecture\\) is not supported"),
                                        ("llama", "GGUF metadata lacks \\['llama.attention.head_count'"),
                                        ("qwen3", "GGUF metadata lacks \\['qwen3.attention.head_count'")])
def test_gguf_of_another_architecture_or_without_llama_metadata_names_the_file(tmp_path, arch, match):
    import gguf
    import numpy as np

    from qat.export import load_any

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=f"'{path}': {match}"):
        load_any(path)
