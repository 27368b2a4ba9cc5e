"""The files a qat-train run reads and writes, checked before anything loads: the corpus (`data.path`), the checkpoint
to resume (`ckpt_path`: it must hold a run of the same model, recipe and learned rotations) and the run directory
(`paths.output_dir`). `qat.lit.run.check_config` calls them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qat.assets import require
from qat.data import ALIASES
from qat.errors import BadFileError, ConfigError, UserError
from qat.io import is_distributed_checkpoint, probe_folder, torch_load
from qat.lit.module import ROTATION_KEYS
from qat.transform import QuantRecipe


def check_resume(cfg: DictConfig) -> None:
    """ckpt_path must exist and hold a run of the same model and quant recipe (else the state dict cannot load).

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: it was trained with another model or recipe, naming both.
    """
    path = Path(str(cfg.ckpt_path)).expanduser()
    if not (path.is_file() or is_distributed_checkpoint(path)):
        raise FileNotFoundError(f"ckpt_path={str(cfg.ckpt_path)!r} does not exist; give a checkpoint written by "
                                "qat-train (<run dir>/checkpoints/last.ckpt: a file, or a folder under trainer=fsdp)")
    try:  # a sharded checkpoint keeps everything but the tensors in meta.pt (Lightning's layout)
        ckpt = torch_load(path / "meta.pt" if path.is_dir() else path, mmap=path.is_file())
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, EOFError, RuntimeError... for bad files
        raise BadFileError(path, "ckpt_path cannot be read as a qat-train checkpoint (truncated, corrupted, or "
                                 f"not a checkpoint): {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    hparams = ckpt.get("hyper_parameters") or {}
    errors = []
    for key in ("model", "quant"):
        if key not in hparams:
            continue
        ours = OmegaConf.to_container(cfg.module[key], resolve=True) if cfg.module.get(key) is not None else None
        theirs = hparams[key]
        if ours != theirs and not (key == "quant" and _same_recipe(theirs, ours)):
            a, b = dict(theirs or {}), dict(ours or {})
            diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b) - {"name", "description"})
                    if a.get(k) != b.get(k)}
            if not diff:
                continue  # a renamed copy of the same recipe loads the same state
            errors.append(f"{key}: the checkpoint has {a.get('name', a.get('path'))!r}, this run "
                          f"{b.get('name', b.get('path'))!r}; differing fields (checkpoint, this run): {diff}")
    if "learned_rotations" in hparams:  # which rotations the state dict holds unfused (their names differ)
        ours = cfg.module.get("learned_rotations")
        theirs, ours = (_rotation_set(r) for r in (hparams["learned_rotations"], ours and OmegaConf.to_container(ours)))
        if ours != theirs:
            errors.append(f"learned_rotations: the checkpoint was trained with {theirs or 'none'}, this run "
                          f"{ours or 'none'}; set module.learned_rotations as that run did")
    if errors:
        raise ConfigError(f"ckpt_path={str(cfg.ckpt_path)!r} cannot be resumed with this config; set the same "
                         "model, quant and learned_rotations as the run that wrote it:\n" + "\n".join(f"  - {e}" for e in errors))


def _same_recipe(theirs: Any, ours: Any) -> bool:
    """Whether two recipe mappings load as the same recipe (name and description aside): a key one of them leaves
    at its default (a checkpoint written before the recipe file gained `gguf_fallback: false`) prepares the same
    model, so its state dict loads."""
    try:
        a, b = (QuantRecipe.from_dict(r).to_dict() for r in (theirs, ours))
    except (ValueError, TypeError, AttributeError):  # a recipe that no longer loads: the plain comparison decides
        return False
    return {k: v for k, v in a.items() if k not in ("name", "description")} == \
        {k: v for k, v in b.items() if k not in ("name", "description")}


def _rotation_set(cfg: Any) -> list[str]:
    """The learned rotations a `learned_rotations` value attaches (["r1", "r2"], [] for none)."""
    cfg = {**ROTATION_KEYS, **cfg} if cfg else {}
    return [r for r in ("r1", "r2") if cfg.get(r)]


def check_writable(out: Path) -> None:
    """The run directory (checkpoints, logs, result.json) must be writable before training starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_folder(out)
    except OSError as err:
        raise PermissionError(f"paths.output_dir={str(out)!r} is not writable ({err.strerror}); checkpoints, logs "
                              "and result.json go there: choose another paths.output_dir / hydra.run.dir") from err


def check_data_path(path: str) -> None:
    """data.path names a corpus: a known alias (its asset checked, `qat.assets.require`), a hub-like `owner/name`, or
    a file / folder that exists.

    Raises:
        FileNotFoundError: naming data.path.
    """
    if path in ALIASES:
        require(ALIASES[path][0])
        return
    hub_like = "/" in path and not path.startswith((".", "/", "~")) and path.count("/") == 1 and "." not in path
    if not hub_like and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist")
