"""``heal --method auto --budget-tokens N``: the recipe that measured best at that budget, stage by stage.

A recipe is one or more heals run one after another, each reading the previous one's output: for example
block-wise reconstruction of every decoder layer against its dense twin on part of the budget, then full
fine-tuning under the mask on the rest. Which recipe a budget gets, and each stage's learning rate, come
from ``benchmarks/heal_recon.py`` on smollm2-135m (docs/healing.md has the table); the record of the heal
says which recipe ran, why, and each stage's share of the budget.

Intermediate outputs are hidden siblings of the output (``.NAME.<random>.partial``), removed when the
heal ends; only the last stage writes ``--output``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from sparseheal.errors import ConfigError
from sparseheal.heal.base import Healer
from sparseheal.registry import HEALERS

__all__ = ["AutoHealer", "Recipe", "Stage", "RECIPES", "choose_recipe"]

log = logging.getLogger(__name__)

BLOCKWISE_MAX_SAMPLES = 32  # block-wise calibration samples; a larger budget trains more epochs on them


@dataclass(frozen=True)
class Stage:
    """One heal of a recipe.

    Attributes:
        method: the healer (a registered name).
        share: its share of the budget's tokens.
        training: the shared training settings it sets (``lr``, ``scheduler``, ``warmup_steps``).
        options: the healer's own settings (block-wise: ``granularity``).
    """

    method: str
    share: float
    training: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A recipe and the budgets it is chosen for: up to ``up_to`` tokens (None: any budget above the
    previous recipe's), with the measurement that chose it."""

    name: str
    up_to: int | None
    stages: tuple[Stage, ...]
    why: str


_FULL = {"lr": 3e-4, "scheduler": "linear", "warmup_steps": 10}
_LAYER = {"granularity": "layer"}
RECIPES: tuple[Recipe, ...] = (
    Recipe("full", 50_000, (Stage("full", 1.0, _FULL),),
           "at 25K tokens on smollm2-135m (Wanda 50%), full fine-tuning closed 46.0% of the WikiText-2 gap, "
           "block-wise reconstruction 32.4% in 1.4x the wall time (benchmarks/heal_recon.py; "
           "docs/healing.md)"),
    Recipe("bw-layer+full", None,
           (Stage("blockwise", 0.5, {"lr": 1e-3, "scheduler": "cosine"}, _LAYER), Stage("full", 0.5, _FULL)),
           "at 100K tokens on smollm2-135m (Wanda 50%), block-wise reconstruction of each layer on half the "
           "budget, then full fine-tuning on the rest, closed 64.3% of the WikiText-2 gap, full alone 60.7% "
           "(benchmarks/heal_recon.py; docs/healing.md)"),
)


def choose_recipe(budget: int) -> Recipe:
    """The recipe for a budget of ``budget`` training tokens (the first whose ``up_to`` holds it)."""
    return next(r for r in RECIPES if r.up_to is None or budget <= r.up_to)


def stage_budgets(recipe: Recipe, budget: int) -> list[int]:
    """Each stage's tokens: its share of ``budget`` (the last stage takes what the others leave)."""
    tokens = [int(budget * stage.share) for stage in recipe.stages[:-1]]
    return tokens + [budget - sum(tokens)]


def _blockwise_samples(tokens: int, seqlen: int) -> int:
    """Calibration samples of a block-wise stage: one pass over fresh samples up to the cap, then epochs."""
    return max(1, min(tokens // seqlen, BLOCKWISE_MAX_SAMPLES))


@HEALERS.register("auto")
class AutoHealer(Healer):
    """Runs the recipe measured best at ``--budget-tokens`` (see the module docstring)."""

    uses = frozenset({"budget_tokens", "data", "block_size", "max_train_samples", "max_eval_samples", "seed",
                      "logging_steps", "gradient_checkpointing", "bf16", "max_bad_steps", "teacher"})
    unused_note = "sets each stage's length, learning rate and schedule from --budget-tokens"
    requires_sparsity = True
    trainer_based = False
    writes = "a model directory (the last stage's output)"
    recipe: Recipe

    def check_training(self, training: Any) -> None:
        """Refuses a heal without a budget, or a budget a stage cannot train one step on; keeps the
        recipe the budget chooses."""
        if not training.budget_tokens:
            raise ConfigError("--budget-tokens", "--method auto picks its recipe from the budget: give "
                                                 "--budget-tokens N (training tokens)")
        self.recipe = recipe = choose_recipe(training.budget_tokens)
        per_step = training.block_size * training.batch_size * training.gradient_accumulation
        for stage, tokens in zip(recipe.stages, stage_budgets(recipe, training.budget_tokens), strict=True):
            if tokens < per_step:
                raise ConfigError("--budget-tokens", f"{training.budget_tokens} tokens leave the "
                                                     f"{stage.method} stage of recipe {recipe.name} "
                                                     f"{tokens}, fewer than one step trains on "
                                                     f"({per_step}); give at least "
                                                     f"{int(per_step / stage.share) + 1}")

    def validate(self, skeleton: nn.Module) -> None:
        """Each stage's healer checks the model's structure."""
        for stage in self.recipe.stages:
            cls = HEALERS.get(stage.method)
            cls(cls.settings(**stage.options) if cls.settings else None).validate(skeleton)

    def run(self, job: Any) -> Path:
        """Runs the stages (each a whole heal) and adds the choice to the output's record."""
        from sparseheal.heal.pipeline import check_heal_model, run_heal  # the stages run through it

        recipe = self.recipe  # chosen when the heal was planned (check_training)
        budgets = stage_budgets(recipe, job.training.budget_tokens)
        jobs, made = [], []  # made: the stage outputs (hidden siblings), removed however the heal ends
        try:
            for number, (stage, tokens) in enumerate(zip(recipe.stages, budgets, strict=True)):
                jobs.append(_stage_job(job, stage, tokens, last=number == len(budgets) - 1))
                made += [jobs[-1].output] if jobs[-1].output != job.output else []
                check_heal_model(job.pruned_dir, jobs[-1])  # every stage's checks before any training
            log.info("auto: %s for %d tokens (%s)", recipe.name, job.training.budget_tokens, recipe.why)
            source = job.pruned_dir
            for stage_job in jobs:
                stage_job.pruned_dir = source
                run_heal(stage_job)
                source = _model_of(stage_job.output)
        finally:
            for path in made:
                shutil.rmtree(path, ignore_errors=True)
        _record_choice(job, recipe, budgets, jobs)
        return Path(job.output)


def _stage_job(job: Any, stage: Stage, tokens: int, last: bool) -> Any:
    """The heal of one stage: its healer and settings, ``tokens`` to train on, its own output."""
    from sparseheal.heal.pipeline import settle_training
    from sparseheal.records import temporary_sibling

    cls = HEALERS.get(stage.method)
    options = dict(stage.options)
    if cls.settings is not None and "nsamples" in {f.name for f in dataclasses.fields(cls.settings)}:
        options.update(nsamples=_blockwise_samples(tokens, job.training.block_size),
                       seqlen=job.training.block_size)
    healer = cls(cls.settings(**options) if cls.settings else None)
    training = dataclasses.replace(job.training, budget_tokens=tokens, max_steps=None, epochs=1.0,
                                   **stage.training)
    training = settle_training(training, cls)
    output = job.output if last else str(temporary_sibling(job.output, directory=True))
    recipe = {**job.recipe, "method": stage.method, **dataclasses.asdict(training), **options}
    return dataclasses.replace(job, output=output, overwrite=job.overwrite or not last, healer=healer,
                               training=training, merge="none", recipe=recipe)


def _model_of(output: str) -> str:
    """The model a stage's output holds (an adapter heal's merged copy)."""
    merged = Path(output) / "merged"
    return str(merged) if merged.is_dir() else output


def _record_choice(job: Any, recipe: Recipe, budgets: list[int], jobs: list[Any]) -> None:
    """Adds what ``auto`` chose, and why, to the output's record (written atomically)."""
    from sparseheal.records import read_record, write_record

    record = read_record(job.output) or {}
    stages = [{"method": stage.method, "tokens": tokens, "lr": stage_job.training.lr,
               "scheduler": stage_job.training.scheduler, **stage.options}
              for stage, tokens, stage_job in zip(recipe.stages, budgets, jobs, strict=True)]
    record["auto"] = {"budget_tokens": job.training.budget_tokens, "recipe": recipe.name, "why": recipe.why,
                      "pruned_from": job.pruned_dir, "stages": stages,
                      "removed": [j.output for j in jobs[:-1]]}  # earlier stages' outputs ("previous")
    if len(jobs) > 1 and "base_model" in record:  # the last stage read a stage output now removed
        record["base_model"] = job.pruned_dir
    write_record(job.output, record)
