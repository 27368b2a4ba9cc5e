"""Exports that are complete or absent: every export (a GGUF file or a folder) is written under a temporary name
beside its destination and renamed into place only when complete.

    with atomic_export("out/native", overwrite=True, folder=True) as tmp:
        write_everything_into(tmp)          # out/native appears (or is replaced) only now

- A lock file `.<name>.qat-lock` (flock, holding the writer's pid) refuses a second export to the same output while
  one runs; the kernel drops the lock when its process dies, so a killed export never blocks the next one.
- Without `overwrite` an existing output is refused, checked again under the lock just before publishing, so two
  exports racing to one output cannot both succeed.
- With `overwrite` the old export survives until the new one is complete: a file is replaced by one atomic rename;
  a folder is swapped in by one atomic exchange (Linux renameat2 RENAME_EXCHANGE) and the old one deleted after, or
  (elsewhere) renamed aside first, the new one renamed in, the old one deleted. A crash between the two renames
  leaves the old export at `.<name>.qat-old-*`, and the next export to that output puts it back first.
- Temporaries of killed exports (`.<name>.qat-tmp-*`, `.<name>.qat-old-*`) are removed and logged by the next export
  into the same folder (under the lock of the output they belong to, so they are surely dead: an old export left
  aside is put back first); they never sit inside an export, so never count in its size.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from qat.errors import UserError
from qat.export.validate import write_checksums

log = logging.getLogger(__name__)

__all__ = ["ExportBusyError", "atomic_export", "folder_writer", "stale_temporaries"]


class ExportBusyError(UserError):
    """Another process is exporting to the same output right now."""


def _names(path: Path) -> tuple[str, str, str]:
    return f".{path.name}.qat-lock", f".{path.name}.qat-tmp-", f".{path.name}.qat-old-"


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporaries an export to `path` may have left beside it (a running export's own included).

    Example:
        >>> stale_temporaries("out/model.gguf")
        []
    """
    path = Path(path)
    _, tmp, old = _names(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if p.name.startswith((tmp, old)))


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `.<name>.qat-lock` beside `path`; the file holds our pid and goes when we are done."""
    lock = path.parent / _names(path)[0]
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ValueError(f"output path {str(path)!r} is not writable: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ExportBusyError(f"output {str(path)!r} is being written by another export (pid {pid}, lock "
                                  f"{str(lock)!r}); wait for it to finish or choose another output") from None
        try:  # the lock file we hold must still be the one at the path (a finishing holder unlinks it)
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _clean_neighbours(path: Path) -> None:
    """Recover and clean the dead temporaries of other outputs in `path`'s folder (their exports were killed and
    never re-run); those of an export running now are left alone (its lock is held)."""
    owners = set()
    for p in path.parent.iterdir():
        for marker in (".qat-tmp-", ".qat-old-"):
            if p.name.startswith(".") and marker in p.name:
                owners.add(p.name[1:p.name.rindex(marker)])
    for name in sorted(owners - {path.name}):
        with contextlib.suppress(ExportBusyError, OSError, ValueError):
            with _lock(path.parent / name):
                _recover(path.parent / name)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _recover(path: Path) -> None:
    """Under the lock: put back an old export a crash left aside, then remove every dead temporary."""
    _, _, old_prefix = _names(path)
    stale = stale_temporaries(path)
    asides = [p for p in stale if p.name.startswith(old_prefix)]
    if asides and not path.exists():
        os.rename(asides[-1], path)
        log.warning("%s: restored the previous export, which an interrupted overwrite had left at %s", path, asides[-1])
        stale.remove(asides[-1])
    for p in stale:
        log.warning("%s: removing %s, left by an export that was killed", path, p)
        _remove(p)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system has no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exists(path: Path) -> bool:
    return path.is_file() or path.is_symlink() or (path.is_dir() and any(path.iterdir()))


def _refuse_existing(path: Path) -> None:
    raise UserError(f"output {str(path)!r} already exists; pass overwrite=true to replace it, or choose another output")


def _publish(tmp: Path, path: Path, overwrite: bool, folder: bool) -> None:
    if _exists(path) and not overwrite:
        _refuse_existing(path)
    if not folder:
        if path.is_dir():
            raise UserError(f"output path {str(path)!r} is a folder; give a file name")
        os.replace(tmp, path)
        return
    if path.exists() and not path.is_dir():
        raise UserError(f"output {str(path)!r} is a file; a folder export cannot replace it")
    if not path.exists() or not any(path.iterdir()):
        os.replace(tmp, path)  # onto nothing, or onto an empty folder
        return
    if _exchange(tmp, path):  # tmp now holds the old export
        _remove(tmp)
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=_names(path)[2]))
    os.replace(path, aside)
    os.replace(tmp, path)
    _remove(aside)


@contextlib.contextmanager
def atomic_export(path: str | os.PathLike, overwrite: bool = True, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary file (or folder) beside `path`; publish it at `path` when the block succeeds.

    Args:
        path: the export's destination (a file, or a folder when `folder`).
        overwrite: replace an existing export (it survives until the new one is complete); else refuse it.
        folder: yield an empty temporary folder, not a file path.
    Raises:
        ExportBusyError: another export to `path` runs now (naming its pid).
        UserError: `path` exists and not `overwrite`, or is a folder for a file export (or a file for a folder one).
        ValueError: the destination folder cannot be written.
    Example:
        >>> with atomic_export("out/m.gguf", overwrite=False) as tmp:
        ...     write_gguf(tmp)
    """
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"output path {str(path)!r} is not writable: {err.strerror or err}") from None
    with _lock(path):
        _recover(path)
        _clean_neighbours(path)
        if _exists(path) and not overwrite:
            _refuse_existing(path)
        prefix = _names(path)[1]
        if folder:
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix))
        else:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix)
            os.close(fd)
            tmp = Path(name)
        try:
            yield tmp
            _publish_mode(tmp, folder)
            _publish(tmp, path, overwrite, folder)
        except BaseException:
            _remove(tmp)
            raise


def _publish_mode(tmp: Path, folder: bool) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if folder else 0o666) & ~umask)  # mkdtemp / mkstemp make private ones


def folder_writer(write: Callable) -> Callable:
    """Make `write(model, folder, *args, **kwargs)` a folder export that is complete or absent (`atomic_export`):
    it writes into a temporary folder, which gets `qat_checksums.json` (`qat.export.validate`) and is published
    at `folder` when it returns; the wrapped function takes
    `overwrite=True` (replace an existing export) and returns the published folder.

    Example:
        >>> @folder_writer
        ... def save_native(model, out_dir, tokenizer=None): ...
    """
    @functools.wraps(write)
    def wrapper(model, out_dir, *args, overwrite: bool = True, **kwargs) -> Path:
        out = Path(out_dir)
        with atomic_export(out, overwrite=overwrite, folder=True) as tmp:
            write(model, tmp, *args, **kwargs)
            write_checksums(tmp)  # last: qat's loaders refuse a file that differs from what was written
        return out
    return wrapper
