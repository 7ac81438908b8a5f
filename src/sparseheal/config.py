"""Dataclasses for each stage; ``__post_init__`` validates and names the bad flag.

Every check here runs before any model is loaded or any file is written, so bad input fails fast
with one line that names the flag and what is allowed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ConfigError",
    "DTYPES",
    "PruneConfig",
    "EvaluateConfig",
    "InspectConfig",
    "parse_pattern",
    "resolve_sparsity",
]

DTYPES = ("float32", "bfloat16", "float16")
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class ConfigError(ValueError):
    """Bad user input. ``flag`` names the flag or key; the message says what is allowed."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """Parses ``--pattern``: ``"unstructured"`` -> None, ``"N:M"`` -> (N, M) with 0 < N < M.

    N:M follows the hardware convention: in every group of M consecutive input weights of a row,
    at most N stay non-zero (2:4 keeps 2 of 4).
    """
    if pattern.strip().lower() == "unstructured":
        return None
    match = _NM_RE.match(pattern)
    if not match:
        raise ConfigError("--pattern", f"expected 'unstructured' or N:M such as 2:4, got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError("--pattern", f"N:M needs 0 < N < M (N weights kept of every M), got {n}:{m}")
    return n, m


def resolve_sparsity(pattern: tuple[int, int] | None, sparsity: float | None) -> float:
    """Returns the sparsity ratio implied by ``--pattern`` and ``--sparsity``.

    Unstructured defaults to 0.5; N:M implies 1 - N/M and refuses an explicit different ratio.
    """
    if sparsity is not None and not (0.0 <= sparsity < 1.0):
        raise ConfigError("--sparsity", f"must be in [0, 1), got {sparsity}")
    if pattern is None:
        return 0.5 if sparsity is None else float(sparsity)
    implied = 1.0 - pattern[0] / pattern[1]
    if sparsity is not None and abs(sparsity - implied) > 1e-9:
        raise ConfigError(
            "--sparsity",
            f"pattern {pattern[0]}:{pattern[1]} implies sparsity {implied:g}; omit --sparsity or pass {implied:g}",
        )
    return implied


def _check_positive(flag: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or value < 1):
        raise ConfigError(flag, f"must be an integer >= 1, got {value}")


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError("--dtype", f"choose from {', '.join(DTYPES)}; got {dtype!r}")


def check_output(output: str | os.PathLike, overwrite: bool, flag: str = "--output") -> Path:
    """Refuses an existing output (unless overwrite) and an unwritable parent, before any work."""
    path = Path(output).expanduser()
    if not str(output):
        raise ConfigError(flag, "an output directory is required")
    if path.exists() and not overwrite:
        raise ConfigError(flag, f"{path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise ConfigError(flag, f"{path} exists and is not a directory")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ConfigError(flag, f"cannot write under {parent} (permission denied)")
    return path


@dataclass
class PruneConfig:
    """Settings of the prune stage (see ``sparseheal prune --help``)."""

    model: str
    output: str
    method: str = "wanda"
    sparsity: float | None = None
    pattern: str = "unstructured"
    calibration_data: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    calibration_batch_size: int = 8
    dtype: str | None = None
    device: str | None = None
    overwrite: bool = False
    data_dir: str | None = None
    nm: tuple[int, int] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        from sparseheal.registry import PRUNERS

        self.method = PRUNERS.canonical(self.method)
        self.nm = parse_pattern(self.pattern)
        self.pattern = "unstructured" if self.nm is None else f"{self.nm[0]}:{self.nm[1]}"
        self.sparsity = resolve_sparsity(self.nm, self.sparsity)
        _check_positive("--nsamples", self.nsamples)
        _check_positive("--seqlen", self.seqlen)
        _check_positive("--calibration-batch-size", self.calibration_batch_size)
        check_dtype(self.dtype)
        check_output(self.output, self.overwrite)


@dataclass
class EvaluateConfig:
    """Settings of the evaluate stage (see ``sparseheal evaluate --help``)."""

    model: str
    adapter: str | None = None
    dataset: str = "wikitext2"
    seqlen: int | None = None
    max_windows: int | None = None
    batch_size: int = 1
    tasks: list[str] = field(default_factory=list)
    output: str | None = None
    dtype: str | None = None
    device: str | None = None
    data_dir: str | None = None

    def __post_init__(self) -> None:
        _check_positive("--seqlen", self.seqlen)
        _check_positive("--max-windows", self.max_windows)
        _check_positive("--batch-size", self.batch_size)
        check_dtype(self.dtype)
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if self.adapter is not None and not Path(self.adapter).is_dir():
            raise ConfigError("--adapter", f"{self.adapter} is not a directory")
        if self.output is not None:
            out = Path(self.output)
            if out.is_dir():
                raise ConfigError("--output", f"{out} is a directory; give a .json file path")
            check_output(out.parent if str(out.parent) else ".", overwrite=True)


@dataclass
class InspectConfig:
    """Settings of ``sparseheal inspect``."""

    model: str
    masks: str | None = None

    def __post_init__(self) -> None:
        if self.masks is not None and not Path(self.masks).is_file():
            raise ConfigError("--masks", f"{self.masks} is not a file")
