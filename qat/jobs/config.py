"""The job configs' schemas, in one place, and the one checker of their keys.

A schema maps each allowed key to the schema of its value: a nested schema (a mapping, checked in turn), `ANY`
(a value read elsewhere: a recipe, a method config, an optimizer node), or `FROM_TARGET` (a node instantiated
by Hydra: its keys are the `_target_` class's constructor arguments). A schema holding `OPEN` lets other keys
through (checked by the code that reads them, e.g. a PTQ method's own config class).

`check_keys(cfg, SCHEMA)` runs before any long work and names every misspelt key, where it is and the valid
ones, in one error:

    bad config:
      - data: unknown key(s) ['blok_size']; valid keys are ['batch_size', 'block_size', ...]
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
from dataclasses import fields
from typing import Any, Mapping

from omegaconf import OmegaConf

from qat.data import LOADER_KEYS, CorpusConfig
from qat.errors import ConfigError
from qat.recipes import CONFIG_DIR
from qat.testing import TINY_KEYS

ANY = None
OPEN = "*"
FROM_TARGET = "<the _target_'s arguments>"
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_"})

TINY = dict.fromkeys(TINY_KEYS, ANY)  # qat.testing.tiny_llama's arguments
MODEL = {"path": ANY, "dtype": ANY, "tiny": TINY}
# a `data` group node: the corpus (CorpusConfig) and the loader's batch settings (qat.lit.TextDataModule's
# arguments; tests/integration/test_job_configs.py keeps the two equal)
DATA = {**dict.fromkeys((f.name for f in fields(CorpusConfig)), ANY), **dict.fromkeys(LOADER_KEYS, ANY), "_target_": ANY}
JOB = {"task_name": ANY, "seed": ANY, "paths": ANY, "hydra": ANY}

CALIBRATION = dict.fromkeys(("samples", "seq_len", "split"), ANY)  # PTQ calibration of qat-ptq / qat-compare
EVAL = dict.fromkeys(("split", "max_blocks", "batch_size"), ANY)
PTQ = {**JOB, "model": MODEL, "data": DATA, "quant": ANY, "method": ANY, "calibration": CALIBRATION, "eval": EVAL,
       "save": ANY, "export": ANY, "gguf_type": ANY, "progress": ANY, "offload": ANY, "distributed": {"processes": ANY}, "device": ANY}
QAT = dict.fromkeys(("experiment", "overrides"), ANY)  # qat-compare's QAT rows: qat-train overrides
QAT_METHOD = dict.fromkeys(("name", "label", "init", "overrides"), ANY)  # a `method` node with name: qat
HARNESS = dict.fromkeys(("limit", "batch_size", "max_length", "num_fewshot", "bootstrap_iters"), ANY)  # lm-eval
COMPARE_EVAL = {**EVAL, "tasks": ANY, "harness": HARNESS}  # single-process qat-compare: lm-eval tasks per row
COMPARE = {**JOB, "model": MODEL, "data": DATA, "methods": ANY, "quants": ANY, "calibration": CALIBRATION,
           "eval": COMPARE_EVAL, "results": ANY, "title": ANY, "method": ANY, "quant": ANY, "qat": QAT,
           "fail_on_error": ANY, "device": ANY, "progress": ANY}

EXPORT_CALIBRATION = dict.fromkeys(("samples", "seq_len", "split", "batch_size", "save"), ANY)  # imatrix=calibrate
EXPORT = {**JOB, "model": MODEL, "quant": ANY, "data": DATA, "format": ANY, "gguf_type": ANY, "gguf_pure": ANY,
          "output": ANY, "overwrite": ANY, "checkpoint": ANY, "tokenizer": ANY, "imatrix": ANY,
          "calibration": EXPORT_CALIBRATION}
EVAL_JOB = {**JOB, "model": MODEL, "data": DATA, "quant": ANY, "split": ANY, "max_blocks": ANY, "prompt": ANY,
            "max_new_tokens": ANY, "tokenizer": ANY, "tasks": ANY, "harness": HARNESS, "output": ANY, "label": ANY,
            "device": ANY}
SENSITIVITY = {**JOB, "model": MODEL, "data": DATA, "quant": ANY, "menu": ANY, "method": ANY, "mode": ANY,
               "scores": ANY, "targets": ANY, "ignore": ANY, "float_bits": ANY, "ties": ANY, "candidates": ANY,
               "budget": dict.fromkeys(("bits_per_weight", "bytes"), ANY), "calibration": dict.fromkeys(
                   ("samples", "seq_len", "split", "batch_size"), ANY), "name": ANY, "plot": ANY,
               "gguf": dict.fromkeys(("export", "rest"), ANY), "device": ANY}
DEMO = {"quant": ANY, "tiny": TINY, "tokens": ANY, "hydra": ANY}

INIT = {"calibration": dict.fromkeys(("samples", "seq_len"), ANY), "start": ANY, OPEN: ANY}  # + the method's keys
TRAIN = {**JOB, "defaults": ANY, "ckpt_path": ANY, "label": ANY, "module": FROM_TARGET, "data": FROM_TARGET,
         "trainer": FROM_TARGET, "model": MODEL, "quant": ANY, "optim": ANY, "init": INIT, "logger": ANY,
         "callbacks": ANY, "experiment": ANY, "debug": ANY,
         "eval": {**dict.fromkeys(("baselines", "after", "split", "max_blocks", "tasks"), ANY), "harness": HARNESS}}

SCHEMAS = {"train": TRAIN, "ptq": PTQ, "compare": COMPARE, "export": EXPORT, "eval": EVAL_JOB, "demo": DEMO,
           "sensitivity": SENSITIVITY}


def target_schema(target: str) -> dict | None:
    """The keys a Hydra node instantiating `target` may hold: its constructor's arguments and Hydra's own keys;
    None (anything goes) when the class cannot be inspected or takes **kwargs.

    Raises:
        ConfigError: `target` does not import (a misspelt module or class), naming it and why.
    """
    obj = import_target(target)
    try:
        params = inspect.signature(obj.__init__).parameters
    except Exception:  # noqa: BLE001 - not a class we can inspect: leave the check to instantiate
        return None
    if not isinstance(obj, type) or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return dict.fromkeys((n for n in params if n != "self"), ANY) | dict.fromkeys(HYDRA_KEYS, ANY)


def import_target(target: str) -> Any:
    """The object a dotted `_target_` names (the longest importable module prefix, then its attributes), as Hydra
    finds it.

    Raises:
        ConfigError: it does not import: "cannot import _target_ 'x' (ModuleNotFoundError: ...)".
    """
    parts = target.split(".")
    error: Exception = ValueError("an empty or relative name")
    for cut in range(len(parts), 0, -1) if all(parts) else ():
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as err:
            error = err
            if err.name and not f"{'.'.join(parts[:cut])}.".startswith(f"{err.name}."):
                break  # the module exists; something it imports does not
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError as err:
            error = err
            break
        return obj
    raise ConfigError(f"cannot import _target_ {target!r} ({type(error).__name__}: {error})")


def instantiation_error(err: BaseException) -> str:
    """Hydra's instantiate error as text without its "set env var HYDRA_FULL_ERROR=1" advice: a `_target_` that
    cannot be imported is named with the reason; any other error keeps Hydra's words ("Error in call to target").

    Example:
        >>> instantiation_error(err)  # instantiate({"_target_": "torch.optim.Adamm"})
        "cannot import _target_ 'torch.optim.Adamm' (AttributeError: module 'torch.optim' has no attribute 'Adamm')"
    """
    located = re.match(r"Error locating target '([^']*)'", str(err))
    if located is None:
        return str(err)
    cause = err.__cause__
    root = cause.__cause__ if cause is not None and cause.__cause__ is not None else cause
    reason = f" ({type(root).__name__}: {' '.join(str(root).split())})" if root is not None else ""
    return f"cannot import _target_ '{located.group(1)}'{reason}"


def unknown_keys(cfg: Any, schema: Mapping | str | None, where: str = "") -> list[str]:
    """Every misspelt key of `cfg` under `schema`, recursively, as "<where>: unknown key(s) [...]; valid keys
    are [...]" (`where` is the node's dotted path; "config" at the top).

    Example:
        >>> unknown_keys({"eval": {"splt": "test"}}, PTQ)
        ["eval: unknown key(s) ['splt']; valid keys are ['batch_size', 'max_blocks', 'split']"]
    """
    if not isinstance(cfg, Mapping):  # a node given a plain value (`tiny=5`) where its keys are expected
        if cfg is not None and where and (isinstance(schema, Mapping) or schema == FROM_TARGET):
            keys = sorted(k for k in schema if k != OPEN) if isinstance(schema, Mapping) else None
            return [f"{where}={cfg!r}: must be a mapping" + (f" with the keys {keys}" if keys else "")]
        return []
    if schema == FROM_TARGET:
        try:
            schema = target_schema(str(cfg["_target_"])) if "_target_" in cfg else None
        except ConfigError as err:
            return [f"{where or 'config'}: {err}"]
    if not isinstance(schema, Mapping):
        return []
    allowed = sorted(k for k in schema if k != OPEN)
    errors = []
    extra = sorted(str(k) for k in cfg if k not in schema)
    if extra and OPEN not in schema:
        shown = allowed if where else [k for k in allowed if k not in ("defaults", "hydra")]  # not a user's keys
        errors.append(f"{where or 'config'}: unknown key(s) {extra}; valid keys are {shown}")
    for key in allowed:  # values are read only where there is a schema to check (interpolations stay unresolved)
        if schema[key] is not ANY and key in cfg:
            errors += unknown_keys(cfg[key], schema[key], f"{where}.{key}" if where else key)
    return errors


def check_keys(cfg: Any, schema: Mapping | str, where: str = "") -> None:
    """Raise one ConfigError (a ValueError) naming every misspelt key of `cfg` (see `unknown_keys`); `schema` may be a name of
    SCHEMAS ("train", "ptq", "compare", "export", "eval", "demo").

    Raises:
        ConfigError: "bad config:" and one line per node with unknown keys, naming them and the valid ones.
    Example:
        >>> check_keys({"calibration": {"sample": 3}}, "ptq")  # ValueError: calibration: unknown key(s) ['sample']
    """
    if isinstance(schema, str) and schema != FROM_TARGET:
        if schema not in SCHEMAS:
            raise KeyError(f"config schema {schema!r}; registered: {sorted(SCHEMAS)}")
        schema = SCHEMAS[schema]
    errors = unknown_keys(cfg, schema, where)
    if errors:
        raise ConfigError("bad config:\n" + "\n".join(f"  - {e}" for e in errors))


TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})


def as_bool(value: Any, key: str) -> bool:
    """A flag read strictly: a real bool, 0 / 1, or true/false, yes/no, on/off, 1/0 in any case; anything else
    is refused naming `key` (Hydra passes `overwrite=no` as the string "no", which `bool()` would call true).

    Raises:
        ConfigError: any other value.
    Example:
        >>> as_bool("No", "overwrite"), as_bool(True, "save")
        (False, True)
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    word = str(value).strip().lower() if isinstance(value, str) else None
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise ConfigError(f"{key}={value!r}; choose true or false (also yes/no, on/off, 1/0)")


def as_count(value: Any, key: str, minimum: int = 1, allow_none: bool = False) -> int | None:
    """An integer setting of at least `minimum` (None kept when `allow_none`), refused naming `key` otherwise.

    Raises:
        ConfigError: a value that is not an integer, or is below `minimum`.
    Example:
        >>> as_count(8, "eval.max_blocks", allow_none=True), as_count(None, "eval.max_blocks", allow_none=True)
        (8, None)
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        valid = f"an integer >= {minimum}" + (" or null" if allow_none else "")
        raise ConfigError(f"{key}={value!r}; must be {valid}")
    return value


def default_device() -> str:
    """The `device` a job takes when its config sets none: $QAT_DEVICE, else (unset or empty) "auto"."""
    return os.environ.get("QAT_DEVICE", "").strip() or "auto"


def register_resolvers() -> None:
    """`${qat_root:}` (configs/paths): the folder above the config root (a checkout: the repository, where
    configs/data/tiny_corpus.txt lives); `${qat_device:}` (the jobs' `device`): `default_device()`, so that an empty
    QAT_DEVICE is auto in a config as in code. Idempotent; the CLIs and qat-train's run call it before composing."""
    if not OmegaConf.has_resolver("qat_root"):
        OmegaConf.register_new_resolver("qat_root", lambda: str(CONFIG_DIR.parent))
    if not OmegaConf.has_resolver("qat_device"):
        OmegaConf.register_new_resolver("qat_device", default_device)
