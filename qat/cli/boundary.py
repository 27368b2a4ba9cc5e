"""The one error boundary of every qat CLI: a user's mistake is one message and exit 2; a bug keeps its traceback.

A user's mistake is a `qat.errors.UserError` (ConfigError, BadFileError), a missing / unreadable path
(FileNotFoundError, PermissionError...), an OmegaConf error (a missing `???` value, a bad interpolation), one of
Hydra's own config errors (an unknown override key, bad override syntax, an unknown group option), Lightning's
MisconfigurationException, or an error raised while Hydra instantiates a config node whose cause is one of those
or a TypeError / ValueError of the constructor's arguments. Any other exception is our bug and keeps its
traceback. `QAT_DEBUG=1` or `HYDRA_FULL_ERROR=1` shows the full traceback for everything.

    @hydra.main(...)
    @guard("qat-export")
    def _main(cfg): ...

    def main(argv=None) -> None:
        run_hydra("qat-export", _main, argv)
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

from hydra.core.global_hydra import GlobalHydra
from hydra.errors import CompactHydraException, InstantiationException
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import OmegaConfBaseException

import yaml

from qat.cli.recipe_path import recipe_paths
from qat.errors import ConfigError, UserError
from qat.observers import reset_warnings
from qat.recipes import CONFIG_DIR

USER_EXIT = 2  # argparse's code for a usage error
DEBUG_VARS = ("QAT_DEBUG", "HYDRA_FULL_ERROR")
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
_started: list[bool] = [False]  # set when a task function starts: Hydra's exit 1 before that is a config error


def debug() -> bool:
    """True when QAT_DEBUG or HYDRA_FULL_ERROR is set (to anything but "", "0", "false", "no", "off")."""
    return any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no", "off") for v in DEBUG_VARS)


def user_message(exc: BaseException) -> str | None:
    """The message to print for a user's mistake, or None when `exc` is a bug (it keeps its traceback).

    Example:
        >>> user_message(ConfigError("max_blocks=-2; must be a positive integer or null"))
        'max_blocks=-2; must be a positive integer or null'
        >>> user_message(ZeroDivisionError("division by zero")) is None
        True
    """
    if isinstance(exc, InstantiationException):
        return _instantiation_message(exc)
    if isinstance(exc, (UserError, CompactHydraException, MisconfigurationException)):
        return str(exc)
    if isinstance(exc, OmegaConfBaseException):
        return str(exc).strip()
    if isinstance(exc, PATH_ERRORS):
        if exc.filename is not None and exc.strerror:  # an OSError from open(): "[Errno 2] ..." names the path
            return f"{exc.filename}: {exc.strerror}"
        return str(exc)
    return None


def _instantiation_message(exc: InstantiationException) -> str | None:
    """Hydra's "Error in call to target 'x':\\nValueError('...\\n...')" with the cause printed as text, not repr."""
    cause = exc.__cause__
    head = str(exc).split("\n", 1)[0].rstrip(":")
    key = next((line.split(":", 1)[1].strip() for line in str(exc).splitlines() if line.startswith("full_key:")), "")
    if cause is None:
        return str(exc)
    inner = user_message(cause)
    if inner is None and isinstance(cause, (TypeError, ValueError)):  # the node's arguments: a bad key or value
        inner = f"{type(cause).__name__}: {cause}"
    if inner is None:
        return None
    return f"{head}{f' (config node {key})' if key else ''}:\n{inner}"


def report(app: str, exc: BaseException) -> int | None:
    """Print a user's mistake as "<app>: error: <message>" on stderr and return the exit code; None for a bug."""
    message = user_message(exc)
    if message is None:
        return None
    print(f"{app}: error: {message}", file=sys.stderr, flush=True)
    return USER_EXIT


def guard(app: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a Hydra task function: a user's mistake exits with `USER_EXIT` and one message, before Hydra would
    print "Error executing job" and the stack; a bug (and everything under `debug()`) propagates as it was.
    Each call (each job of a multirun) starts with fresh once-only warnings (`qat.observers.reset_warnings`)."""
    def wrap(task: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(task)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            _started[0] = True
            reset_warnings()  # once-only warnings are once per job: each job of a multirun logs its own
            try:
                return task(*args, **kwargs)
            except Exception as exc:
                code = None if debug() else report(app, exc)
                if code is None:
                    raise
                raise SystemExit(code) from None
        return guarded
    return wrap


def run_hydra(app: str, hydra_main: Callable[[], Any], argv: list[str] | None = None) -> None:
    """Run a `@hydra.main` function with `argv` (default: sys.argv[1:]) as its command line.

    Hydra reports its own composition errors (an unknown key, bad override syntax) as one message; their exit
    status becomes `USER_EXIT` too. Under `debug()`, HYDRA_FULL_ERROR is set so Hydra shows whole tracebacks.
    `quant=<path to a recipe YAML>` is made a `quant` group option first (`qat.cli.recipe_path`).
    """
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    if debug():
        os.environ["HYDRA_FULL_ERROR"] = "1"
    saved = sys.argv
    _started[0] = False
    try:
        argv = null_groups(app, list(sys.argv[1:] if argv is None else argv))
        with recipe_paths(argv) as args:
            sys.argv = [app, *args]
            hydra_main()
    except UserError as exc:  # a bad quant=<path>, refused before Hydra starts
        if debug():
            raise
        raise SystemExit(report(app, exc)) from None
    except SystemExit as exit_:
        if exit_.code == 1 and not _started[0]:  # Hydra printed a config error before the job ran
            raise SystemExit(USER_EXIT) from None
        raise
    finally:
        sys.argv = saved
        if full_error is None:  # an in-process caller (a test) gets its environment back
            os.environ.pop("HYDRA_FULL_ERROR", None)
        GlobalHydra.instance().clear()  # the next in-process run composes afresh


def null_groups(app: str, argv: list[str]) -> list[str]:
    """`argv` with each `<group>=null` (`+` / `++` too) of a config group in the defaults list of `app`'s config
    (configs/<app without qat->.yaml) made Hydra's delete `~<group>` where that default is null (the job takes
    the group absent: qat-sensitivity's / qat-eval's quant); Hydra itself would fail with a traceback.

    Raises:
        ConfigError: `<group>=null` for a group whose default is an option (the job needs one), naming the options.
    """
    config = CONFIG_DIR / f"{app.removeprefix('qat-')}.yaml"
    if not config.is_file():
        return argv
    entries = (yaml.safe_load(config.read_text()) or {}).get("defaults") or []
    defaults = {k: v for e in entries if isinstance(e, dict) for k, v in e.items() if (CONFIG_DIR / k).is_dir()}
    out = []
    for arg in argv:
        key, _, value = arg.partition("=")
        group = key.lstrip("+")
        if value.strip().lower() != "null" or group not in defaults:
            out.append(arg)
        elif defaults[group] is None:
            out.append(f"~{group}")
        else:
            options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
            path = " or the path of a recipe YAML" if group == "quant" else ""
            raise ConfigError(f"{key}=null: {group} is set by default ({defaults[group]!r}); choose from "
                              f"{', '.join(options)}{path}, or ~{group} to leave it out where {app} runs without "
                              "one")
    return out


def run_plain(app: str, main: Callable[[], int | None]) -> int:
    """Run a non-Hydra CLI body (argparse) inside the same boundary; returns its exit status."""
    try:
        return int(main() or 0)
    except Exception as exc:
        code = None if debug() else report(app, exc)
        if code is None:
            raise
        return code
