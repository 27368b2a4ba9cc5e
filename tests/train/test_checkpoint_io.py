"""Checkpoints stream to a temporary file and are renamed into place (`qat.lit.checkpoint_io.FileCheckpointIO`):
never Lightning's in-memory buffer (twice the checkpoint's size in extra memory), never a half-written file, and
every trainer config installs it."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from qat.lit.checkpoint_io import FileCheckpointIO


def test_saves_without_the_in_memory_buffer_and_never_half_written(tmp_path, monkeypatch):
    import lightning_fabric.utilities.cloud_io as cloud_io

    monkeypatch.setattr(cloud_io, "_atomic_save", lambda *a, **k: pytest.fail("went through the in-memory buffer"))
    io = FileCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(6.0)}, "epoch": 1}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.arange(6.0))

    def broken(obj, f, *args, **kwargs):  # a save that dies half-way (disk full, killed)
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(6)}}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.arange(6.0))  # the old one intact
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


@pytest.mark.parametrize("trainer", ["default", "ddp", "fsdp"])
def test_every_trainer_config_installs_it(compose_train, tmp_path, trainer):
    cfg = compose_train([f"trainer={trainer}", "trainer.accelerator=cpu"], tmp_path)
    built = instantiate(cfg.trainer)
    assert isinstance(built.strategy.checkpoint_io, FileCheckpointIO)
