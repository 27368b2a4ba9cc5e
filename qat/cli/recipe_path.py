"""`quant=<path to a recipe YAML>` on any qat CLI: the file becomes an option of Hydra's `quant` group.

Hydra reads `quant=X` as the option `configs/quant/X.yaml`, so a path ("Could not find 'quant//tmp/...'") needs
help: each path-like value (it has a `/` or ends in .yaml / .yml) is checked (`qat.load_recipe`), copied into a
temporary config folder as `quant/<stem>.yaml` and selected by that name, with the folder added to
`hydra.searchpath`. Every job that takes `quant` (qat-train, qat-ptq, qat-export, qat-eval, qat-compare, sweeps
`quant=a.yaml,w4a16_g128` included) then sees the file's recipe as if it were shipped. `run_hydra` does this.
Hydra's grammar comes first: a comma separates sweep values and parentheses are its sweep functions (glob(...)),
except that an existing .yaml / .yml file named whole is a path (`quant=a(1).yaml`); a comma inside an existing
file's name is refused with the reason (`sweep_values`).

    with recipe_paths(["method=rtn", "quant=outputs/sensitivity/run/quant/auto.yaml"]) as argv:
        ...  # argv == ["method=rtn", "quant=auto", "hydra.searchpath=[file:///tmp/qat-quant-.../]"]
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import yaml

from qat.errors import BadFileError, ConfigError, UserError
from qat.recipes import read_recipe, recipe_names
from qat.transform import load_recipe

log = logging.getLogger(__name__)
QUANT_KEYS = ("quant=", "+quant=", "++quant=")
SEARCHPATH_KEY = "hydra.searchpath="


def is_path(value: str) -> bool:
    """True when a `quant=` value names a file rather than a configs/quant option."""
    return "/" in value or os.sep in value or value.endswith((".yaml", ".yml"))


def check_recipe_file(key: str, value: str) -> Path:
    """The resolved recipe file that `key=value` names, after validating it as a recipe.

    Raises:
        ConfigError: a missing file, a directory, or one that is not a valid recipe: one line naming the key, the path and
            what would be valid.
    """
    path = Path(value).expanduser()
    if path.is_dir():
        raise ConfigError(f"{key}={value}: {path.resolve()} is a directory; give a recipe YAML file")
    if not path.is_file():
        raise ConfigError(f"{key}={value}: no such file ({path.resolve()}); give a recipe YAML file or a "
                          f"configs/quant name: {', '.join(recipe_names())}")
    try:
        load_recipe(path)
    except UserError as err:
        problem = err.problem if isinstance(err, BadFileError) else str(err)  # the path is named once, here
        raise ConfigError(f"{key}={value}: not a valid recipe: {' '.join(problem.split())}") from None
    return path.resolve()


def sweep_values(key: str, value: str) -> list[str]:
    """The values of `key=value` as Hydra reads them (a comma separates sweep values); [] when Hydra's own grammar
    applies (a sweep function such as glob(...) or choice(...)), except that an existing .yaml / .yml file named
    whole is one path, parentheses and all (`quant=a(1).yaml`).

    Raises:
        ConfigError: a comma in an existing file's name whose pieces are not all files: Hydra would sweep them.
    """
    whole = Path(value).expanduser()
    if value.endswith((".yaml", ".yml")) and whole.is_file():
        if "," not in value:
            return [value]
        missing = [v for v in value.split(",") if is_path(v) and not Path(v).expanduser().is_file()]
        if missing:
            raise ConfigError(f"{key}={value}: a comma separates sweep values in Hydra, so this reads as the sweep "
                              f"{value.split(',')} (no such file: {', '.join(missing)}); the file {whole.resolve()} "
                              "exists: rename it without the comma")
    return [] if "(" in value else value.split(",")


def row_labels(paths: list[tuple[str, Path]]) -> dict[Path, str]:
    """The row labels of recipe files whose `name` equals a shipped configs/quant recipe's or another file's of
    the same command (rows are named by it, so they would read as the other recipe's): each such file is
    labelled by its file stem (by the path as given when the stem is taken too), with a warning naming both.

    Args:
        paths: (value as given, resolved file) of every recipe path of the command.
    Returns:
        {file: label} for the files to relabel; the others keep their `name`.
    """
    shipped = set(recipe_names())
    files = dict((path, value) for value, path in paths)  # one entry per file, given once or more
    names = {path: str(read_recipe(path).get("name") or path.stem) for path in files}
    labels: dict[Path, str] = {}
    for path, value in files.items():
        others = [files[p] for p in files if p != path and names[p] == names[path]]
        if names[path] not in shipped and not others:
            continue
        stems = [p.stem for p in files if p != path]
        label = path.stem if path.stem not in shipped | set(names.values()) | set(stems) else value
        labels[path] = label
        clash = ([f"the shipped recipe configs/quant/{names[path]}.yaml"] if names[path] in shipped else []) + others
        log.warning("quant=%s: its recipe name %r is also the name of %s; its results are labelled %r instead",
                    value, names[path], " and ".join(clash), label)
    return labels


@contextlib.contextmanager
def recipe_paths(argv: list[str]) -> Iterator[list[str]]:
    """`argv` with each `quant=<path>` (sweep lists too; `+quant=` / `++quant=` alike) rewritten to `quant=<a
    temporary quant group option>`.

    Yields argv unchanged when no `quant=` value is a path. The temporary folder lives until the block ends.
    Raises:
        ConfigError: a path that is missing or not a valid recipe (`check_recipe_file`), before Hydra starts.
    """
    found = {i: values for i, arg in enumerate(argv) if arg.startswith(QUANT_KEYS)
             and (values := sweep_values(*arg.split("=", 1))) and any(is_path(v) for v in values)}
    if not found:
        yield argv
        return
    checked = {i: [(v, check_recipe_file(argv[i].split("=", 1)[0], v) if is_path(v) else None) for v in values]
               for i, values in found.items()}
    labels = row_labels([(v, p) for values in checked.values() for v, p in values if p is not None])
    folder = Path(tempfile.mkdtemp(prefix="qat-quant-"))
    try:
        (folder / "quant").mkdir()
        taken = set(recipe_names())
        out = list(argv)
        for i, values in checked.items():
            names = []
            for value, path in values:
                if path is None:
                    names.append(value)
                    continue
                stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)  # what Hydra's override grammar reads bare
                name, n = stem, 1
                while name in taken:  # shipped options shadow the search path's: never reuse their names
                    n += 1
                    name = f"{stem}_{n}"
                taken.add(name)
                # rows are labelled by the recipe's `name`: the label row_labels chose where the file's would read
                # as another recipe's, else the file's own, else its stem (a nameless mapping would be "custom")
                data = yaml.safe_load(path.read_text())
                label = labels.get(path) or data.get("name") or path.stem
                (folder / "quant" / f"{name}.yaml").write_text(yaml.safe_dump({**data, "name": str(label)},
                                                                               sort_keys=False))
                names.append(name)
            # quant is in the defaults list of every job that takes it: `+quant=` (add) would be Hydra's "Multiple
            # values for quant" naming the temporary option, so +quant=<path> / ++quant=<path> select it as quant= does
            out[i] = f"quant={','.join(names)}"
        yield _with_searchpath(out, folder.as_uri())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _with_searchpath(argv: list[str], uri: str) -> list[str]:
    """argv with `uri` appended to a `hydra.searchpath=[...]` given there, or such an argument added."""
    for i, arg in enumerate(argv):
        if arg.startswith(SEARCHPATH_KEY) and arg.endswith("]"):
            inner = arg[len(SEARCHPATH_KEY):].strip()[1:-1].strip()
            return [*argv[:i], f"{SEARCHPATH_KEY}[{inner + ',' if inner else ''}{uri}]", *argv[i + 1:]]
    # beside the first override, not at the end: Hydra's parser takes overrides only as one run of positional
    # arguments, so one added after `--cfg job` would be "unrecognized"
    at = next((i + 1 for i, arg in enumerate(argv) if "=" in arg and not arg.startswith("-")), len(argv))
    return [*argv[:at], f"{SEARCHPATH_KEY}[{uri}]", *argv[at:]]
