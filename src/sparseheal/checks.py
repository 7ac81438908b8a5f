"""Reusable checks of user input: numbers, names, devices, paths, outputs and free space.

The ground floor: this module imports nothing of sparseheal but :mod:`sparseheal.errors`. Each check
raises a :class:`ConfigError` that names the flag and says what is allowed. The value checks
(``positive``, ``non_negative``, ...) are the ``check=`` of a setting's declaration
(:mod:`sparseheal.settings`); the path checks run in a stage's preflight.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sparseheal.errors import ConfigError

__all__ = [
    "DTYPES",
    "MASKS_FILE",
    "MIN_FREE_BYTES",
    "Check",
    "positive",
    "window_length",
    "seed",
    "non_negative",
    "above_zero",
    "unit_interval",
    "one_of",
    "check_device",
    "check_model_dir",
    "check_pickle",
    "check_output",
    "check_name_length",
    "check_free_space",
    "existing_parent",
    "check_not_an_input",
    "check_safetensors",
    "check_weight_files",
    "check_gguf",
    "finite",
]

DTYPES = ("float32", "bfloat16", "float16")
MASKS_FILE = "sparsity_masks.safetensors"  # never counted as model weights
MIN_FREE_BYTES = 32 * 2**20  # what any output needs at least (config, tokenizer, record, logs)

Check = Callable[[str, Any], None]  # (flag, value) -> None, or raises ConfigError


def finite(flag: str, value: float | None) -> None:
    """A finite number (None passes); every float setting is checked by it."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(flag, f"must be a finite number, got {value}")


def positive(flag: str, value: int | None) -> None:
    """An integer >= 1 (None passes: the setting is unset)."""
    if value is not None and (isinstance(value, bool) or value < 1):
        raise ConfigError(flag, f"must be an integer >= 1, got {value}")


def seed(flag: str, value: int | None) -> None:
    """A random seed: an integer from 0 to 2**32 - 1 (what numpy, torch and random all take)."""
    if value is not None and (isinstance(value, bool) or not 0 <= value < 2**32):
        raise ConfigError(flag, f"must be an integer from 0 to {2**32 - 1}, got {value}")


def window_length(flag: str, value: int | None) -> None:
    """A perplexity window of at least 2 tokens (its tokens 1..T-1 are predicted; one predicts nothing)."""
    positive(flag, value)
    if value is not None and value < 2:
        raise ConfigError(flag, f"must be at least 2 (a window of one token predicts nothing), got {value}")


def non_negative(what: str = "a number") -> Check:
    """A number >= 0; ``what`` names it in the message ("an integer")."""

    def check(flag: str, value: float | None) -> None:
        if value is not None and (isinstance(value, bool) or value < 0):
            raise ConfigError(flag, f"must be {what} >= 0, got {value}")

    return check


def above_zero(flag: str, value: float | None) -> None:
    """A number > 0 (None passes: the setting is unset)."""
    if value is not None and not value > 0:
        raise ConfigError(flag, f"must be > 0, got {value}")


def unit_interval(closed_high: bool) -> Check:
    """A number in [0, 1] (``closed_high``) or [0, 1)."""

    def check(flag: str, value: float) -> None:
        if not (0.0 <= value <= 1.0) or (value == 1.0 and not closed_high):
            raise ConfigError(flag, f"must be in [0, 1{']' if closed_high else ')'}, got {value}")

    return check


def one_of(choices: Sequence[str]) -> Check:
    """One of ``choices`` (None passes: the setting is unset)."""

    def check(flag: str, value: str | None) -> None:
        if value is not None and value not in choices:
            raise ConfigError(flag, f"choose from {', '.join(choices)}; got {value!r}")

    return check


def check_device(flag: str, device: str | None) -> None:
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


def check_model_dir(path: str, flag: str) -> None:
    """Refuses a path that is not a directory with a config.json."""
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
    safe = [f for f in root.glob(f"{stem}*.safetensors") if f.name != MASKS_FILE]
    if not safe and list(root.glob(f"{stem}*.bin")):
        raise ConfigError("--allow-pickle", f"{root} holds only pickle (.bin) weights, which can run code "
                                            "when loaded; pass --allow-pickle if you trust them")


def check_output(output: str | os.PathLike, overwrite: bool, flag: str = "--output") -> Path:
    """Refuses an existing output (unless overwrite) and an unwritable parent, before any work."""
    path = Path(output).expanduser()
    if not str(output):
        raise ConfigError(flag, "an output directory is required")
    if path.exists() and not overwrite:
        raise ConfigError(flag, f"{path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise ConfigError(flag, f"{path} exists and is not a directory")
    check_name_length(path, flag)
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


_TEMPORARY_NAME = 40  # bytes a temporary sibling's name adds to the output's (".NAME.<random>.partial")


def check_name_length(path: Path, flag: str) -> None:
    """Refuses a name the file system cannot hold, with room for its temporary sibling's name."""
    parent = existing_parent(path.absolute().parent)
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    size = len(os.fsencode(path.name))
    if size + _TEMPORARY_NAME > limit:
        raise ConfigError(flag, f"the name {path.name[:24]}... is {size} bytes; the file system holds names "
                                f"of {limit}, and this one needs room for {_TEMPORARY_NAME} more while it "
                                "is written: choose a shorter name")


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def existing_parent(path: str | os.PathLike) -> Path:
    """``path`` itself (absolute) if it exists, else its nearest existing parent directory."""
    parent = Path(path).expanduser().absolute()
    while not parent.exists():
        parent = parent.parent
    return parent


def check_free_space(
    output: str | os.PathLike, needed: int | None, what: str, flag: str = "--output",
    minimum: int | None = None,
) -> None:
    """Refuses an output whose file system has less free space than ``needed`` bytes (at least
    ``minimum``, by default ``MIN_FREE_BYTES``), before any work; ``what`` says what the estimate is."""
    parent = existing_parent(output)
    needed = max(needed or 0, MIN_FREE_BYTES if minimum is None else minimum)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise ConfigError(flag, f"{parent} has {_size(free)} free, but about {_size(needed)} is needed "
                                f"({what}); free some space or choose another {flag}")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


Inputs = dict[str, "str | os.PathLike | None"] | Sequence[tuple[str, "str | os.PathLike | None"]]


def _real_inputs(inputs: Inputs) -> list[tuple[str, Path]]:
    """Each existing input resolved to its real path, and, for a directory, the real folders its links
    lead to (weights linked from a store elsewhere are read from there)."""
    found = []
    for flag, path in inputs.items() if isinstance(inputs, dict) else inputs:
        if path is None or not str(path) or not Path(path).expanduser().exists():
            continue
        source = Path(path).expanduser().resolve()
        found.append((flag, source))
        if source.is_dir():  # a linked file's folder, or a linked folder itself
            targets = [entry.resolve() for entry in source.iterdir() if entry.is_symlink()]
            links = {t if t.is_dir() else t.parent for t in targets}
            found += [(flag, target) for target in sorted(links) if target != source]
    return found


def check_not_an_input(output: str | os.PathLike, inputs: Inputs, flag: str = "--output") -> None:
    """Refuses an output that is, contains or lies inside one of the command's inputs (``{flag: path}``
    or (flag, path) pairs; paths that do not exist are skipped) or the working directory: writing it
    would delete or overwrite what the command reads."""
    out = Path(output).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if _inside(cwd, out):
        raise ConfigError(flag, f"{output} is {'' if out == cwd else 'a directory above '}the working "
                                "directory; writing it would replace the files there: choose another "
                                f"{flag}")
    for input_flag, source in _real_inputs(inputs):
        if out == source:
            where = "is"
        elif _inside(source, out):
            where = "contains"
        elif _inside(out, source):
            where = "lies inside"
        else:
            continue
        raise ConfigError(flag, f"{output} {where} the input {input_flag} ({source}); the command never "
                                f"writes over its inputs: choose another {flag}")


def check_safetensors(path: str | os.PathLike, flag: str, what: str = "safetensors file") -> None:
    """Refuses a safetensors file (``what`` names it) whose header is unreadable or whose data ends before
    the last tensor the header lists (a file cut short), without reading any tensor."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if size < 8 or length <= 0 or 8 + length > size:
                raise ValueError("the header is cut short")
            header = json.loads(fh.read(length))
        entries = {key: entry for key, entry in header.items() if key != "__metadata__"}
        ends = [int(entry["data_offsets"][1]) for entry in entries.values()]
        for key, entry in entries.items():  # each tensor's bytes are what its dtype and shape say
            begin, end = (int(x) for x in entry["data_offsets"])
            numel = math.prod(int(n) for n in entry["shape"])
            width = _DTYPE_BYTES.get(entry["dtype"])  # bytes per element
            if width is not None and end - begin != numel * width:
                raise ValueError(f"{key} holds {end - begin} bytes, not {numel} of {entry['dtype']}")
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
        raise ConfigError(flag, f"{path} is not a readable {what} ({_reason(err)})") from err
    if 8 + length + max(ends, default=0) > size:
        needed = 8 + length + max(ends)
        raise ConfigError(flag, f"{path} ({what}) is cut short: its header lists {needed} bytes, the file "
                                f"has {size}; copy or download it again")


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_weight_files(model_dir: str | os.PathLike | None, flag: str, stem: str = "") -> None:
    """Refuses a local model (or adapter, ``stem="adapter_model"``) directory with no weight files, or
    with a safetensors file that is unreadable or cut short (None, a Hub id or a file: nothing to check)."""
    if model_dir is None:
        return
    root = Path(model_dir).expanduser()
    if not root.is_dir() or not (root / ("adapter_config.json" if stem else "config.json")).is_file():
        return  # not a model directory: the loader's own check says so
    weights = [f for f in sorted(root.glob(f"{stem}*.safetensors")) if f.name != MASKS_FILE]
    if not weights and not list(root.glob(f"{stem}*.bin")):
        raise ConfigError(flag, f"{root} has no weights ({stem or 'model'}*.safetensors or .bin files)")
    for file in weights:
        check_safetensors(file, flag)


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())[:120]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def check_gguf(path: str | os.PathLike, flag: str = "MODEL") -> None:
    """Refuses a file that is not GGUF (magic, version) or whose tensors reach past its end."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise ConfigError(flag, f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise ConfigError(flag, f"{path} is GGUF version {version}; versions 2 and 3 are supported")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:  # the reader raises whatever its parser meets in a damaged file
        raise ConfigError(flag, f"{path} is not a readable GGUF file: damaged or cut short "
                                f"({_reason(err)})") from err
    if end > path.stat().st_size:
        raise ConfigError(flag, f"{path} is cut short: its tensors need {end} bytes, the file has "
                                f"{path.stat().st_size}")
