"""qat.io: atomic writes leave the old file or the new one, never a partial one; safe loading refuses code."""
import json
import os

import pytest
import torch

from qat.io import (atomic_folder, atomic_path, check_creatable, check_safetensors, load_safetensors,
                    load_torch_checkpoint, write_json, write_safetensors)


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("crash")
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["a.json"]  # no temporary left behind


def test_atomic_folder_replaces_whole(tmp_path):
    dest = tmp_path / "model"
    with atomic_folder(dest) as tmp:
        (tmp / "x").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(dest) as tmp:
        (tmp / "x").write_text("new")
        raise RuntimeError("crash")
    assert (dest / "x").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["model"]
    with atomic_folder(dest) as tmp:
        (tmp / "y").write_text("new")
    assert sorted(os.listdir(dest)) == ["y"]


def test_check_creatable_creates_nothing(tmp_path):
    assert check_creatable(tmp_path / "a" / "b" / "m.gguf") == tmp_path / "a" / "b" / "m.gguf"
    assert not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="not writable.*a file is in the way"):
        check_creatable(tmp_path / "f" / "m.gguf")


def test_streamed_safetensors_round_trip_and_truncation(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.int8).reshape(2, 3), "b": torch.randn(4, dtype=torch.float64),
               "c": torch.randn(3, dtype=torch.bfloat16)}
    path = tmp_path / "t.safetensors"
    write_safetensors(iter(tensors.items()), path, {"k": "v"})
    loaded = load_safetensors(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        check_safetensors(path)


class Payload:
    """An object whose unpickling needs this module's code."""


def test_torch_checkpoint_refuses_code(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    assert torch.equal(load_torch_checkpoint(path)["w"], torch.ones(2))
    torch.save({"w": torch.ones(2), "f": Payload()}, path)
    with pytest.raises(ValueError, match="weights-only"):
        load_torch_checkpoint(path)


def test_sharded_checkpoint_reads_model_state_in_one_process(tmp_path):
    """A torch.distributed.checkpoint folder as Lightning's ModelParallelStrategy writes it: the model state
    (with DCP-flattened extra states put back together), not the optimizer state; a broken folder is named."""
    import torch.distributed.checkpoint as dcp

    from qat.errors import BadFileError
    from qat.io import is_distributed_checkpoint, load_distributed_checkpoint

    w = torch.randn(4, 6)
    state = {"state_dict": {"model.lin.weight": w, "model.lin.q._extra_state": {"enabled": True, "scheme": "int4"}},
             "optimizer_0": {"state": {"model.lin.weight": {"exp_avg": torch.ones(4, 6)}}}}
    dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    assert is_distributed_checkpoint(tmp_path / "ckpt") and not is_distributed_checkpoint(tmp_path)
    loaded = load_torch_checkpoint(tmp_path / "ckpt")
    assert set(loaded) == {"model.lin.weight", "model.lin.q._extra_state"}
    assert torch.equal(loaded["model.lin.weight"], w)
    assert loaded["model.lin.q._extra_state"] == {"enabled": True, "scheme": "int4"}
    for shard in (tmp_path / "ckpt").glob("*.distcp"):
        shard.write_bytes(b"truncated")
    with pytest.raises(BadFileError, match="sharded"):
        load_distributed_checkpoint(tmp_path / "ckpt")
