"""Settings of ``sparseheal heal`` and ``sparseheal merge``; ``__post_init__`` validates and names the flag.

Like every stage's settings (``sparseheal.config``), the checks run before any model loads or any file
is written. Training checkpoints of an output live in the sibling ``<output>.ckpt/``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sparseheal.config import (
    DTYPES,
    ConfigError,
    check_above_zero,
    check_device,
    check_dtype,
    check_free_space,
    check_model_dir,
    check_nonnegative,
    check_output,
    check_pickle,
    check_positive,
    check_unit,
    weights_bytes,
)

__all__ = [
    "HealConfig",
    "MergeConfig",
    "MERGE_MODES",
    "DISTILL_LOSSES",
    "RECIPE_FILE",
    "RESUMABLE_CHANGES",
    "checkpoint_dir_for",
    "last_checkpoint",
    "heal_bytes",
]

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


def heal_bytes(method: str, weights: int | None, save_steps: int | None, save_total_limit: int,
               merge: str) -> tuple[int, str]:
    """Estimated bytes a heal writes (output plus checkpoints) from the pruned weights' size, and how."""
    weights = weights or 0
    if method == "lora":  # adapters are small; a merged copy is a whole model
        return (weights, "a merged copy of the model") if merge != "none" else (0, "the adapter")
    kept = save_total_limit if save_steps else 0  # a checkpoint: weights + two AdamW moments
    return weights * (1 + 3 * kept), f"the model's weights, plus {kept} checkpoints of 3x that"


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
    self_batch_size: int = 64
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
        check_model_dir(self.pruned_dir, "PRUNED_DIR")
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
            "--self-batch-size": self.self_batch_size,
        }
        for flag, value in positive.items():
            check_positive(flag, value)
        counts = {"--max-eval-samples": self.max_eval_samples, "--warmup-steps": self.warmup_steps,
                  "--max-bad-steps": self.max_bad_steps}
        for flag, value in counts.items():
            check_nonnegative(flag, value, "an integer")
        check_nonnegative("--weight-decay", self.weight_decay)
        check_nonnegative("--max-grad-norm", self.max_grad_norm, "a number (0 disables clipping)")
        above_zero = {"--lr": self.lr, "--epochs": self.epochs, "--alpha": self.alpha,
                      "--temperature": self.temperature, "--self-temperature": self.self_temperature,
                      "--self-top-p": self.self_top_p}
        for flag, value in above_zero.items():
            check_above_zero(flag, value)
        check_unit("--dropout", self.dropout, closed_high=False)
        check_unit("--distill-alpha", self.distill_alpha, closed_high=True)
        check_unit("--self-top-p", self.self_top_p, closed_high=True)

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
            check_model_dir(self.base, "--base")
        check_positive("--eval-seqlen", self.eval_seqlen)
        check_nonnegative("--eval-windows", self.eval_windows, "an integer (0 skips the comparison)")
        check_dtype(self.dtype)
        check_device(self.device)
        check_output(self.output, self.overwrite)
        from sparseheal.records import read_record

        base = self.base or (read_record(self.adapter) or {}).get("base_path")
        check_pickle(base, self.allow_pickle)
        check_pickle(self.adapter, self.allow_pickle, "adapter_model")
        check_free_space(self.output, weights_bytes(base) if base else None, "the size of the base's weights")
