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
from qat.modules.quantizer import TensorQuantizer, dynamic_schemes_may_differ, is_dynamic_scheme
from qat.spec import ROLES, TensorSchemes
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
    _refuse_differences(cfg, path, "ckpt_path", False, "cannot be resumed with this config; set the same model, "
                        "quant and learned_rotations as the run that wrote it")


def check_init_checkpoint(cfg: DictConfig) -> None:
    """init=checkpoint: init.path must be a single-file qat-train checkpoint of the same model, recipe and learned
    rotations, except the dynamic activation / KV schemes, which may differ (they hold no state).

    Raises:
        FileNotFoundError: init.path does not exist. BadFileError: it is no checkpoint. ConfigError: a sharded
            checkpoint, or one of another model, recipe or learned rotations, naming the fields.
    """
    path = Path(str(cfg.init.path)).expanduser()
    if is_distributed_checkpoint(path):
        raise ConfigError(f"init.path={str(cfg.init.path)!r} is a sharded (trainer=fsdp) checkpoint; init=checkpoint "
                          "reads a single-file one (a run on one device or under trainer=ddp)")
    if path.is_dir():
        raise ConfigError(f"init.path={str(cfg.init.path)!r} is a folder; give the checkpoint file qat-train wrote "
                          "(<run dir>/checkpoints/last.ckpt)")
    if not path.is_file():
        raise FileNotFoundError(f"init.path={str(cfg.init.path)!r} does not exist; give a checkpoint written by "
                                "qat-train (<run dir>/checkpoints/last.ckpt)")
    _refuse_differences(cfg, path, "init.path", True, "cannot start this run; set the same model, weight schemes, "
                        "held ranges and learned_rotations as the run that wrote it (the dynamic activation / KV "
                        "schemes may differ)")


def _refuse_differences(cfg: DictConfig, path: Path, key: str, dynamic_may_differ: bool, why: str) -> None:
    """Raise ConfigError listing what differs between this run and the checkpoint at `path` (given as `key`)."""
    hparams = _read_checkpoint(path, key).get("hyper_parameters") or {}
    errors = _differences(cfg, hparams, dynamic_may_differ)
    if errors:
        raise ConfigError(f"{key}={str(OmegaConf.select(cfg, key))!r} {why}:\n" + "\n".join(f"  - {e}" for e in errors))


def load_init_checkpoint(module: Any, path: str) -> list[str]:
    """Load the trained state of the qat-train checkpoint at `path` into `module` (a QATModule, before training):
    everything but the state of dynamic quantizers must match; a dynamic quantizer the recipe adds starts fresh,
    one it drops is left out. Returns the dynamic quantizers that did not load (added or dropped), by name.

    Raises:
        ConfigError: a key that is neither in both nor a dynamic quantizer's, naming the first ones.
    """
    state = _read_checkpoint(Path(path).expanduser(), "init.path")["state_dict"]
    with dynamic_schemes_may_differ():
        missing, unexpected = module.load_state_dict(state, strict=False)
    ours = {n: q for n, q in module.named_modules() if isinstance(q, TensorQuantizer)}
    theirs = {k.removesuffix("._extra_state"): v.get("scheme", "") for k, v in state.items()
              if k.endswith("._extra_state") and isinstance(v, dict)}
    skipped, bad = set(), []
    for key in missing:
        owner = _owner(key, ours)
        if owner is None or not ours[owner].spec.dynamic:
            bad.append(f"{key} (not in the checkpoint)")
        else:
            skipped.add(owner)
    for key in unexpected:
        owner = _owner(key, theirs)
        if owner is None or not is_dynamic_scheme(theirs[owner]):
            bad.append(f"{key} (not in this model)")
        else:
            skipped.add(owner)
    if bad:
        raise ConfigError(f"init.path={path!r}: the checkpoint's state does not fit this model: " + ", ".join(bad[:4])
                          + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))
    return sorted(skipped)


def _owner(key: str, names) -> str | None:
    """The longest name in `names` that `key` (a state-dict key) lies under, or None."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in names:
            return ".".join(parts[:i])
    return None


def _read_checkpoint(path: Path, key: str) -> dict:
    file = path / "meta.pt" if path.is_dir() else path  # a sharded checkpoint keeps all but the tensors in meta.pt
    try:
        try:
            return torch_load(file, mmap=path.is_file())
        except RuntimeError as err:  # not a zip archive: torch's advice to re-save it would only confuse here
            if "mmap" not in str(err):
                raise
            return torch_load(file)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, EOFError, RuntimeError... for bad files
        raise BadFileError(path, f"{key} cannot be read as a qat-train checkpoint (truncated, corrupted, or "
                                 f"not a checkpoint): {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def _differences(cfg: DictConfig, hparams: dict, dynamic_may_differ: bool) -> list[str]:
    """What differs between this run's model / quant / learned rotations and those of a checkpoint's hparams."""
    errors = []
    for key in ("model", "quant"):
        if key not in hparams:
            continue
        ours = OmegaConf.to_container(cfg.module[key], resolve=True) if cfg.module.get(key) is not None else None
        theirs = hparams[key]
        if ours != theirs and not (key == "quant" and _same_recipe(theirs, ours, dynamic_may_differ)):
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
    return errors


def _same_recipe(theirs: Any, ours: Any, dynamic_may_differ: bool = False) -> bool:
    """Whether two recipe mappings load as the same recipe (name and description aside): a key one of them leaves
    at its default (a checkpoint written before the recipe file gained `gguf_fallback: false`) prepares the same
    model, so its state dict loads. `dynamic_may_differ`: the input / KV schemes that are dynamic (or absent) in
    both, the base's and each override's, are not compared (init=checkpoint)."""
    try:
        a, b = (QuantRecipe.from_dict(r) for r in (theirs, ours))
    except (ValueError, TypeError, AttributeError):  # a recipe that no longer loads: the plain comparison decides
        return False
    if dynamic_may_differ:
        return _held_part(a) == _held_part(b)
    a, b = a.to_dict(), b.to_dict()
    return {k: v for k, v in a.items() if k not in ("name", "description")} == \
        {k: v for k, v in b.items() if k not in ("name", "description")}


def _held_part(recipe: QuantRecipe) -> dict[str, Any]:
    """What a recipe holds state for: its targets, rotations and every scheme, a dynamic (or absent) input / KV
    scheme masked as "dynamic", the base's and each override's applied to the base."""
    def schemes(s: TensorSchemes) -> dict[str, Any]:
        out = {}
        for role in ROLES:
            spec = getattr(s, role)
            out[role] = "dynamic" if role != "weight" and (spec is None or spec.dynamic) else \
                (None if spec is None else spec.to_dict())
        return out
    out = {k: v for k, v in recipe.to_dict().items() if k not in ("name", "description", *ROLES)}
    out["base"] = schemes(recipe.base)
    out["overrides"] = [(list(o.targets), schemes(o.apply(recipe.base, f"overrides[{i}]")))
                        for i, o in enumerate(recipe.overrides)]
    return out


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
