"""Checkpoints written straight to disk: Lightning's `TorchCheckpointIO` serialises a checkpoint into an in-memory
buffer and then copies the buffer's bytes out (`lightning_fabric.utilities.cloud_io._atomic_save`), so saving needs
about twice the checkpoint's size in extra memory (weights, Adam's two moments and the quantizer state: ~8 GB for
a 692M-parameter model, which took a 23 GB machine that trains it in 16 GB out of memory at its last step).
`FileCheckpointIO` has `torch.save` write a temporary file beside the target and renames it onto the target when
complete (`qat.io.atomic_path`): no extra copy, and never a half-written checkpoint. Remote (fsspec) paths keep
Lightning's way. The trainer configs install it (`configs/trainer/default.yaml`, `plugins`).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins.io import TorchCheckpointIO

from qat.io import atomic_path


class FileCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves stream to a temporary file, then rename (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
