"""The evaluator contract: what the evaluate stage, the CLI, model cards and run reports ask of an
evaluation.

An evaluation is one file: an :class:`Evaluator` subclass registered with ``@EVALUATORS.register(name)``
and its :class:`~sparseheal.settings.Settings` group (named by ``settings``). From those two the evaluate
stage's signature, command line and recipe keys take the group; the stage runs every evaluator whose
settings ask for work (:meth:`Evaluator.wanted`), after the model loads once; its result is stored in the
evaluate report under ``key``, printed by :meth:`Evaluator.lines`, shown in model cards by
:meth:`Evaluator.card_lines` and in run reports (a table, its markdown and a plot) by
:meth:`Evaluator.table`, :meth:`Evaluator.table_lines` and :meth:`Evaluator.plot`.

The life of one evaluation::

    ev = Evaluator(options, data_dir)          # its settings group, built and checked
    ev.check(model)                            # preflight: its files and the model's config
    ev.prepare(model, stack)                   # before the weights load: tokenize, fetch tasks
    result = ev.run(lm, tokenizer, batch_size) # JSON-able; report[ev.key] = result
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from sparseheal.checks import positive
from sparseheal.registry import EVALUATORS
from sparseheal.settings import Settings, setting

__all__ = ["EvaluationSettings", "Evaluator", "EVALUATORS", "evaluators", "evaluator_groups"]


@dataclass
class EvaluationSettings(Settings):
    """What every evaluation shares."""

    batch_size: int = setting(1, "windows (or zero-shot requests) per forward pass.", check=positive)


class Evaluator:
    """One evaluation. Subclasses set ``settings``, ``key`` and ``title`` and implement ``wanted`` and
    ``run``; the other methods have defaults that fit an evaluation reading no files.

    Args:
        options: the built ``settings`` group.
        data_dir: where named data sets live (``--data-dir``), or None.
    """

    name: ClassVar[str]  # set by the registration
    settings: ClassVar[type[Settings]]
    key: ClassVar[str]  # where its result sits in the evaluate report (and in a run report's JSON)
    title: ClassVar[str]  # its heading in a model card and a run report
    caption: ClassVar[str]  # its plot's caption in a run report ("zero-shot accuracy")

    def __init__(self, options: Settings, data_dir: str | None = None) -> None:
        self.options = options
        self.data_dir = data_dir

    def wanted(self) -> bool:
        """Whether the settings ask for this evaluation (``--tasks`` given, ``--dataset`` not none)."""
        raise NotImplementedError

    def inputs(self) -> list[tuple[str, str]]:
        """(flag, path) of every file it reads, which no output may replace."""
        return []

    def check(self, model: str | None) -> None:
        """Preflight checks that read its files and (when ``model`` is given) the model's config."""

    def prepare(self, model: str, stack: contextlib.ExitStack) -> None:
        """Work done before the weights load (tokenizing, resolving tasks); may enter contexts on
        ``stack``, which stays open until the evaluation has run."""

    def run(self, lm: nn.Module, tokenizer: Any, batch_size: int) -> Any:
        """Evaluates the loaded model; returns a JSON-able result."""
        raise NotImplementedError

    @classmethod
    def lines(cls, result: Any) -> list[str]:
        """The command line's output for one result."""
        return [f"{cls.title}: {result}"]

    @classmethod
    def card_lines(cls, results: dict[str, Any]) -> list[str]:
        """A model card's markdown for the results of several models (label -> result)."""
        return [f"{cls.title}:", "", *cls.table_lines(cls.table(results))]

    @classmethod
    def table(cls, results: dict[str, Any]) -> dict:
        """A run report's table from the results of each evaluated model (model -> result)."""
        return dict(results)

    @classmethod
    def table_lines(cls, table: dict) -> list[str]:
        """The table as markdown."""
        lines = ["| model | result |", "|---|---|"]
        return lines + [f"| `{model}` | {value} |" for model, value in table.items()]

    @classmethod
    def plot(cls, table: dict, path: Path, title: str) -> Path | None:
        """Draws the table into ``path`` (a PNG); returns it, or None when there is nothing to draw."""
        return None


def evaluators() -> list[type[Evaluator]]:
    """The registered evaluators, in name order."""
    return [impl for _, impl in EVALUATORS.items()]


def evaluator_groups() -> list[type[Settings]]:
    """The settings groups of the registered evaluators, each once."""
    return list(dict.fromkeys(impl.settings for impl in evaluators()))
