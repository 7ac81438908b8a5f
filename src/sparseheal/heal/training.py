"""The settings of an end-to-end heal (text, schedule, logging, checkpoints), apart from the Trainer set-up
in ``trainer.py``, so that declaring them (for the command line and recipes) loads no training code."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from sparseheal.checks import above_zero, non_negative, positive, window_length
from sparseheal.checks import seed as seed_check
from sparseheal.errors import ConfigError
from sparseheal.heal.base import format_rate
from sparseheal.registry import HEALERS
from sparseheal.settings import Settings, setting

__all__ = ["LOG_FILE", "TrainingSettings", "budget_steps", "budget_epochs"]

LOG_FILE = "train_log.jsonl"


def _default_help(what: str, key: str, show=str) -> Any:
    def text() -> str:
        per_method = ", ".join(f"{show(h.defaults[key])} for {name}" for name, h in HEALERS.items()
                               if key in h.defaults)
        return f"{what} (default {per_method})."

    return text


def _check_scheduler(flag: str, value: str | None) -> None:
    from transformers.trainer_utils import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    if value is not None and value not in schedulers:
        raise ConfigError(flag, f"unknown scheduler {value!r}; choose from {', '.join(schedulers)}")


@dataclass
class TrainingSettings(Settings):
    """Training text, schedule, logging and checkpoints of an end-to-end heal (the Trainer's settings)."""

    data: str = setting("c4", "training text: c4, wikitext2, ptb, a local file or directory, or self "
                              "(teacher-generated).")
    max_train_samples: int = setting(30000, "at most this many training blocks.", check=positive)
    max_eval_samples: int | None = setting(None, "blocks held out of the training text for the eval loss "
                                                 "(0: none; default 128, and no more than the training "
                                                 "blocks the run trains on).",
                                           check=non_negative("an integer"))
    block_size: int = setting(1024, "tokens per training block, at least 2.", check=window_length)
    max_steps: int | None = setting(None, "optimizer steps (overrides epochs).", check=positive)
    epochs: float = setting(1.0, "passes over the training blocks.", check=above_zero)
    budget_tokens: int | None = setting(None, "train on about this many tokens: sets --max-steps (tokens per "
                                              "step: block size x batch x accumulation) or block-wise's "
                                              "--epochs (its samples x seqlen per epoch).", check=positive)
    batch_size: int = setting(1, "blocks per device and step.", check=positive)
    gradient_accumulation: int = setting(1, "micro-batches per optimizer step.", check=positive)
    lr: float | None = setting(None, _default_help("peak learning rate", "lr", format_rate), check=above_zero)
    weight_decay: float = setting(0.0, "AdamW weight decay.", check=non_negative())
    scheduler: str | None = setting(None, _default_help("a transformers SchedulerType name", "scheduler"),
                                    check=_check_scheduler)
    warmup_steps: int = setting(0, "linear warm-up steps.", check=non_negative("an integer"))
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0 disables).",
                                   check=non_negative("a number (0 disables clipping)"))
    seed: int = setting(0, "seed of adapter initialisation, dropout and data order.", check=seed_check)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass to save "
                                                  "memory.")
    bf16: bool = setting(False, "bfloat16 mixed precision (autocast).")
    logging_steps: int = setting(10, "log the loss every N steps (to train_log.jsonl too).", check=positive,
                                 resumable=True)
    eval_steps: int | None = setting(None, "evaluate the held-out loss every N steps (default: only at the "
                                           "end).", check=positive, resumable=True)
    save_steps: int | None = setting(None, "write a checkpoint to OUTPUT.ckpt every N steps (kept for "
                                           "--resume).", check=positive, resumable=True)
    save_total_limit: int = setting(2, "checkpoints kept.", check=positive, resumable=True)
    resume: bool = setting(False, "continue an interrupted run from the last checkpoint in OUTPUT.ckpt.",
                           resumable=True)
    max_bad_steps: int = setting(10, "non-finite losses in a row tolerated (their updates dropped) before "
                                     "stopping.", check=non_negative("an integer"), resumable=True)

    def validate(self) -> None:
        if self.budget_tokens and (self.max_steps or self.epochs != 1.0):
            given = "--max-steps" if self.max_steps else "--epochs"
            raise ConfigError("--budget-tokens", f"sets the length of the heal itself; give it or {given}, "
                              "not both")

    def with_method_defaults(self, defaults: dict[str, Any]) -> TrainingSettings:
        """Fills ``lr`` and ``scheduler`` left unset with the healer's defaults."""
        if self.lr is None and "lr" in defaults:
            self.lr = defaults["lr"]
        if self.scheduler is None and "scheduler" in defaults:
            self.scheduler = defaults["scheduler"]
        return self

    @property
    def eval_limit(self) -> int:
        """Held-out blocks: ``--max-eval-samples`` when given, else 128 but never more blocks than the run
        trains on (a three-step heal is not evaluated on 128 blocks)."""
        return self.max_eval_samples if self.max_eval_samples is not None else min(128, self.block_limit)

    @property
    def block_limit(self) -> int:
        """Training blocks worth tokenizing: ``--max-train-samples``, or fewer when ``--max-steps`` x
        batch x accumulation needs fewer."""
        limit = self.max_train_samples
        if self.max_steps:
            limit = min(limit, self.max_steps * self.batch_size * self.gradient_accumulation)
        return limit


def budget_steps(budget: int, block_size: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps that train on at most ``budget`` tokens: budget // (block x batch x accumulation x
    processes); refused when not even one step fits."""
    per_step = block_size * batch_size * accumulation * int(os.environ.get("WORLD_SIZE", "1"))
    if budget < per_step:
        raise ConfigError("--budget-tokens", f"{budget} tokens are fewer than one step trains on "
                                             f"({per_step}: --block-size x --batch-size x "
                                             f"--gradient-accumulation); give at least {per_step}")
    return budget // per_step


def budget_epochs(budget: int, samples: int, seqlen: int, batch_size: int) -> float:
    """Block-wise epochs over ``samples`` training samples of ``seqlen`` tokens that train on ``budget``
    tokens per unit; refused when not even one batch fits."""
    if budget < batch_size * seqlen:
        raise ConfigError("--budget-tokens", f"{budget} tokens are fewer than one block-wise step trains on "
                                             f"({batch_size * seqlen}: --batch-size x the samples' "
                                             f"{seqlen} tokens); give at least {batch_size * seqlen}")
    return budget / (samples * seqlen)
