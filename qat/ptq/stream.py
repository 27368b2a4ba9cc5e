"""Out-of-core PTQ: load, calibrate and quantize one decoder block at a time from safetensors shards.

The model is built as a skeleton whose parameters live on the meta device (buffers such as rotary frequencies
are real: they are small and computed, not stored). The embeddings, final norm and head are loaded first; then
each decoder block's weights are read from the safetensors shards (only that block's bytes), the block is
prepared, solved by the method exactly as in memory, its outputs fed on, its prepared state written to the
output folder, and its weights dropped back to the meta device. Peak memory is about the non-block part plus
one block plus the calibration activations.

    info = stream_ptq("~/models/llama", "w4a16_g128", "gptq", batches, "out/model_parts")
    state = load_parts("out/model_parts")   # == the in-memory model's state_dict(), tensor for tensor

On a GPU (`device`) the non-block part and the block being solved live there; the parts are written from the CPU.

Used by `qat-ptq offload=stream`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from qat.arch import find_arch
from qat.errors import ConfigError
from qat.io import atomic_path, atomic_write_bytes
from qat.models import meta_model
from qat.primitives import check_tensor
from qat.ptq.api import method_config
from qat.ptq.checks import check_calibration
from qat.ptq.methods import PTQMethod, method_of_config
from qat.ptq.runner import quantized_linears
from qat.transform import apply_plan, load_recipe, plan
from qat.transform.recipe import as_recipe

INDEX = "index.json"


class ShardReader:
    """The tensors of a Hugging Face safetensors checkpoint (one file or an indexed set of shards), read by key.

    Example:
        >>> ShardReader("~/models/llama").read(lambda k: k.startswith("model.layers.0."))
    """

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32) -> None:
        self.folder, self.dtype = Path(folder).expanduser(), dtype
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: self.folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.folder / "model.safetensors").is_file():
            with open(self.folder / "model.safetensors", "rb") as f:
                keys = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            self.where = {k: self.folder / "model.safetensors" for k in keys if k != "__metadata__"}
        else:
            raise ConfigError(f"offload=stream reads safetensors: no model.safetensors or model.safetensors.index.json "
                              f"in {self.folder}")

    def read(self, select: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """The tensors whose key `select` accepts, in the model's dtype, each file opened once.

        Only their bytes are read (seek + read per tensor, from the file's JSON header): safetensors' own
        `safe_open` maps the whole shard copy-on-write, which a cap on private memory counts in full."""
        by_file: dict[Path, list[str]] = {}
        for key, file in self.where.items():
            if select(key):
                by_file.setdefault(file, []).append(key)
        out = {}
        for file, keys in by_file.items():
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
                for key in keys:
                    entry = header[key]
                    start, end = entry["data_offsets"]
                    f.seek(8 + header_len + start)
                    raw = bytearray(end - start)
                    f.readinto(raw)
                    t = (torch.frombuffer(raw, dtype=SAFETENSORS_DTYPES[entry["dtype"]]) if raw else
                         torch.empty(0, dtype=SAFETENSORS_DTYPES[entry["dtype"]])).reshape(entry["shape"])
                    out[key] = t.to(self.dtype) if t.is_floating_point() else t
        return out


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def skeleton(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of `folder`'s config.json with its parameters on the meta device (buffers real), in eval mode."""
    from transformers import AutoConfig

    return meta_model(AutoConfig.from_pretrained(str(Path(folder).expanduser())), dtype)


class StreamIO:
    """`qat.ptq.runner.BlockIO` over safetensors shards: loads and prepares block i, writes and frees it when done."""

    def __init__(self, model: nn.Module, reader: ShardReader, result, prefix: str, blocks: list[nn.Module],
                 out: Path, method: PTQMethod, device: torch.device | None = None) -> None:
        self.model, self.reader, self.result, self.prefix, self.blocks = model, reader, result, prefix, blocks
        self.out, self.method, self.parts, self.device = out, method, {}, device

    def load(self, i: int) -> nn.Module:
        name = f"{self.prefix}.{i}"
        block = self.blocks[i]
        state = {k[len(name) + 1:]: v for k, v in self.reader.read(lambda k: k.startswith(name + ".")).items()}
        for key, tensor in state.items():
            if tensor.is_floating_point():
                check_tensor(tensor, f"{name}.{key}")
        if on_device(self.device):
            state = {k: v.to(self.device) for k, v in state.items()}
        block.load_state_dict(state, strict=True, assign=True)
        if on_device(self.device):
            block.to(self.device)  # its buffers (real in the skeleton) too
        apply_plan(self.model, self.result, lambda n: n.startswith(name + "."))
        self.method.check(self.model, {f"{name}.{n}": m for n, m in quantized_linears(block).items()})
        return block

    def done(self, i: int, block: nn.Module) -> None:
        name = f"{self.prefix}.{i}"
        part = f"part-{i + 1:05d}.pt"
        self.parts[part] = save_part(block.state_dict(prefix=name + "."), self.out / part)
        block.to("meta")  # frees the weights; the skeleton stays for the module names


def on_device(device: torch.device | None) -> bool:
    """Whether the blocks compute somewhere else than where they are read (the CPU)."""
    return device is not None and device.type != "cpu"


def cpu_state(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with its tensors on the CPU (a tensor already there is kept as it is: the same object).

    Tensors that share a storage on the device (tied embeddings and lm_head, views) share one CPU copy of it, as
    `torch.save` stores one storage for them on the CPU: a file written after a GPU run holds what a CPU run's does.
    Storages are told apart as `torch.save` does (`_cdata`, the storage's identity; meta storages have no address).
    Example:
        >>> torch.save(cpu_state(model.state_dict()), "model.pt")   # loadable where there is no GPU
    """
    copies: dict[int, torch.UntypedStorage] = {}
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.device.type == "cpu":
            out[key] = value
            continue
        storage = value.untyped_storage()
        if storage._cdata not in copies:
            copies[storage._cdata] = storage.cpu()
        out[key] = torch.empty(0, dtype=value.dtype).set_(copies[storage._cdata], value.storage_offset(),
                                                          value.size(), value.stride())
    return out


def save_part(state: dict[str, Any], path: Path) -> list[str]:
    """Write one part of a streamed state dict (on the CPU, loadable with weights_only=True); returns its keys."""
    with atomic_path(path) as tmp:
        torch.save(cpu_state(state), tmp)
    return list(state)


def load_parts(folder: str | Path) -> dict[str, Any]:
    """The state dict a streamed PTQ wrote (`index.json` and its parts), merged: the prepared model's state_dict().

    Example:
        >>> model.load_state_dict(load_parts("outputs/ptq/run/model_parts"))
    """
    folder = Path(folder)
    index = json.loads((folder / INDEX).read_text())
    state: dict[str, Any] = {}
    for part in index["parts"]:
        state.update(torch.load(folder / part, weights_only=True))
    return state


def stream_ptq(source: str | Path, recipe: Any, method: Any, batches: Iterable[Any], out: str | Path,
               dtype: torch.dtype = torch.float32, progress: bool = True, device: torch.device | None = None) -> dict:
    """PTQ of the safetensors checkpoint in folder `source`, one decoder block in memory at a time.

    Args:
        source: a Hugging Face folder (config.json and model.safetensors or sharded model-*.safetensors).
        recipe: a recipe name, mapping or QuantRecipe.
        method: a block-by-block PTQ method name or config ("gptq", {"name": "awq", ...}).
        batches: calibration inputs, as for `qat.ptq.apply`.
        out: the folder the prepared state is written to, one part per block (see `load_parts`).
        device: where the model computes (None: the CPU); blocks are read on the CPU and moved there one at a time.
    Returns:
        {"method", options..., "seconds", "parts"}: what `model.qat_ptq` holds after an in-memory run.
    Raises:
        ConfigError: a method that does not work block by block, a model family `qat.arch` does not know,
            checkpoint keys that do not fit the config.
    """
    reader = ShardReader(source, dtype)
    model = skeleton(source, dtype)
    recipe = load_recipe(recipe) if isinstance(recipe, str) else as_recipe(recipe)
    cfg = method_config(method)
    solver: PTQMethod = method_of_config(cfg)(cfg)
    if type(solver).run is not PTQMethod.run:
        raise ConfigError(f"offload=stream runs block-by-block methods (gptq, awq, smoothquant); {solver.name} is not one")
    arch = find_arch(model)
    if arch is None:
        raise ConfigError(f"offload=stream needs a model family qat.arch knows (its decoder blocks); "
                          f"{type(model).__name__} is not one")
    prefix, blocks = arch.blocks(model)
    if getattr(recipe, "rotations", None) is not None:
        raise ConfigError("offload=stream does not apply a recipe's `rotations` (R1 rotates every block and the "
                          "embeddings at once); quantize this recipe in memory, or drop its rotations key")
    result = plan(model, recipe)
    outside = lambda n: not n.startswith(prefix + ".")  # noqa: E731
    _load_rest(model, reader, outside, source)
    if on_device(device):
        _place_rest(model, prefix, device)
    apply_plan(model, result, outside)
    model.qat_recipe = recipe
    batches = list(batches)
    check_calibration(solver.name, solver.needs_calibration, getattr(cfg, "min_tokens", 0), batches, model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    io = StreamIO(model, reader, result, prefix, blocks, out, solver, device)
    solver.block_io = io
    start = time.perf_counter()
    solver.run(model, batches, progress)
    seconds = time.perf_counter() - start
    rest = {k: v for k, v in model.state_dict().items() if outside(k)}
    parts = {"part-00000.pt": save_part(rest, out / "part-00000.pt"), **io.parts}
    atomic_write_bytes(out / INDEX, json.dumps({"parts": sorted(parts)}, indent=1).encode())
    return {"method": solver.name, **dataclasses.asdict(cfg), "seconds": seconds, "offload": "stream", "parts": str(out)}


def _place_rest(model: nn.Module, prefix: str, device: torch.device) -> None:
    """Move everything but the decoder blocks (the ModuleList at `prefix`, still on the meta device) to `device`:
    the list is set aside while the model moves; the head is tied again if configured (a move may untie it)."""
    parent, _, attr = prefix.rpartition(".")
    owner = model.get_submodule(parent)
    held = getattr(owner, attr)
    setattr(owner, attr, nn.ModuleList())
    try:
        model.to(device)
    finally:
        setattr(owner, attr, held)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _load_rest(model: nn.Module, reader: ShardReader, outside: Callable[[str], bool], source) -> None:
    """Load the weights outside the decoder blocks (embeddings, final norm, head) and tie the head if configured."""
    state = reader.read(outside)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ConfigError(f"{source}: checkpoint keys the config does not have: {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still = [n for n, p in model.named_parameters() if outside(n) and p.is_meta]
    if still:
        raise ConfigError(f"{source}: the checkpoint has no weights for {still[:5]}")
