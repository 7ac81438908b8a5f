"""The units of a run and which of them to do: planned from the recipe, compared with the run record.

Each unit is one stage output (``pruned/``, ``healed[-NAME]/``, ``merged[-NAME]/``) or one evaluation file
(``eval/NAME.json``), with the settings it runs with and the units whose output it reads. A unit is
finished when its output exists and the settings recorded for it equal the recipe's; a finished unit is
skipped, a changed one is an error naming the setting, and a unit whose input is redone is redone too.
``--force STAGE`` redoes every unit of that stage (``--force heal`` every heal stage); ``--force
heal-NAME`` or ``merge-NAME`` redoes one stage of a recipe with named heal stages. Either way the units
downstream follow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparseheal.errors import ConfigError
from sparseheal.heal.checkpoints import checkpoint_dir_for, last_checkpoint
from sparseheal.records import read_record
from sparseheal.run.heals import HealItem
from sparseheal.run.recipe import Recipe, section_defaults

__all__ = ["STAGES", "Unit", "plan_units", "decide", "filled"]

STAGES = ("prune", "heal", "merge", "evaluate")


@dataclass
class Unit:
    """One piece of work: a stage output (pruned/, healed/, merged/) or one evaluation file.

    ``source`` is the directory it reads besides its settings: a heal's input model, a merge's adapter,
    and for the evaluation of a healed model the base its adapter applies to. ``extra`` holds arguments
    passed to the stage that are not compared when the unit is resumed. ``label`` is where its settings
    live in the recipe (``heal`` or ``heal[1]``), for errors.
    """

    name: str  # prune, heal, merge, eval-dense, eval-pruned, ... (heal-NAME, merge-NAME, eval-healed-NAME)
    stage: str  # one of STAGES
    path: Path
    settings: dict[str, Any]
    deps: tuple[str, ...] = ()
    source: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    todo: bool = False
    resume: bool = False
    reason: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def filled(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """The recipe section with every default filled in, so omitting a key equals giving its default."""
    return {**section_defaults(section), **values}


def _heal_units(recipe: Recipe) -> tuple[list[Unit], list[tuple[str, str, Path | None]]]:
    """The heal and merge units of every heal stage, and (model, unit, adapter base) per evaluation."""
    run = recipe.output
    units: list[Unit] = []
    evals: list[tuple[str, str, Path | None]] = []
    outputs: dict[str, tuple[str, Path]] = {}  # stage name -> (unit, model directory) a later stage heals
    for item in recipe.heals:
        source_unit, source = outputs[item.source] if item.source else ("prune", run / "pruned")
        heal = Unit(f"heal{item.suffix}", "heal", run / f"healed{item.suffix}", _heal_settings(item, recipe),
                    deps=(source_unit,), source=source, label=item.label)
        units.append(heal)
        evals.append((f"healed{item.suffix}", heal.name, source))
        outputs[item.name or ""] = (heal.name, heal.path)
        if item.merge_mode != "none":
            extra = {"dtype": item.settings.get("dtype"), "device": item.settings.get("device")}
            merge = Unit(f"merge{item.suffix}", "merge", run / f"merged{item.suffix}",
                         {"mode": item.merge_mode}, deps=(heal.name,), source=heal.path, extra=extra,
                         label=item.label)
            units.append(merge)
            evals.append((f"merged{item.suffix}", merge.name, None))
            outputs[item.name or ""] = (merge.name, merge.path)  # an adapter is healed further merged
    return units, evals


def _heal_settings(item: HealItem, recipe: Recipe) -> dict[str, Any]:
    """A heal stage's settings. A named stage records its ``from``; one that heals another stage's
    output learns from the run's dense model unless it names a teacher (the directory it heals names
    the pruned model as its base)."""
    settings = {k: v for k, v in filled("heal", item.settings).items() if k != "merge"}
    if item.name is not None:
        settings["from"] = item.source
    if item.source is not None and settings.get("teacher") is None:
        settings["teacher"] = recipe.model
    return settings


def plan_units(recipe: Recipe) -> list[Unit]:
    """The units of a recipe in execution order, each with the settings it runs with."""
    run = recipe.output
    ev = filled("evaluate", recipe.evaluate)
    prune = Unit("prune", "prune", run / "pruned", {"model": recipe.model, **filled("prune", recipe.prune)})
    heals, healed = _heal_units(recipe)
    units = [prune, *heals]
    for model, dep, base in [("dense", None, None), ("pruned", "prune", None), *healed]:
        target = recipe.model if model == "dense" else model
        units.append(Unit(f"eval-{model}", "evaluate", run / "eval" / f"{model}.json",
                          {"target": target, **ev}, deps=(dep,) if dep else (), source=base))
    return units


def _recorded_settings(unit: Unit, run_record: dict) -> dict | None:
    """The settings a finished unit ran with, or None when it is not finished."""
    entry = run_record.get("stages", {}).get(unit.name, {})
    if unit.stage == "evaluate":
        if not unit.path.is_file() or entry.get("status", "done") != "done":  # pending: its input was redone
            return None
        try:
            return json.loads(unit.path.read_text()).get("settings")
        except json.JSONDecodeError:
            return None
    if read_record(unit.path) is None or entry.get("status") != "done":
        return None
    return entry.get("settings")


def _difference(wanted: dict, recorded: dict, defaults: dict) -> tuple[str, Any, Any] | None:
    """The first setting that differs. A flag added since the stage ran counts as unchanged while it
    keeps its default; a flag that no longer exists is ignored."""
    for key in sorted(wanted):
        if key not in recorded and key in defaults and wanted[key] == defaults[key]:
            continue
        if wanted[key] != recorded.get(key):
            return key, recorded.get(key), wanted[key]
    return None


def _check_unchanged(unit: Unit, recorded: dict) -> None:
    defaults = section_defaults(unit.stage) if unit.stage != "merge" else {}
    diff = _difference(unit.settings, recorded, defaults)
    if diff is None:
        return
    key, old, new = diff
    section = unit.label or unit.stage
    key = "merge" if unit.stage == "merge" else key
    name = "model" if key in ("model", "target") else f"{section}.{key}"
    redo = unit.stage if unit.stage in ("prune", "evaluate") else unit.name
    raise ConfigError(name.replace("_", "-"),
                      f"the finished {unit.name} stage in {unit.path} ran with {old!r}, the recipe now says "
                      f"{new!r}; pass --force {redo} to redo it (and the stages that use its output), or use "
                      "another --output")


def _check_force(units: list[Unit], force: str | None) -> None:
    if force is None:
        return
    own = [u.name for u in units if u.stage in ("heal", "merge") and u.name not in STAGES]
    if force not in STAGES and force not in own:
        also = f", or one heal stage's own: {', '.join(own)}" if own else ""
        raise ConfigError("--force", f"choose a stage from {', '.join(STAGES)}{also}; got {force!r}")
    if not any(force in (u.stage, u.name) for u in units):
        raise ConfigError("--force", f"this recipe has no {force} stage (merge runs when heal.merge is "
                                     "masked or dense)")


def decide(units: list[Unit], run_record: dict, force: str | None) -> None:
    """Marks each unit todo or skipped; raises before any work when a finished stage's settings changed.

    ``force`` is a stage (every unit of it is redone) or the name of one heal or merge unit.
    """
    _check_force(units, force)
    todo = set()
    for unit in units:
        recorded = _recorded_settings(unit, run_record)
        if force in (unit.stage, unit.name):
            unit.todo, unit.reason = True, f"--force {force}"
        elif recorded is None:
            unit.todo, unit.reason = True, "not finished"
        elif any(d in todo for d in unit.deps):
            unit.todo, unit.reason = True, "its input is redone"
        else:
            _check_unchanged(unit, recorded)
        if unit.todo:
            todo.add(unit.name)
    _plan_resume(units, run_record)


def _plan_resume(units: list[Unit], run_record: dict) -> None:
    """An unfinished heal with checkpoints, started with the same settings on the same input, resumes."""
    by_name = {u.name: u for u in units}
    for heal in (u for u in units if u.stage == "heal"):
        last = last_checkpoint(checkpoint_dir_for(heal.path))
        entry = run_record.get("stages", {}).get(heal.name, {})
        input_redone = any(by_name[d].todo for d in heal.deps)
        heal.resume = bool(
            heal.todo and last and heal.reason == "not finished" and not input_redone
            and entry.get("status") == "running" and entry.get("settings") == heal.settings
        )
        if heal.resume:
            heal.reason = f"resuming from {Path(last).name}"
