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

__all__ = [
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
