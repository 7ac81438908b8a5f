"""The ``sparseheal.json`` record each stage writes, and atomic output directories."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from sparseheal.checks import MASKS_FILE
from sparseheal.errors import ConfigError

__all__ = [
    "temporary_sibling",
    "replace_file",
    "output_lock",
    "lock_path",
    "write_json_atomic",
    "RECORD_FILE",
    "MASKS_FILE",
    "read_record",
    "write_record",
    "versions",
    "peak_rss_mb",
    "atomic_dir",
    "Stopwatch",
]

log = logging.getLogger(__name__)

RECORD_FILE = "sparseheal.json"
_PACKAGES = (
    "sparseheal", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "lm_eval",
)


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape results."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


_NUMBER = (int, float)
_TYPES: dict[str, tuple] = {  # the record's keys that stages read, and the types they may hold
    "stage": (str,), "method": (str,), "heal_method": (str,), "pattern": (str,), "sparsity": _NUMBER,
    "sparsity_achieved": _NUMBER, "base_model": (str,), "base_path": (str,), "base_hash": (str,),
    "weights_hash": (str,), "pruned_from": (str,), "calibration": (dict,), "layers": (dict,),
    "layer_sparsity": (dict,), "recipe": (dict,), "previous": (dict,), "families": (dict,),
    "pruned_parameters": (int,), "prunable_parameters": (int,),
}
MAX_RECORD_DEPTH = 64  # stages chained by "previous"


def check_record(data: Any, path: Path, flag: str, depth: int = 0) -> dict[str, Any]:
    """Refuses a record that is not a mapping, or whose known keys hold the wrong types (checked down the
    chain of earlier stages' records)."""
    if not isinstance(data, dict):
        raise ConfigError(flag, f"{path} is damaged (a {type(data).__name__}, not a record); restore it or "
                                "delete it")
    if depth > MAX_RECORD_DEPTH:
        raise ConfigError(flag, f"{path} is damaged (records nested deeper than {MAX_RECORD_DEPTH}); restore "
                                "it or delete it")
    for key, types in _TYPES.items():
        value = data.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise ConfigError(flag, f"{path} is damaged ({key} is {json.dumps(value)[:40]}, not a "
                                    f"{'/'.join(t.__name__ for t in types)}); restore it or delete it")
    if data.get("previous") is not None:
        check_record(data["previous"], path, flag, depth + 1)
    return data


def read_record(directory: str | os.PathLike, flag: str = "MODEL") -> dict[str, Any] | None:
    """The record of a stage directory, or None when it has none; a damaged one is a ConfigError naming
    ``flag`` (the argument that named the directory)."""
    path = Path(directory) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError, UnicodeDecodeError, OSError) as err:
        raise ConfigError(flag, f"{path} is damaged (not readable JSON: {type(err).__name__}); restore it or "
                                "delete it") from None
    return check_record(data, path, flag)


def write_record(directory: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Writes ``record`` (plus versions) as ``sparseheal.json`` in ``directory``."""
    path = Path(directory) / RECORD_FILE
    record = {**record, "versions": versions()}
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


_OURS = ".sparseheal-partial"  # inside a temporary directory: the process id that made it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _clear_stale(target: Path) -> None:
    """Removes temporary siblings of ``target`` that this tool made in a process that is gone (killed
    mid-write); anything else beside the output, whatever its name, is left alone."""
    for path in target.parent.glob(f".{target.name}.*.partial"):
        mark = path / _OURS
        try:
            pid = int(mark.read_text().strip()) if mark.is_file() and not path.is_symlink() else None
        except (OSError, ValueError):
            pid = None
        if pid is not None and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def temporary_sibling(path: str | os.PathLike, directory: bool = False) -> Path:
    """A new hidden sibling of ``path`` (``.NAME.<random>.partial``), created exclusively, so that it can
    never be something the user had there."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    if directory:  # mkdtemp and mkstemp make them owner-only: the output gets the usual modes
        made = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        made.chmod(0o777 & ~umask)
        return made
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    Path(name).chmod(0o666 & ~umask)
    return Path(name)


def replace_file(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary sibling renamed into place."""
    tmp = temporary_sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling directory that replaces ``target`` only when the block succeeds.

    The sibling is created exclusively under a fresh name (``.NAME.<random>.partial``), so no file of the
    user's is ever taken for it. An exception leaves ``target`` as it was and removes the sibling; a
    kill leaves the sibling, which the next attempt on ``target`` removes (it carries the id of the
    process that made it).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(target)
    tmp = temporary_sibling(target, directory=True)
    (tmp / _OURS).write_text(str(os.getpid()))
    try:
        yield tmp
        (tmp / _OURS).unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if target.exists() or target.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{target} appeared while this stage ran")
            old = temporary_sibling(target, directory=True)
            old.rmdir()  # a fresh name, free: the old output (a directory, file or link) moves there
            os.replace(target, old)
            os.replace(tmp, target)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Stopwatch:
    """Named wall-clock timings: ``with watch("calibration"): ...``; ``watch.times`` in seconds."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - start, 3)


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of an output: a hidden sibling of it, where every process that writes the output
    sees it (whatever its temporary directory), removed when the lock is released."""
    target = Path(target).expanduser().absolute()
    return target.parent / f".{target.name}.sparseheal-lock"


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, flag: str = "--output") -> Iterator[None]:
    """Holds an exclusive lock on the output ``target`` while the block runs (the lock file holds this
    process id); a second command on the same output fails at once naming the holder's process id. In a
    distributed launch only the first process, the one that writes, takes it. A lock file left by a killed
    process holds no lock (the kernel released it) and is taken over, then removed."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _locked(path, flag, target)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _locked(path: Path, flag: str, target: str | os.PathLike) -> int:
    """An open descriptor of ``path`` holding its exclusive lock; retried when the file was unlinked
    (its holder released it) between opening and locking, so two processes never lock two files."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(flag, f"{target} is being written by another sparseheal command (process "
                                    f"{holder}); wait for it to finish or choose another {flag}") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """Writes JSON to a temporary sibling and renames it into place (never a half-written file)."""
    replace_file(path, json.dumps(data, indent=2) + "\n")
