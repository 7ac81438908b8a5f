"""Dataclasses for each stage; ``__post_init__`` validates and names the bad flag.

Every check here runs before any model is loaded or any file is written, so bad input fails fast
with one line that names the flag and what is allowed.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import tempfile
from collections.abc import Iterator
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
    "check_device",
    "check_dtype",
    "check_pickle",
    "check_output",
    "check_free_space",
    "without_space_checks",
    "weights_bytes",
    "MIN_FREE_BYTES",
    "check_positive",
    "check_nonnegative",
    "check_above_zero",
    "check_unit",
    "check_model_dir",
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
            f"pattern {pattern[0]}:{pattern[1]} implies sparsity {implied:g}; "
            f"omit --sparsity or pass {implied:g}",
        )
    return implied


def check_positive(flag: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or value < 1):
        raise ConfigError(flag, f"must be an integer >= 1, got {value}")


def check_nonnegative(flag: str, value: float, what: str = "a number") -> None:
    if isinstance(value, bool) or value < 0:
        raise ConfigError(flag, f"must be {what} >= 0, got {value}")


def check_above_zero(flag: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(flag, f"must be > 0, got {value}")


def check_unit(flag: str, value: float, closed_high: bool) -> None:
    """``value`` in [0, 1] (closed_high) or [0, 1)."""
    if not (0.0 <= value <= 1.0) or (value == 1.0 and not closed_high):
        raise ConfigError(flag, f"must be in [0, 1{']' if closed_high else ')'}, got {value}")


def check_model_dir(path: str, flag: str) -> None:
    root = Path(path).expanduser()
    if not root.is_dir() or not (root / "config.json").is_file():
        raise ConfigError(flag, f"{path} is not a model directory (no config.json)")


def check_pickle(model: str | os.PathLike | None, allow_pickle: bool, stem: str = "") -> None:
    """Refuses a local directory whose weights are pickle-only (``.bin``, which can run code when
    loaded) unless ``--allow-pickle``; ``stem`` narrows the files looked at (``adapter_model``)."""
    if model is None or allow_pickle:
        return
    root = Path(model).expanduser()
    if not root.is_dir():
        return
    safe = [f for f in root.glob(f"{stem}*.safetensors") if f.name != "sparsity_masks.safetensors"]
    if not safe and list(root.glob(f"{stem}*.bin")):
        raise ConfigError("--allow-pickle", f"{root} holds only pickle (.bin) weights, which can run code "
                                            "when loaded; pass --allow-pickle if you trust them")


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError("--dtype", f"choose from {', '.join(DTYPES)}; got {dtype!r}")


def check_device(device: str | None, flag: str = "--device") -> None:
    """Refuses a device string torch cannot parse, or an accelerator this machine does not have."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(flag, f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from err
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ConfigError(flag, f"{device} is not available here ({count} CUDA devices); use cpu")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(flag, f"{device} is not available here; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(flag, f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")


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
    try:  # a real write: read-only mounts and special file systems pass os.access
        os.rmdir(tempfile.mkdtemp(prefix=".sparseheal-write-test-", dir=parent))
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(flag, f"cannot write under {parent} ({reason})") from err
    return path


MIN_FREE_BYTES = 32 * 2**20  # what any output needs at least (config, tokenizer, record, logs)
_SPACE_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("sparseheal_space_checks", default=True)


@contextlib.contextmanager
def without_space_checks() -> Iterator[None]:
    """Turns ``check_free_space`` off in this block (for configs whose outputs are placeholders)."""
    token = _SPACE_CHECKS.set(False)
    try:
        yield
    finally:
        _SPACE_CHECKS.reset(token)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def weights_bytes(model: str | os.PathLike) -> int | None:
    """Bytes of the weight files (.safetensors, .bin; masks excluded) of a local model directory or a
    built-in name; None for a Hub id or a source that does not resolve (its loading reports that)."""
    root = Path(model).expanduser()
    if not root.is_dir():
        from sparseheal.models import BUILTIN_MODELS, resolve_source

        if str(model) not in BUILTIN_MODELS:
            return None
        try:
            root = Path(resolve_source(str(model)).path)
        except ConfigError:
            return None
    files = [f for f in root.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file()
             and f.name != "sparsity_masks.safetensors"]
    return sum(f.stat().st_size for f in files)


def check_free_space(
    output: str | os.PathLike, needed: int | None, what: str, flag: str = "--output"
) -> None:
    """Refuses an output whose file system has less free space than ``needed`` bytes (at least
    ``MIN_FREE_BYTES``), before any work; ``what`` says what the estimate is."""
    import shutil

    if not _SPACE_CHECKS.get():
        return
    parent = Path(output).expanduser().absolute()
    while not parent.exists():
        parent = parent.parent
    needed = max(needed or 0, MIN_FREE_BYTES)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise ConfigError(flag, f"{parent} has {_size(free)} free, but about {_size(needed)} is needed "
                                f"({what}); free some space or choose another {flag}")


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
    calibration_batch_size: int = 2
    dtype: str | None = None
    device: str | None = None
    overwrite: bool = False
    data_dir: str | None = None
    offload: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    nm: tuple[int, int] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        from sparseheal.registry import PRUNERS

        self.method = PRUNERS.canonical(self.method)
        self.nm = parse_pattern(self.pattern)
        self.pattern = "unstructured" if self.nm is None else f"{self.nm[0]}:{self.nm[1]}"
        self.sparsity = resolve_sparsity(self.nm, self.sparsity)
        check_positive("--nsamples", self.nsamples)
        check_positive("--seqlen", self.seqlen)
        check_positive("--calibration-batch-size", self.calibration_batch_size)
        check_dtype(self.dtype)
        check_device(self.device)
        check_output(self.output, self.overwrite)
        if PRUNERS.get(self.method).needs_calibration:
            from sparseheal.data import check_source
            from sparseheal.models import check_seqlen

            check_seqlen(self.model, self.seqlen)
            check_source(self.calibration_data, "--calibration-data")
        check_free_space(self.output, weights_bytes(self.model), "the size of the model's weight files")


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
    limit: int | None = None
    output: str | None = None
    dtype: str | None = None
    device: str | None = None
    data_dir: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        check_positive("--seqlen", self.seqlen)
        check_positive("--max-windows", self.max_windows)
        check_positive("--batch-size", self.batch_size)
        check_positive("--limit", self.limit)
        if self.tasks is None:
            self.tasks = []
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
            check_free_space(out, None, "a results file")
        check_device(self.device)
        from sparseheal.data import check_source
        from sparseheal.models import check_seqlen

        for name in [d.strip() for d in self.dataset.split(",") if d.strip() and d.strip() != "none"]:
            check_source(name, "--dataset")
        if self.seqlen is not None:
            check_seqlen(self.model, self.seqlen)


@dataclass
class InspectConfig:
    """Settings of ``sparseheal inspect``."""

    model: str
    masks: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        check_pickle(self.model, self.allow_pickle)
        if self.masks is not None and not Path(self.masks).is_file():
            raise ConfigError("--masks", f"{self.masks} is not a file")
        if self.masks is not None:
            from sparseheal.sparsity.store import check_masks_file

            check_masks_file(self.masks, self.model)
