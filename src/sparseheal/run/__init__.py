"""Orchestration above the stages: a recipe run end to end (``run``) and its report (``report``).

This package imports the stage API (:mod:`sparseheal.api`); nothing below it imports this package.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparseheal.checks import check_not_an_input
from sparseheal.records import output_lock
from sparseheal.settings import REQUIRED, Settings, Stage, setting

__all__ = ["RUN", "REPORT", "run", "report"]


@dataclass
class RunSettings(Settings):
    config: str | None = setting(None, "YAML recipe with sections model, prune, heal, evaluate and output "
                                       "(keys are the flags).")
    output: str | None = setting(None, "the run directory (overrides the recipe's output); re-running "
                                       "resumes it.")
    model: str | None = setting(None, "the dense model (overrides the recipe's model).")
    prune: list[str] | None = setting(None, "a prune setting as KEY=VALUE, repeatable (e.g. --prune "
                                            "sparsity=0.6).")
    heal: list[str] | None = setting(None, "a heal setting as KEY=VALUE, repeatable (e.g. --heal "
                                           "max-steps=50); with named heal stages KEY=VALUE sets every "
                                           "stage and NAME.KEY=VALUE stage NAME only.")
    evaluate: list[str] | None = setting(None, "an evaluate setting as KEY=VALUE, repeatable (e.g. "
                                               "--evaluate tasks=boolq,piqa).")
    force: str | None = setting(None, "redo this stage (prune, heal, merge or evaluate: every unit of it; or "
                                      "heal-NAME, merge-NAME: one named heal stage) and every stage that "
                                      "uses its output.")


@dataclass
class ReportSettings(Settings):
    run_dir: str = setting(REQUIRED, "the output directory of sparseheal run.", positional=True)


RUN = Stage("run", [RunSettings])
REPORT = Stage("report", [ReportSettings])


@RUN.api()
def run(built: dict) -> dict:
    """Runs a recipe: prune, heal, merge (when asked), evaluate every model with one protocol, report,
    and regenerates each stage directory's model card with the evaluations of its model.

    Returns:
        The run record; "report" holds the report (its "path" is report.md).
    """
    from sparseheal.cards import write_run_cards
    from sparseheal.run.recipe import load_recipe, recipe_inputs, validate_recipe
    from sparseheal.run.report import write_report
    from sparseheal.run.runner import check_run_dir, run_recipe

    s = built[RunSettings]
    overrides = {"prune": s.prune, "heal": s.heal, "evaluate": s.evaluate}
    recipe = load_recipe(s.config, s.output, s.model, overrides)
    check_not_an_input(recipe.output, recipe_inputs(recipe))  # where it writes, then what it runs
    check_run_dir(recipe.output)
    validate_recipe(recipe)
    with output_lock(recipe.output):
        result = run_recipe(recipe, s.force, after=write_report)
        write_run_cards(recipe.output)
        return result


@REPORT.api()
def report(built: dict) -> dict:
    """Regenerates report.md, report.json and the PNG plots of a run directory from its records, and
    the model cards of its stage directories.

    Returns:
        The report ("path" is report.md).
    """
    from sparseheal.cards import write_run_cards
    from sparseheal.run.report import write_report

    run_dir = built[ReportSettings].run_dir
    with output_lock(run_dir, "RUN_DIR"):  # a run still writing it is not read half-way, nor written into
        result = write_report(run_dir)
        write_run_cards(run_dir)
    return result
