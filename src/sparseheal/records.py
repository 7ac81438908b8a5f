"""The ``sparseheal.json`` record each stage writes, and atomic output directories."""

from __future__ import annotations

import contextlib
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


def read_record(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The record of a stage directory, or None when it has none."""
    path = Path(directory) / RECORD_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_record(directory: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Writes ``record`` (plus versions) as ``sparseheal.json`` in ``directory``."""
    path = Path(directory) / RECORD_FILE
    record = {**record, "versions": versions()}
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling directory that replaces ``target`` only when the block succeeds.

    An exception (or a kill) leaves ``target`` as it was; the temporary directory is removed on
    exceptions and reused (cleared) by the next attempt after a kill.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{target} appeared while this stage ran")
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


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
    """The lock file of an output: named by the hash of its absolute path, in the temporary directory
    (so that a process killed with -9 leaves nothing beside its output)."""
    import hashlib
    import tempfile

    key = hashlib.sha256(str(Path(target).expanduser().resolve()).encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / "sparseheal-locks" / f"{key}.lock"


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, flag: str = "--output") -> Iterator[None]:
    """Holds an exclusive lock on the output ``target`` while the block runs (the lock file holds this
    process id); a second command on the same output fails at once naming the holder's process id. In a
    distributed launch only the first process, the one that writes, takes it."""
    import fcntl

    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(flag, f"{target} is being written by another sparseheal command (process "
                                f"{holder}); wait for it to finish or choose another {flag}") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """Writes JSON to a temporary sibling and renames it into place (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
