"""The one Hugging Face Trainer set-up that every healer shares, and its settings.

Data: fixed-length token blocks (run_clm style, see ``data.training_blocks``) served as
``{"input_ids", "labels"}``; the model shifts the labels itself. Schedule, clipping, mixed precision,
gradient checkpointing, logging, evaluation, checkpoints and ``--resume`` are the Trainer's own; this
module only maps :class:`TrainingSettings` onto ``TrainingArguments`` and adds

- an optional distillation loss (:class:`HealTrainer.compute_loss`), whose parts are logged separately;
- a guard that drops the update of a step whose loss is not finite and stops after ``--max-bad-steps``
  such steps in a row;
- a JSON-lines loss log (``train_log.jsonl``) that survives an interruption and a resume.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from sparseheal.errors import StageError
from sparseheal.heal.checkpoints import RECIPE_FILE, resume_point, tokens_at
from sparseheal.heal.training import LOG_FILE, TrainingSettings
from sparseheal.records import peak_rss_mb

__all__ = [
    "BlockDataset",
    "JsonlLogCallback",
    "HealTrainer",
    "training_arguments",
    "train",
]

log = logging.getLogger(__name__)


class BlockDataset(torch.utils.data.Dataset):
    """Serves the rows of a (N, T) block tensor as causal-LM examples (labels = inputs)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks  # (N, T)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.blocks[index]  # (T,)
        return {"input_ids": row, "labels": row}


class JsonlLogCallback(TrainerCallback):
    """Appends every Trainer log entry (with its step) as one JSON line to ``path``.

    On a resumed run the lines written after the restored step (by the interrupted run) are dropped
    first, so the file reads as one uninterrupted run. In a distributed run only the first process
    writes (every rank logs the same averaged entries).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if _logged_step(line) is not None and _logged_step(line) <= state.global_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        entry = {"step": state.global_step, "epoch": state.epoch, **(logs or {})}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")


def _logged_step(line: str) -> int | None:
    """The step of a log line; None for a blank line or one cut short by a kill."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


class HealTrainer(Trainer):
    """``transformers.Trainer`` with an optional distillation loss and a non-finite-loss guard.

    The loss returned by :meth:`compute_loss` is a per-batch mean; the Trainer divides it by the
    number of accumulation steps (blocks have a fixed length, so this equals the token-weighted mean).

    Args:
        distiller: called as ``distiller(student_outputs, inputs, lm_loss) -> (loss, parts)``; ``parts``
            (floats by name) are averaged over each logging window and logged beside ``loss``.
        max_bad_steps: consecutive non-finite losses tolerated (their updates are dropped) before
            training stops with an error.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, max_bad_steps: int, distiller: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.distiller = distiller
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0
        self._bad_in_a_row = 0
        self._parts: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        if self.distiller is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        outputs = model(**inputs, output_hidden_states=bool(self.distiller.needs_hidden_states))
        loss, parts = self.distiller(outputs, inputs, outputs.loss)
        split = self._parts["train" if model.training else "eval"]
        for name, value in parts.items():
            split.setdefault(name, []).append(float(value))
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if bool(torch.isfinite(loss)):
            self._bad_in_a_row = 0
            return loss
        self.bad_steps += 1
        self._bad_in_a_row += 1
        for param in model.parameters():
            param.grad = None  # drop this update (and the accumulated part of this step)
        log.warning("step %d: loss is %s; its update is dropped (%d in a row)", self.state.global_step,
                    loss.item(), self._bad_in_a_row)
        if self._bad_in_a_row > self.max_bad_steps:
            raise StageError("--max-bad-steps", f"training diverged: {self._bad_in_a_row} steps in a row "
                             f"had a non-finite loss (--max-bad-steps {self.max_bad_steps}); nothing was "
                             "written: lower --lr or use float32")
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split, prefix = ("eval", "eval_") if "eval_loss" in logs else ("train", "")
        if split == "eval" or "loss" in logs:
            for name, values in self._parts[split].items():
                if values:
                    logs[f"{prefix}{name}"] = round(sum(values) / len(values), 6)
            self._parts[split] = {}
        super().log(logs, start_time)


def training_arguments(cfg: TrainingSettings, device: str | None, checkpoint_dir: Path,
                       has_eval: bool) -> TrainingArguments:
    """Maps the training settings onto ``TrainingArguments`` (checkpoints go to ``checkpoint_dir``)."""
    on_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    eval_every = cfg.eval_steps if has_eval else None
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        prediction_loss_only=True,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        include_num_input_tokens_seen="all",
        remove_unused_columns=False,
        dataloader_pin_memory=not on_cpu,
        use_cpu=on_cpu,
        report_to="none",
    )


def _peak_device_mb() -> float | None:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _summary(trainer: HealTrainer, output, eval_metrics: dict, seconds: tuple[float, float],
             start_tokens: int) -> dict:
    history = trainer.state.log_history
    logged = [h["loss"] for h in history if "loss" in h]
    tokens = int(trainer.state.num_input_tokens_seen)
    return {
        "train_loss": output.training_loss,
        "final_loss": logged[-1] if logged else None,
        "first_loss": logged[0] if logged else None,
        "eval_loss": eval_metrics.get("eval_loss"),
        "eval_ppl": math.exp(eval_metrics["eval_loss"]) if "eval_loss" in eval_metrics else None,
        "steps": int(trainer.state.global_step),
        "tokens_seen": tokens,
        "train_seconds": round(seconds[0], 3),
        "train_cpu_seconds": round(seconds[1], 3),
        "tokens_per_second": round((tokens - start_tokens) / seconds[0], 1) if seconds[0] > 0 else 0.0,
        "bad_steps": trainer.bad_steps,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_device_mb": _peak_device_mb(),
        "log_history": history,
    }


def train(
    model: nn.Module,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor | None,
    cfg: TrainingSettings,
    device: str | None,
    checkpoint_dir: Path,
    distiller: Any = None,
    callbacks: list | None = None,
    recipe: dict | None = None,
) -> dict:
    """Trains ``model`` on (N, T) ``train_blocks`` with the HF Trainer and returns a summary.

    Checkpoints (``--save-steps``) and ``train_log.jsonl`` go to ``checkpoint_dir``; with ``cfg.resume``
    training continues from its last checkpoint (optimizer, scheduler, RNG and data position restored).
    ``recipe`` (every setting of the heal) is written beside the checkpoints of a fresh start, for a
    later ``--resume`` to be checked against.

    Returns:
        {"train_loss", "final_loss", "eval_loss", "steps", "tokens_seen", "train_seconds",
        "tokens_per_second", "peak_rss_mb", "log_history", ...}
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not cfg.resume:  # a fresh start (--overwrite): no checkpoint or log of an earlier run may remain
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:  # what a later --resume is checked against
        (checkpoint_dir / RECIPE_FILE).write_text(json.dumps(recipe or {}, indent=2) + "\n")
    has_eval = eval_blocks is not None and len(eval_blocks) > 0
    trainer = HealTrainer(
        model=model,
        args=training_arguments(cfg, device, checkpoint_dir, has_eval),
        data_collator=default_data_collator,
        train_dataset=BlockDataset(train_blocks),
        eval_dataset=BlockDataset(eval_blocks) if has_eval else None,
        callbacks=[JsonlLogCallback(checkpoint_dir / LOG_FILE), *(callbacks or [])],
        distiller=distiller,
        max_bad_steps=cfg.max_bad_steps,
    )
    start_tokens, last = 0, None
    if cfg.resume:
        last = resume_point(checkpoint_dir)
        start_tokens = tokens_at(last)
    gc.collect()
    gc.freeze()  # what exists now (text, tokens, model objects) is not scanned by the loop's collections
    try:
        start, start_cpu = time.perf_counter(), time.process_time()
        output = trainer.train(resume_from_checkpoint=str(last) if last is not None else None)
        seconds = (time.perf_counter() - start, time.process_time() - start_cpu)  # wall, CPU of all threads
    finally:
        gc.unfreeze()
    eval_metrics = trainer.evaluate() if has_eval else {}
    summary = _summary(trainer, output, eval_metrics, seconds, start_tokens)
    resumed_at = int(last.name.split("-")[1]) if last is not None else 0
    summary["steps_run"] = trainer.state.global_step - resumed_at
    log.info("trained %d steps (%d tokens, %.1f tokens/s): loss %.4f -> %.4f%s", summary["steps"],
             summary["tokens_seen"], summary["tokens_per_second"], summary["first_loss"] or float("nan"),
             summary["final_loss"] or float("nan"),
             f", eval loss {summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "")
    return summary
