"""A generation-quality check as a sparseheal evaluation: greedy continuations of a few prompts, scored
by distinct-2 (the share of distinct token bigrams among the generated ones; a model that repeats
itself scores low). Li et al., "A Diversity-Promoting Objective Function for Neural Conversation Models",
https://arxiv.org/abs/1510.03055.

In the package this is ``evaluate/generation.py`` plus ``generation`` in the import of
``evaluate/__init__.py``. From a package of your own, name the module under the entry-point group
``sparseheal.evaluations`` (in its pyproject.toml: ``[project.entry-points."sparseheal.evaluations"]``
``generation = "generation_check"``); once it is installed::

    sparseheal evaluate MODEL --dataset none --generation-prompts "The city|In 1990"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseheal.charts import grouped_bars, models_of, pyplot, save
from sparseheal.checks import positive
from sparseheal.evaluate.base import Evaluator
from sparseheal.registry import EVALUATORS
from sparseheal.settings import Settings, setting

__all__ = ["GenerationSettings", "GenerationEvaluator", "distinct_2"]


def distinct_2(tokens: list[int]) -> float:
    """distinct-2 = |set of bigrams| / |bigrams| (1.0 when fewer than two tokens)."""
    bigrams = list(zip(tokens, tokens[1:], strict=False))
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0


@dataclass
class GenerationSettings(Settings):
    """Which prompts the generation check continues, and how far."""

    generation_prompts: str | None = setting(None, "generation check: prompts separated by '|' (none given: "
                                                   "no check).")
    generation_tokens: int = setting(32, "generation check: tokens generated per prompt.", check=positive)


@EVALUATORS.register("generation")
class GenerationEvaluator(Evaluator):
    """distinct-2 of each prompt's greedy continuation; a result is {prompt: {"distinct_2", "tokens"}}."""

    settings = GenerationSettings
    key = "generation"
    title = "Generation (distinct-2 of greedy continuations, higher is more varied)"
    caption = "generation distinct-2"

    def wanted(self) -> bool:
        return bool(self.options.generation_prompts)

    @torch.no_grad()
    def run(self, lm, tokenizer, batch_size: int) -> dict[str, dict]:
        result = {}
        device = next(lm.parameters()).device
        for prompt in self.options.generation_prompts.split("|"):
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)  # (1, T)
            out = lm.generate(ids, max_new_tokens=self.options.generation_tokens, do_sample=False,
                              pad_token_id=tokenizer.eos_token_id)  # (1, T + new)
            new = out[0, ids.shape[1]:].tolist()
            result[prompt] = {"distinct_2": distinct_2(new), "tokens": len(new)}
        return result

    @classmethod
    def lines(cls, result: dict[str, dict]) -> list[str]:
        head = ["", f"{'generation prompt':<32} {'tokens':>6} {'distinct-2':>10}"]
        return head + [f"{prompt[:32]:<32} {row['tokens']:>6} {row['distinct_2']:>10.3f}"
                       for prompt, row in result.items()]

    @classmethod
    def table(cls, results: dict[str, dict]) -> dict:
        """{prompt: {MODEL: distinct-2}}."""
        table: dict[str, dict] = {}
        for model, result in results.items():
            for prompt, row in result.items():
                table.setdefault(prompt, {})[model] = row["distinct_2"]
        return table

    @classmethod
    def table_lines(cls, table: dict) -> list[str]:
        models = models_of(table)
        lines = ["| prompt | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
        return lines + [f"| {prompt} | " + " | ".join(f"{row[m]:.3f}" if m in row else "–" for m in models)
                        + " |" for prompt, row in table.items()]

    @classmethod
    def plot(cls, table: dict, path, title: str):
        if not table:
            return None
        series = {m: [table[p].get(m) for p in table] for m in models_of(table)}
        fig, ax = pyplot().subplots(figsize=(max(6, 2.5 * len(table) + 3), 4))
        grouped_bars(ax, list(table), series, "{:.2f}")
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("distinct-2")
        ax.set_title(title)
        return save(fig, path)
