"""Where the qat-ptq / qat-compare / qat-eval / qat-sensitivity jobs compute: the top-level `device` key, and the
processes of distributed PTQ (`distributed.processes`), one device each.

    device=auto      (the default) cuda when torch sees a CUDA device, else cpu; with distributed.processes=N, cuda
                     only when there are at least N CUDA devices (one per process), else cpu
    device=cpu       the CPU (a model there is left untouched: the jobs' code path before this key)
    device=cuda      the current CUDA device; distributed: process r on cuda:r (under torchrun: cuda:LOCAL_RANK)
    device=cuda:N    CUDA device N (one process only)

The environment variable QAT_DEVICE replaces the default `auto` (`default_device`; empty: auto; the configs read it
through `${qat_device:}`; the test suite sets QAT_DEVICE=cpu, so that its CPU reference results hold on a host with
a GPU). A bad value that is QAT_DEVICE's is refused naming QAT_DEVICE. The model, the calibration batches and the
evaluation batches go to the device; what is written (model.pt, model_parts/, exports) is moved to the CPU first.
qat-train places its model through Lightning (`trainer.accelerator`, `trainer.devices`), not through this key; a
QAT row of qat-compare maps the compare job's key onto them (`lightning_placement`), unless the user's own qat-train
overrides set them.

`device_errors` and `check_processes` refuse a bad value before any model loads, naming the key and what is valid.
"""
from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from qat.errors import ConfigError
from qat.jobs.config import as_count, default_device
from qat.ptq import distributed_methods, method_config, method_of_config
from qat.ptq.distributed import mergeable_range_errors
from qat.transform import as_recipe

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
CALIBRATION_ROWS = 8  # calibration sequences per batch (qat-ptq's batches; distributed PTQ splits them)


def _parse(value: Any) -> tuple[str, int | None] | None:
    """("auto" | "cpu" | "cuda", index or None) of a device setting; None for anything else."""
    word = value.strip().lower() if isinstance(value, str) else None
    if word in ("auto", "cpu", "cuda"):
        return word, None
    match = re.fullmatch(r"cuda:(\d+)", word or "")
    return ("cuda", int(match.group(1))) if match else None


def device_errors(value: Any, processes: int = 1, torchrun: bool = False) -> list[str]:
    """What is wrong with `device=value` on this host for a run of `processes` processes (none: it is usable).

    `torchrun`: the processes are torchrun's (WORLD_SIZE in the environment), not distributed.processes: the
    messages say so, and a single device (cuda:N) is refused for any world of more than one process, whose ranks
    each compute on cuda:LOCAL_RANK.
    Example:
        >>> device_errors("gpu")
        ["device='gpu'; choose auto, cpu, cuda or cuda:N (auto: cuda when available, else cpu)"]
    """
    parsed = _parse(value)
    if parsed is None:
        return [f"{_named(value)}; choose {DEVICE_CHOICES} (auto: cuda when available, else cpu)"]
    kind, index = parsed
    if kind != "cuda":
        return []
    if not torch.cuda.is_available():
        return [f"{_named(value)}: no CUDA device here (torch.cuda.is_available() is False; torch "
                f"{torch.__version__}); choose device=cpu or device=auto"]
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        return [f"{_named(value)}: this host has {count} CUDA device(s); choose cuda:0..cuda:{count - 1}, cuda, "
                "auto or cpu"]
    world = int(os.environ.get("WORLD_SIZE") or 1) if torchrun else 1
    if index is not None and torchrun and max(processes, world) > 1:
        return [f"{_named(value)} places one process; under torchrun (WORLD_SIZE={world}, {processes} process(es) on "
                "this host) each process computes on cuda:LOCAL_RANK: use device=cuda (or auto)"]
    if index is not None and processes > 1:
        return [f"{_named(value)} places one process; distributed.processes={processes} puts process r on cuda:r: "
                "use device=cuda (or auto)"]
    if processes > count:
        who, fewer = ((f"{processes} processes on this host (torchrun)", f"torchrun --nproc-per-node<={count}")
                      if torchrun else (f"distributed.processes={processes}", f"distributed.processes<={count}"))
        return [f"{who} with {_named(value)} needs one CUDA device per process; this host has {count}: choose "
                f"{fewer}, or device=cpu"]
    return []


def _named(value: Any) -> str:
    """`device=<value>` as a message names it, saying so when the value is QAT_DEVICE's (the default of the configs:
    the user may not know it is set)."""
    env = os.environ.get("QAT_DEVICE", "")
    return f"device={value!r} (from QAT_DEVICE={env!r})" if env.strip() and value == env else f"device={value!r}"


def resolve_device(value: Any = None, processes: int = 1) -> torch.device:
    """The torch.device a job computes on (`value` None: `default_device()`); see the module docstring.

    Raises:
        ConfigError: what `device_errors` names.
    Example:
        >>> resolve_device("auto")   # on a host without CUDA
        device(type='cpu')
    """
    value = default_device() if value is None else value
    errors = device_errors(value, processes)
    if errors:
        raise ConfigError(errors[0])
    kind, index = _parse(value)
    if kind == "auto":
        usable = torch.cuda.is_available() and torch.cuda.device_count() >= processes
        return torch.device("cuda" if usable else "cpu")
    return torch.device(kind, index) if index is not None else torch.device(kind)


def lightning_placement(device: torch.device) -> dict[str, Any]:
    """Lightning's `trainer.accelerator` / `trainer.devices` for a run on `device` (`resolve_device`'s answer): a QAT
    row of qat-compare trains where the compare job's fp / PTQ rows compute.

    Example:
        >>> lightning_placement(torch.device("cuda", 1))
        {'accelerator': 'gpu', 'devices': [1]}
    """
    if device.type == "cpu":
        return {"accelerator": "cpu", "devices": 1}
    # plain `cuda` is the current device, cuda:0 in a fresh process: Lightning's first device
    return {"accelerator": "gpu", "devices": [device.index] if device.index is not None else 1}


def place(model: nn.Module, device: torch.device | None) -> nn.Module:
    """`model` moved to `device` (None or the CPU for a model on the CPU: the model itself, untouched)."""
    if device is None or device.type == "cpu" and all(p.device.type == "cpu" for p in model.parameters()):
        return model
    return model.to(device)


def torchrun_processes() -> int:
    """The processes of this host under torchrun (LOCAL_WORLD_SIZE, else WORLD_SIZE); 1 outside torchrun."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)


def check_processes(cfg: dict, method: dict, cpus: int) -> int:
    """distributed.processes: a positive integer; above 1, a method that runs distributed, in memory, with at least
    one calibration batch per process, static activation / KV ranges only where they merge exactly (minmax, not
    learned: `mergeable_range_errors`), and one device per process: at most `cpus` (the usable CPU cores) CPU
    processes, at most the CUDA devices with device=cuda (`device_errors`). Checked before any process is spawned.

    CPU ranks (gloo) each hold a whole model: more ranks than cores share the same cores and multiply the memory,
    so they are refused here. `qat.ptq.distributed.launch` itself takes any number (tests oversubscribe on purpose
    to check the weights do not depend on it).
    Raises:
        ConfigError: naming the key and what is valid.
    """
    section = cfg.get("distributed") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"distributed={section!r}: a section, not a value; use distributed.processes=N")
    processes = as_count(section.get("processes", 1), "distributed.processes", 1)
    ranks = max(processes, torchrun_processes())  # the processes on this host, one device each
    torchrun = int(os.environ.get("WORLD_SIZE") or 1) > 1 and processes == 1  # the ranks are torchrun's
    errors = device_errors(cfg.get("device", default_device()), ranks, torchrun)
    on_cpu = not errors and resolve_device(cfg.get("device"), ranks).type == "cpu"
    if processes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        options = method_config(method)
        if not method_of_config(options).distributed:
            errors.append(f"method={method['name']!r} does not run distributed; use method="
                          f"{' or method='.join(distributed_methods())}, or distributed.processes=1")
        else:  # before any process is spawned (the ranks check these and the model-dependent cases again)
            errors.extend(method_of_config(options).distributed_option_errors(options))
        if cfg.get("offload") is not None:
            errors.append(f"offload={cfg['offload']!r} quantizes in one process; set offload=null or distributed.processes=1")
        errors.extend(mergeable_range_errors(_activation_schemes(cfg.get("quant"))))
        if on_cpu and processes > cpus:
            errors.append(f"distributed.processes={processes} is more than the {cpus} CPU core(s) this host lets qat "
                          f"use; choose 1..{cpus} (each process is a CPU rank holding a whole model: more ranks than "
                          "cores only share the same cores and multiply the memory)")
        samples = (cfg.get("calibration") or {}).get("samples")
        if isinstance(samples, int) and not isinstance(samples, bool) and samples > 0 \
                and processes > (batches := -(-samples // CALIBRATION_ROWS)):
            errors.append(f"distributed.processes={processes} needs at least {processes} calibration batches; "
                          f"calibration.samples={samples} makes {batches} (batches of {CALIBRATION_ROWS}): "
                          f"set calibration.samples >= {processes * CALIBRATION_ROWS} or fewer processes")
    if errors:
        raise ConfigError("bad config:\n" + "\n".join(f"  - {e}" for e in errors))
    return processes


def _activation_schemes(quant: Any) -> list[tuple[str, Any]]:
    """(key, QuantSpec) of the recipe's input / KV-cache schemes, base and overrides; none for a recipe that does
    not parse (refused elsewhere, with its own message)."""
    try:
        recipe = as_recipe(quant) if quant is not None else None
    except (ValueError, OSError, TypeError):
        return []
    if recipe is None:
        return []
    out = [(f"quant.{role}", getattr(recipe.base, role)) for role in ("input", "kv_cache")]
    for i, override in enumerate(recipe.overrides):
        schemes = override.apply(recipe.base, f"quant.overrides[{i}]")
        out += [(f"quant.overrides[{i}].{role}", getattr(schemes, role)) for role in ("input", "kv_cache")
                if role in override.changes]
    return out
