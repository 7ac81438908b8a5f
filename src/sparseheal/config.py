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
    "HealConfig",
    "MergeConfig",
    "MERGE_MODES",
    "DISTILL_LOSSES",
    "checkpoint_dir_for",
    "last_checkpoint",
    "RECIPE_FILE",
    "parse_pattern",
    "resolve_sparsity",
    "check_device",
    "check_dtype",
    "check_pickle",
    "check_output",
    "check_free_space",
    "without_space_checks",
    "weights_bytes",
    "heal_bytes",
    "MIN_FREE_BYTES",
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


def _check_positive(flag: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or value < 1):
        raise ConfigError(flag, f"must be an integer >= 1, got {value}")


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


def heal_bytes(method: str, weights: int | None, save_steps: int | None, save_total_limit: int,
               merge: str) -> tuple[int, str]:
    """Estimated bytes a heal writes (output plus checkpoints) from the pruned weights' size, and how."""
    weights = weights or 0
    if method == "lora":  # adapters are small; a merged copy is a whole model
        return (weights, "a merged copy of the model") if merge != "none" else (0, "the adapter")
    kept = save_total_limit if save_steps else 0  # a checkpoint: weights + two AdamW moments
    return weights * (1 + 3 * kept), f"the model's weights, plus {kept} checkpoints of 3x that"


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
        _check_positive("--nsamples", self.nsamples)
        _check_positive("--seqlen", self.seqlen)
        _check_positive("--calibration-batch-size", self.calibration_batch_size)
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
        _check_positive("--seqlen", self.seqlen)
        _check_positive("--max-windows", self.max_windows)
        _check_positive("--batch-size", self.batch_size)
        _check_positive("--limit", self.limit)
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



MERGE_MODES = ("none", "masked", "dense")
DISTILL_LOSSES = ("kl", "squarehead")
RECIPE_FILE = "heal_recipe.json"
# HealConfig fields that may change when a run is resumed (they do not change what is trained)
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "device", "teacher_device", "data_dir", "logging_steps",
                               "eval_steps", "save_steps", "save_total_limit", "merge", "max_bad_steps",
                               "allow_pickle", "trust_remote_code"})


def checkpoint_dir_for(output: str | os.PathLike) -> Path:
    """Training checkpoints of ``output`` live in the sibling ``<output>.ckpt/``."""
    path = Path(output).expanduser()
    return path.with_name(path.name + ".ckpt")


def last_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``checkpoint_dir`` (None when there is none).

    The Trainer writes a checkpoint's files one after another and ``trainer_state.json`` last, so a
    run killed while saving leaves a directory without a readable state; resuming from it would
    restart at step 0 from half-saved weights. Such directories are skipped here.
    """
    import json

    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return path
    return None


def _check_nonnegative(flag: str, value: float, what: str = "a number") -> None:
    if isinstance(value, bool) or value < 0:
        raise ConfigError(flag, f"must be {what} >= 0, got {value}")


def _check_above_zero(flag: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(flag, f"must be > 0, got {value}")


def _check_unit(flag: str, value: float, closed_high: bool) -> None:
    """``value`` in [0, 1] (closed_high) or [0, 1)."""
    if not (0.0 <= value <= 1.0) or (value == 1.0 and not closed_high):
        raise ConfigError(flag, f"must be in [0, 1{']' if closed_high else ')'}, got {value}")


def _check_model_dir(path: str, flag: str) -> None:
    root = Path(path).expanduser()
    if not root.is_dir() or not (root / "config.json").is_file():
        raise ConfigError(flag, f"{path} is not a model directory (no config.json)")


@dataclass
class HealConfig:
    """Settings of the heal stage (see ``sparseheal heal --help``); every field is a flag."""

    pruned_dir: str
    output: str
    method: str = "lora"
    data: str = "c4"
    data_dir: str | None = None
    max_train_samples: int = 30000
    max_eval_samples: int = 128
    block_size: int = 1024
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 1
    gradient_accumulation: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    scheduler: str | None = None
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str | None = None
    device: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    bf16: bool = False
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int = 2
    resume: bool = False
    overwrite: bool = False
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: str = "q_proj,v_proj"
    mask_aware: bool = False
    merge: str = "none"
    train_embeddings: bool = False
    train_norms: bool = True
    distill: str | None = None
    teacher: str | None = None
    temperature: float = 2.0
    distill_alpha: float = 0.5
    teacher_dtype: str | None = None
    teacher_device: str | None = None
    self_sequences: int = 64
    self_length: int = 256
    self_temperature: float = 1.0
    self_top_p: float = 0.95
    self_seed: int = 0
    max_bad_steps: int = 10
    fsdp: bool = False

    def __post_init__(self) -> None:
        from sparseheal.heal import load_healers
        from sparseheal.heal.fsdp import check_fsdp
        from sparseheal.registry import HEALERS

        load_healers()
        self.method = HEALERS.canonical(self.method)
        healer = HEALERS.get(self.method)
        self.lr = healer.default_lr if self.lr is None else self.lr
        self.scheduler = healer.default_scheduler if self.scheduler is None else self.scheduler
        self._check_numbers()
        self._check_names()
        check_fsdp(self)
        _check_model_dir(self.pruned_dir, "PRUNED_DIR")
        check_pickle(self.pruned_dir, self.allow_pickle)
        check_output(self.output, self.overwrite)
        self._check_checkpoints()
        needed, what = heal_bytes(self.method, weights_bytes(self.pruned_dir), self.save_steps,
                                  self.save_total_limit, self.merge)
        check_free_space(self.output, needed, what)

    def _check_numbers(self) -> None:
        positive = {
            "--max-train-samples": self.max_train_samples, "--block-size": self.block_size,
            "--max-steps": self.max_steps, "--batch-size": self.batch_size,
            "--gradient-accumulation": self.gradient_accumulation, "--logging-steps": self.logging_steps,
            "--eval-steps": self.eval_steps, "--save-steps": self.save_steps,
            "--save-total-limit": self.save_total_limit, "--rank": self.rank,
            "--self-sequences": self.self_sequences, "--self-length": self.self_length,
        }
        for flag, value in positive.items():
            _check_positive(flag, value)
        counts = {"--max-eval-samples": self.max_eval_samples, "--warmup-steps": self.warmup_steps,
                  "--max-bad-steps": self.max_bad_steps}
        for flag, value in counts.items():
            _check_nonnegative(flag, value, "an integer")
        _check_nonnegative("--weight-decay", self.weight_decay)
        _check_nonnegative("--max-grad-norm", self.max_grad_norm, "a number (0 disables clipping)")
        above_zero = {"--lr": self.lr, "--epochs": self.epochs, "--alpha": self.alpha,
                      "--temperature": self.temperature, "--self-temperature": self.self_temperature,
                      "--self-top-p": self.self_top_p}
        for flag, value in above_zero.items():
            _check_above_zero(flag, value)
        _check_unit("--dropout", self.dropout, closed_high=False)
        _check_unit("--distill-alpha", self.distill_alpha, closed_high=True)
        _check_unit("--self-top-p", self.self_top_p, closed_high=True)

    def _check_names(self) -> None:
        from transformers.trainer_utils import SchedulerType

        schedulers = [s.value for s in SchedulerType]
        if self.scheduler not in schedulers:
            allowed = ", ".join(schedulers)
            raise ConfigError("--scheduler", f"unknown scheduler {self.scheduler!r}; choose from {allowed}")
        if self.merge not in MERGE_MODES:
            raise ConfigError("--merge", f"choose from {', '.join(MERGE_MODES)}; got {self.merge!r}")
        check_dtype(self.dtype)
        check_device(self.device)
        check_device(self.teacher_device, "--teacher-device")
        if self.teacher_dtype is not None and self.teacher_dtype not in DTYPES:
            allowed = ", ".join(DTYPES)
            raise ConfigError("--teacher-dtype", f"choose from {allowed}; got {self.teacher_dtype!r}")
        if self.distill is not None:
            names = [n.strip() for n in str(self.distill).split(",") if n.strip()]
            if not names or any(n not in DISTILL_LOSSES for n in names):
                allowed = ", ".join(DISTILL_LOSSES)
                raise ConfigError("--distill", f"choose from {allowed} (or both, comma separated), "
                                               f"got {self.distill!r}")
            self.distill = ",".join(dict.fromkeys(names))
        if not self.target_modules:
            raise ConfigError("--targets", "give module names separated by commas (q_proj,v_proj), "
                                           "or all-linear")
        if self.method != "lora" and (self.merge != "none" or self.mask_aware):
            flag = "--merge" if self.merge != "none" else "--mask-aware"
            raise ConfigError(flag, f"applies to --method lora only (--method {self.method} writes the "
                                    "healed weights themselves)")

    def _check_checkpoints(self) -> None:
        ckpt = checkpoint_dir_for(self.output)
        last = last_checkpoint(ckpt)
        if self.resume and last is None:
            raise ConfigError("--resume", f"no checkpoint to resume from in {ckpt}; run without --resume "
                                          "(and with --save-steps N to write checkpoints)")
        if not self.resume and last is not None and not self.overwrite:
            raise ConfigError("--resume", f"{ckpt} holds checkpoints of an earlier run; pass --resume to "
                                          "continue it or --overwrite to start over")
        if self.resume:
            self._check_same_recipe(ckpt / RECIPE_FILE)

    def _check_same_recipe(self, path: Path) -> None:
        """A resumed run must train what the interrupted one trained (output-only settings may differ)."""
        import json
        from dataclasses import asdict

        if not path.is_file():
            return
        before = json.loads(path.read_text())
        now = asdict(self)
        changed = sorted(k for k in now if k in before and k not in RESUMABLE_CHANGES and before[k] != now[k])
        if changed:
            listed = ", ".join(f"--{k.replace('_', '-')} ({before[k]!r} -> {now[k]!r})" for k in changed)
            raise ConfigError("--resume", f"the interrupted run used other settings: {listed}; resume with "
                                          "the same ones or pass --overwrite to start over")

    @property
    def target_modules(self) -> list[str] | str:
        """``--targets`` as PEFT takes it: ``"all-linear"`` or a list of module names."""
        if self.targets.strip() == "all-linear":
            return "all-linear"
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    @property
    def distill_losses(self) -> list[str]:
        """The names in ``--distill`` (empty when distillation is off)."""
        return self.distill.split(",") if self.distill else []

    @property
    def checkpoint_dir(self) -> Path:
        """Where training checkpoints go: ``<output>.ckpt/``."""
        return checkpoint_dir_for(self.output)


@dataclass
class MergeConfig:
    """Settings of ``sparseheal merge`` (see its ``--help``)."""

    adapter: str
    output: str
    mode: str = "masked"
    base: str | None = None
    eval_data: str = "wikitext2"
    eval_seqlen: int | None = None
    eval_windows: int = 4
    dtype: str | None = None
    device: str | None = None
    overwrite: bool = False
    data_dir: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not (Path(self.adapter).expanduser() / "adapter_config.json").is_file():
            raise ConfigError("ADAPTER_DIR", f"{self.adapter} is not a PEFT adapter directory "
                                             "(no adapter_config.json)")
        if self.mode not in MERGE_MODES[1:]:
            raise ConfigError("--mode", f"choose from {', '.join(MERGE_MODES[1:])}; got {self.mode!r}")
        if self.base is not None:
            _check_model_dir(self.base, "--base")
        _check_positive("--eval-seqlen", self.eval_seqlen)
        _check_nonnegative("--eval-windows", self.eval_windows, "an integer (0 skips the comparison)")
        check_dtype(self.dtype)
        check_device(self.device)
        check_output(self.output, self.overwrite)
        from sparseheal.records import read_record

        base = self.base or (read_record(self.adapter) or {}).get("base_path")
        check_pickle(base, self.allow_pickle)
        check_pickle(self.adapter, self.allow_pickle, "adapter_model")
        check_free_space(self.output, weights_bytes(base) if base else None, "the size of the base's weights")
