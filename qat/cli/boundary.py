"""The one error boundary of every qat CLI: a user's mistake is one message and exit 2; a bug keeps its traceback.

A user's mistake is a `qat.errors.UserError` (ConfigError, BadFileError), a missing / unreadable path
(FileNotFoundError, PermissionError...), an OmegaConf error (a missing `???` value, a bad interpolation), one of
Hydra's own config errors (an unknown override key, bad override syntax, an unknown group option), Lightning's
MisconfigurationException, or an error raised while Hydra instantiates a config node whose cause is one of those
or a TypeError / ValueError of the constructor's arguments. Any other exception is our bug and keeps its
traceback. `QAT_DEBUG=1` or `HYDRA_FULL_ERROR=1` shows the full traceback for everything.

Hydra refuses a bad command line (an unknown key or group option, bad override syntax, a bad flag) before the task
runs, and would print its own several lines (exit 1). `run_hydra` composes with HYDRA_FULL_ERROR=1 so that Hydra
raises instead, and prints those errors here in one line (`qat.cli.hydra_errors`); the user's own HYDRA_FULL_ERROR
is back in place while the task runs (`guard`), for its code and any process it starts.

    @hydra.main(...)
    @guard("qat-export")
    def _main(cfg): ...

    def main(argv=None) -> None:
        run_hydra("qat-export", _main, argv)
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import get_args_parser  # the parser of hydra.main's flags, to check them first
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import env_override
from hydra.errors import CompactHydraException, InstantiationException
from hydra.experimental.callback import Callback
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

import yaml

from qat.cli.hydra_errors import check_interpolations, hydra_message, omegaconf_message
from qat.cli.recipe_path import recipe_paths
from qat.errors import ConfigError, UserError
from qat.jobs.config import import_target, instantiation_error
from qat.observers import reset_warnings
from qat.ptq import METHODS
from qat.recipes import CONFIG_DIR

USER_EXIT = 2  # argparse's code for a usage error
DEBUG_VARS = ("QAT_DEBUG", "HYDRA_FULL_ERROR")
PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
_UNSET = object()
# while run_hydra runs: the HYDRA_FULL_ERROR the user had (restored for the task), and the bugs the task raised
_user_env: list[object] = [_UNSET]
_task_bugs: list[BaseException] = []
# while run_hydra runs: (app, the check of one job's config) that a multirun applies to every job up front
_sweep_check: list[tuple[str, Callable[[DictConfig], None]] | None] = [None]


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
    if isinstance(exc, CompactHydraException):
        return hydra_message(exc)
    if isinstance(exc, (UserError, MisconfigurationException)):
        return one_error(str(exc))
    if isinstance(exc, OmegaConfBaseException):
        return omegaconf_message(exc)
    if isinstance(exc, PATH_ERRORS):
        if exc.filename is not None and exc.strerror:  # an OSError from open(): "[Errno 2] ..." names the path
            return f"{exc.filename}: {exc.strerror}"
        return str(exc)
    return None


def one_error(text: str) -> str:
    """A job's "bad config:" list of exactly one error as that error alone (`seed='abc'; ...`), on the
    "<app>: error:" line; several errors stay a list, one per line."""
    head, _, rest = text.partition("\n")
    items = rest.split("\n")
    if head == "bad config:" and len(items) == 1 and items[0].startswith("  - "):
        return items[0].removeprefix("  - ")
    return text


def _instantiation_message(exc: InstantiationException) -> str | None:
    """Hydra's "Error in call to target 'x':\\nValueError('...\\n...')" with the cause printed as text, not repr;
    a qat UserError (ConfigError...) raised by the constructor is its own message alone."""
    cause = exc.__cause__
    head = str(exc).split("\n", 1)[0].rstrip(":")
    key = next((line.split(":", 1)[1].strip() for line in str(exc).splitlines() if line.startswith("full_key:")), "")
    if cause is None:
        return str(exc)
    if head.startswith("Error locating target"):  # a `_target_` that does not import; not its import's own bug
        located = re.match(r"Error locating target '([^']*)'", head)
        try:  # the same look-up again: a name that is not there is the user's; an error inside a module is ours
            import_target(located.group(1) if located else "")
        except ConfigError:
            return f"{key + ': ' if key else ''}{instantiation_error(exc)}"
        except Exception:
            return None
        return None
    inner = user_message(cause)
    if isinstance(cause, UserError):  # qat's own refusal names the key / module / file: Hydra's head adds nothing
        return inner
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
    The command line's interpolations are resolved first (`check_interpolations`): a bad one is refused before the
    task loads anything. Each call (each job of a multirun) starts with fresh once-only warnings
    (`qat.observers.reset_warnings`)."""
    def wrap(task: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(task)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            reset_warnings()  # once-only warnings are once per job: each job of a multirun logs its own
            with _user_environment():
                try:
                    if args and isinstance(args[0], DictConfig) and HydraConfig.initialized():
                        check_interpolations(args[0], task_overrides())  # before the job loads anything
                    return task(*args, **kwargs)
                except Exception as exc:
                    code = None if debug() else report(app, exc)
                    if code is None:
                        _task_bugs.append(exc)  # run_hydra lets it through as it is
                        raise
                    discard_refused_run()
                    raise SystemExit(code) from None
        return guarded
    return wrap


HYDRA_RECORD = frozenset({"config.yaml", "hydra.yaml", "overrides.yaml"})
RUN_FOLDERS_KEY = "hydra.callbacks.qat_run_folders"
# what RunFolders saw before Hydra made this run's folders: "folder" the run (or sweep) folder, absolute as typed
# (symlinks not followed); "existed" the paths among it and its parents that were there; "children" the folders
# already inside a reused sweep folder (its old job folders, SUBDIR_DEPTH levels down); "sweep" whether it is a
# multirun's sweep folder
_before: dict[str, Any] = {}
SUBDIR_DEPTH = 4


class RunFolders(Callback):
    """Hydra callback that `run_hydra` adds to every run: before Hydra makes the output folder (the run folder, or
    a multirun's sweep folder), note which of it and its parents exist already, so that a refused run removes only
    folders that it made (`discard_refused_run`)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _note_folders(config, "hydra.run.dir", sweep=False)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _note_folders(config, "hydra.sweep.dir", sweep=True)
        if _sweep_check[0] is not None:
            check_sweep(config, *_sweep_check[0])


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """The overrides of every job of the multirun `config`, in launch order, as Hydra's basic sweeper splits them
    (its `params` first, then the command line's); None under another sweeper (a plugin decides its own jobs)."""
    if OmegaConf.select(config, "hydra.sweeper._target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    args = [f"{key}={value}" for key, value in params.items()] + [
        str(o) for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]
    parsed = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader()).parse_overrides(args)
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check_sweep(config: DictConfig, app: str, check: Callable[[DictConfig], None]) -> None:
    """Check every job of a multirun with `check` (the app's own check of one job's config) before the first job
    runs: a sweep whose third job is refused stops now, not after the first two have trained for an hour. Every
    refused job is listed with the overrides it sweeps ("<app>: error: ..."; one message when every job is refused
    alike), and the run exits `USER_EXIT`; nothing is made on disk (Hydra makes the sweep folder after this). Hydra
    turns a callback's exception into a warning, so this exits itself.

    Each job is checked as Hydra's `run_job` would run it: its number, its output folder, `${hydra:...}` and
    `hydra.job.env_set` in place, and the command line's interpolations resolved. Not refused here: a path under the
    sweep folder that does not exist yet (an earlier job of the sweep may make it: a checkpoint to resume), and a
    check that hits a bug (the job raises it with its traceback when it runs). What the checks print or log (a note
    on a raised setting) is said again by the job itself, so it is not shown here. A sweep that Hydra cannot split
    or compose is left to Hydra's sweeper, which refuses it before any job runs."""
    try:
        jobs = sweep_jobs(config)
    except Exception:  # noqa: BLE001 - an override Hydra's sweeper cannot split: it refuses it in its own words
        return
    if not jobs or len(jobs) < 2:  # one job checks itself first thing
        return
    loader = GlobalHydra.instance().config_loader()
    shared = set.intersection(*(set(job) for job in jobs))  # a job is named by what it sweeps
    refused: list[tuple[int, str, str]] = []  # (job number, its swept overrides, the message)
    hydra_config = HydraConfig.instance()
    before = hydra_config.cfg
    try:
        with _quiet():
            for num, overrides in enumerate(jobs):
                try:
                    job = _job_config(loader, config, overrides, num)
                except Exception:  # noqa: BLE001 - Hydra's sweeper refuses it before any job runs, in its own words
                    return
                sweep_dir = str(job.hydra.sweep.dir)
                made_later = (sweep_dir, os.path.abspath(sweep_dir))
                try:
                    with env_override(dict(job.hydra.job.env_set)):
                        task = copy.deepcopy(job)
                        with open_dict(task):
                            del task["hydra"]
                        check_interpolations(task, _typed(overrides))
                        check(task)
                except Exception as exc:  # noqa: BLE001 - a user's mistake is listed; a bug is the job's to raise
                    message = user_message(exc)
                    if message is not None and not any(folder in message for folder in made_later):
                        swept = " ".join(o for o in overrides if o not in shared) or " ".join(overrides)
                        refused.append((num, swept, message))
    finally:
        hydra_config.cfg = before  # as Hydra's run_job leaves it
    if not refused:
        return
    if len(refused) == len(jobs) and len({message for _, _, message in refused}) == 1:
        text = f"every job of the sweep ({len(jobs)}) is refused: {refused[0][2]}"
    else:
        text = "\n".join([f"{len(refused)} of the sweep's {len(jobs)} jobs refused (none has run):", *(
            f"  #{num} ({swept}): " + message.replace("\n", "\n    ") for num, swept, message in refused)])
    print(f"{app}: error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(USER_EXIT)


def _job_config(loader: Any, config: DictConfig, overrides: list[str], num: int) -> DictConfig:
    """Job `num` of the sweep as Hydra's launcher composes it and `run_job` completes it: its number, its output
    folder, and HydraConfig holding it (what `${hydra:...}` reads)."""
    job = loader.load_sweep_config(config, overrides)
    with open_dict(job):
        job.hydra.job.id = job.hydra.job.num = num
    HydraConfig.instance().set_config(job)  # before the folder: hydra.sweep.subdir may read ${hydra:job.num}
    folder = os.path.join(str(job.hydra.sweep.dir), str(job.hydra.sweep.subdir))
    with read_write(job.hydra.runtime), open_dict(job.hydra.runtime):  # set_config made the hydra node read-only
        job.hydra.runtime.output_dir = os.path.abspath(folder)
    HydraConfig.instance().set_config(job)
    return job


def _typed(overrides: list[str]) -> list[str]:
    """A job's overrides as `key=value` with the value as typed (the sweep's split escapes `$`, `{`, `}`), for
    `check_interpolations`."""
    return [f"{o.get_key_element()}={o.value()}" for o in OverridesParser.create().parse_overrides(overrides)]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Nothing printed or logged below an error while the sweep's jobs are checked."""
    out, previous = io.StringIO(), logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    finally:
        logging.disable(previous)


def _note_folders(config: DictConfig, key: str, sweep: bool) -> None:
    _before.clear()
    try:
        folder = Path(os.path.abspath(str(OmegaConf.select(config, key))))
    except Exception:  # noqa: BLE001 - a folder we cannot name is one we never remove
        return
    children = set()  # the folders a reused sweep folder holds already, as paths under it (job folders nest: j/0)
    if sweep and folder.is_dir() and not folder.is_symlink():
        for root, dirs, _ in os.walk(folder):
            rel = Path(root).relative_to(folder)
            children.update(rel / name for name in dirs)
            if len(rel.parts) >= SUBDIR_DEPTH - 1:
                dirs.clear()  # hydra.sweep.dir=. would walk the whole launch folder
    _before.update(folder=folder, sweep=sweep, children=children,
                   existed={p for p in (folder, *folder.parents) if os.path.lexists(p)})


def _made_by_this_run(path: Path) -> bool:
    """Whether `path` (the run / sweep folder, a job folder under the sweep folder, or a parent of the run folder)
    was made by this run: it was not there when RunFolders looked. Anything else is not ours to remove."""
    if not _before or path in _before["existed"] or os.path.islink(path):
        return False
    folder = _before["folder"]
    if path == folder or path in folder.parents:
        return True
    if folder in path.parents:  # a multirun job's folder: made now unless the reused sweep folder had it
        return path.relative_to(folder) not in _before["children"]
    return False


def _remove_made_folder(path: Path, allowed: Callable[[dict[str, Path]], bool]) -> bool:
    """Remove `path` when this run made it and `allowed(its entries)`, then its empty parents this run made.
    The working directory and the folders above it are never removed."""
    here = Path.cwd()
    if not _made_by_this_run(path) or not path.is_dir() or path == here or path in here.parents:
        return False
    try:
        if not allowed({p.name: p for p in path.iterdir()}):
            return False
        shutil.rmtree(path)
        parent = path.parent
        while _made_by_this_run(parent) and parent != here and parent not in here.parents \
                and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    except OSError:  # a file open elsewhere, a permission: the folder stays, as Hydra left it
        return False
    return True


def _only_hydras_record(job_name: str, record_name: str | None) -> Callable[[dict[str, Path]], bool]:
    def allowed(entries: dict[str, Path]) -> bool:
        record = entries.pop(record_name, None) if record_name else None  # hydra.output_subdir (.hydra)
        log = entries.pop(f"{job_name}.log", None)
        return not entries and (log is None or log.is_file()) and (record is None or (record.is_dir() and all(
            f.is_file() and f.name in HYDRA_RECORD for f in record.iterdir())))
    return allowed


def discard_refused_run() -> bool:
    """Remove the output folder of a refused run when this run made it and it holds nothing but Hydra's record of
    the job (.hydra/ and <job name>.log): a refused command line leaves no empty run folder behind. A folder that
    was there before the run (even empty), one with anything else in it (a checkpoint, a result, a file the user put
    there), a symlink, and the working directory and the folders above it are kept; the empty folders the run made
    above it (outputs/<date>/) go too. In a multirun, the sweep folder goes as well when this run made it and it
    is left with nothing but Hydra's multirun.yaml. Under `hydra.job.chdir=true` the job is first taken back to
    the launch folder.

    Returns:
        True when the run's folder was removed.
    """
    if not HydraConfig.initialized() or not _before:
        return False
    runtime = HydraConfig.get().runtime
    out = Path(os.path.abspath(runtime.output_dir))
    here = Path.cwd()
    if (here == out or out in here.parents) and runtime.cwd:
        os.chdir(runtime.cwd)  # hydra.job.chdir=true: Hydra moved us into the folder; the run is over
    removed = _remove_made_folder(out, _only_hydras_record(HydraConfig.get().job.name,
                                                           HydraConfig.get().output_subdir))
    discard_refused_sweep()
    return removed


def discard_refused_sweep() -> bool:
    """Remove a multirun's sweep folder when this run made it and it holds only Hydra's multirun.yaml (every job
    of it was refused, or Hydra refused the sweep before its first job ran)."""
    if not _before.get("sweep"):
        return False
    return _remove_made_folder(_before["folder"], lambda entries: set(entries) <= {"multirun.yaml"} and all(
        p.is_file() for p in entries.values()))


def with_run_folders(args: list[str]) -> list[str]:
    """`args` with the override that adds `RunFolders` to Hydra's callbacks, placed where Hydra's parser takes it
    (right after the command line's overrides, or first when there are none); unchanged when it is there already
    (a DDP rank started with the parent's command line) or when nothing will run (--help, --cfg, --info...)."""
    if any(a.lstrip("+~").startswith(RUN_FOLDERS_KEY) for a in args):
        return args
    try:
        flags = get_args_parser().parse_args(args)
    except BaseException:  # noqa: BLE001 - refused by check_flags before this runs
        return args
    if flags.help or flags.hydra_help or flags.cfg or flags.info or flags.shell_completion \
            or flags.experimental_rerun:
        return args
    ours = f"+{RUN_FOLDERS_KEY}._target_={RunFolders.__module__}.{RunFolders.__qualname__}"
    if not flags.overrides:
        return [ours, *args]
    seen = 0
    for i, arg in enumerate(args):  # the overrides are one run of arguments, in order
        seen += arg == flags.overrides[seen]
        if seen == len(flags.overrides):
            return [*args[:i + 1], ours, *args[i + 1:]]
    return args


def task_overrides() -> list[str]:
    """The running Hydra job's command-line overrides as typed (`data.block_size=${nope}`, not resolved: Hydra keeps
    them in its config, where reading an item would resolve the interpolation inside the string)."""
    return [str(o) for o in OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)]


@contextlib.contextmanager
def _user_environment() -> Iterator[None]:
    """The user's own HYDRA_FULL_ERROR while a task runs under `run_hydra` (which sets it for Hydra's sake)."""
    user = _user_env[0]
    if user is _UNSET:
        yield
        return
    _set_env("HYDRA_FULL_ERROR", user)
    try:
        yield
    finally:
        os.environ["HYDRA_FULL_ERROR"] = "1"


def _set_env(name: str, value: object) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = str(value)


def run_hydra(app: str, hydra_main: Callable[[], Any], argv: list[str] | None = None,
              check: Callable[[DictConfig], None] | None = None) -> None:
    """Run a `@hydra.main` function with `argv` (default: sys.argv[1:]) as its command line.

    `check`: the app's check of one job's config (the task's config, as the task function gets it), raising a
    user's error before anything loads; a multirun applies it to every job before the first one runs
    (`check_sweep`).

    Hydra's refusals of the command line (an unknown key or group option, bad override syntax, a bad flag) print
    as one "<app>: error: ..." line and exit `USER_EXIT`, as the task's own user errors do; under `debug()` they
    keep their traceback. `quant=<path to a recipe YAML>` is made a `quant` group option first
    (`qat.cli.recipe_path`), and `<group>=null` a delete where the job runs without the group (`null_groups`).
    """
    saved_argv, user_env, debugging = sys.argv, os.environ.get("HYDRA_FULL_ERROR"), debug()
    args = list(sys.argv[1:] if argv is None else argv)
    _task_bugs.clear()
    try:
        check_flags(app, args)
        check_groups(app, args)
        args = null_groups(app, args)
        with recipe_paths(args) as args, _shown_config(app, args):
            sys.argv = [program_path(app, saved_argv), *with_run_folders(args)]
            _user_env[0], _sweep_check[0] = user_env, (app, check) if check is not None else None
            os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises what it would print: formatted here, once
            hydra_main()
    except Exception as exc:
        message = None if debugging or any(exc is bug for bug in _task_bugs) else _refusal(app, exc, args)
        if message is None:
            raise
        discard_refused_sweep()  # Hydra refused a multirun's job after it wrote the sweep's multirun.yaml
        print(f"{app}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(USER_EXIT) from None
    finally:
        sys.argv, _user_env[0], _sweep_check[0] = saved_argv, _UNSET, None
        _task_bugs.clear()
        _before.clear()
        _set_env("HYDRA_FULL_ERROR", user_env)  # an in-process caller (a test) gets its environment back
        GlobalHydra.instance().clear()  # the next in-process run composes afresh


def program_path(app: str, argv: list[str]) -> str:
    """sys.argv[0] while the task runs: the console script's own file when that is what runs (its name is `app`),
    else `app`.

    Lightning's DDP launcher starts the other ranks as `python <argv[0]> <args>` when the program is not a
    `python -m` module, so the console script must stay a path that runs (a bare `qat-train` is looked for in the
    working directory); Hydra names the program in its help by argv[0]'s basename, `app` either way.
    Example:
        >>> program_path("qat-train", ["/venv/bin/qat-train", "trainer=ddp"])  # where that file exists
        '/venv/bin/qat-train'
        >>> program_path("qat-train", ["/usr/bin/pytest"])
        'qat-train'
    """
    path = argv[0] if argv else ""
    return path if os.path.basename(path) == app and os.path.isfile(path) else app


@contextlib.contextmanager
def _shown_config(app: str, args: list[str]) -> Iterator[None]:
    """`--cfg job|hydra|all` (`--package`, `--resolve`): what Hydra prints is held until the config is printed
    whole, so that a command that fails prints its error line alone (Hydra writes `# @package <p>` before
    `--resolve` fails on a bad interpolation), and Hydra's "package 'x' not found in config" (its own line, exit 1)
    is a ConfigError naming the flag and the keys there are (exit USER_EXIT, as other config errors)."""
    try:
        flags = get_args_parser().parse_args(args)
    except BaseException:  # noqa: BLE001 - refused by check_flags before this runs; Hydra parses it again
        flags = None
    if flags is None or flags.cfg is None or flags.help or flags.hydra_help:  # help wins over --cfg in Hydra
        yield
        return
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    except SystemExit as exc:
        if exc.code == 1 and err.getvalue().strip() == f"package '{flags.package}' not found in config":
            job = {g for g, option in default_groups(app).items() if option is not None} | top_level_keys(app)
            # the groups a null default leaves out are not in the config
            keys = {"job": job - {"hydra"}, "hydra": {"hydra"}, "all": job | {"hydra"}}[flags.cfg]
            raise ConfigError(f"--package {flags.package}: --cfg {flags.cfg} has no such node; give a key of it "
                              f"(a.b for a nested one): {', '.join(sorted(keys))}") from None
        sys.stderr.write(err.getvalue())
        raise
    except BaseException:
        sys.stderr.write(err.getvalue())  # what came before the error (a warning), not the config's first lines
        raise
    sys.stdout.write(out.getvalue())
    sys.stderr.write(err.getvalue())


def _refusal(app: str, exc: Exception, args: list[str]) -> str | None:
    """The message for an error raised before or around the task (ours or Hydra's); None for a bug."""
    if isinstance(exc, UserError):  # a bad quant=<path>, `group=null`, a bad flag: refused before Hydra starts
        return str(exc)
    if isinstance(exc, (FileExistsError, NotADirectoryError, PermissionError)) and exc.filename:
        # Hydra making the run / sweep folder (hydra.run.dir=<a file>, a dangling link, a read-only place)
        return (f"{exc.filename}: hydra cannot make the output folder there ({exc.strerror}); give "
                "hydra.run.dir= (hydra.sweep.dir= for -m) a folder that can be made and written")
    return hydra_message(exc, args, sorted(default_groups(app)), app_options(app))


def app_options(app: str) -> dict[str, list[str]]:
    """{group: the options `app` takes} for groups it takes only some of: qat-ptq's `method` options are the
    configs/method files of a registered PTQ method (fp, qat, qat_gptq... are qat-compare rows), named by their
    file as in qat-compare's `methods=[...]` check."""
    if app != "qat-ptq":
        return {}
    return {"method": sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml") if p.stem in METHODS)}


def check_flags(app: str, argv: list[str]) -> None:
    """Refuse an unknown or malformed flag (`--bogus`, `--info quant=x`) with argparse's one-line reason, before
    Hydra's parser would print its usage text too.

    Raises:
        ConfigError: naming the flag and what is valid.
    """
    if any(a in ("--version", "--experimental-rerun") or a.startswith("--experimental-rerun=") for a in argv):
        return  # Hydra's own actions: it prints and exits, or reruns a pickle
    parser = get_args_parser()
    parser.prog = app

    def refuse(message: str) -> None:
        raise ConfigError(f"{message} (see {app} --help and {app} --hydra-help)")

    parser.error = refuse  # type: ignore[method-assign]  # instead of printing usage and exiting
    parser.parse_args(argv)


def check_groups(app: str, argv: list[str]) -> None:
    """Refuse `group=option` (`+group=` too) of a config group that another app's config uses but `app`'s does
    not (`qat-ptq experiment=tiny_qat`): Hydra would say "No match in the defaults list ... use +experiment=",
    and that would fail later on the experiment's keys the job does not have.

    Raises:
        ConfigError: naming the group, the app(s) it belongs to and `app`'s own groups.
    """
    own = default_groups(app)
    keys = top_level_keys(app)  # a plain key of the app's own config (qat-sensitivity's `method`) is not a group
    for arg in argv:
        key, sep, _ = arg.partition("=")
        group = key.lstrip("+")
        if not sep or key.startswith("-") or group in own or group in keys or not (CONFIG_DIR / group).is_dir():
            continue
        owners = [a for a in _apps() if a != app and group in default_groups(a)]
        if owners:
            apps = ", ".join(f"{a}'s" for a in owners)
            raise ConfigError(f"{arg}: {app} has no {group} group (it is {apps})"
                              f"; its groups: {', '.join(sorted(own)) or '(none)'}")


def _apps() -> list[str]:
    """The Hydra apps: qat-<name> for each configs/<name>.yaml."""
    return [f"qat-{p.stem}" for p in sorted(CONFIG_DIR.glob("*.yaml"))]


def null_groups(app: str, argv: list[str]) -> list[str]:
    """`argv` with each `<group>=null` (`+` / `++` too) of a config group in the defaults list of `app`'s config
    (configs/<app without qat->.yaml) made Hydra's delete `~<group>` where that default is null (the job takes
    the group absent: qat-sensitivity's / qat-eval's quant); Hydra itself would fail with a traceback.

    Raises:
        ConfigError: `<group>=null` for a group whose default is an option (the job needs one), naming the options.
    """
    defaults = default_groups(app)
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


def top_level_keys(app: str) -> set[str]:
    """The keys `app`'s own config file sets itself (not through its defaults list)."""
    config = CONFIG_DIR / f"{app.removeprefix('qat-')}.yaml"
    return set(yaml.safe_load(config.read_text()) or {}) - {"defaults"} if config.is_file() else set()


def default_groups(app: str) -> dict[str, str | None]:
    """{group: default option or None} of the config groups in the defaults list of `app`'s config."""
    config = CONFIG_DIR / f"{app.removeprefix('qat-')}.yaml"
    if not config.is_file():
        return {}
    entries = (yaml.safe_load(config.read_text()) or {}).get("defaults") or []
    return {k: v for e in entries if isinstance(e, dict) for k, v in e.items() if (CONFIG_DIR / k).is_dir()}


def run_plain(app: str, main: Callable[[], int | None]) -> int:
    """Run a non-Hydra CLI body (argparse) inside the same boundary; returns its exit status."""
    try:
        return int(main() or 0)
    except Exception as exc:
        code = None if debug() else report(app, exc)
        if code is None:
            raise
        return code
