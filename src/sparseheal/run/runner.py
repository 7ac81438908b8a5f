"""``sparseheal run``: the stages of a recipe in order, each resumable, then the report.

Layout of a run directory::

    RUN_DIR/sparseheal.json   the run record: recipe, per-stage settings, status, time and memory
    RUN_DIR/recipe.yaml       the effective recipe (file + flags)
    RUN_DIR/pruned/           prune (model + masks + record)
    RUN_DIR/healed/           heal (adapter or model + train_log.jsonl + record); healed.ckpt/ while training
    RUN_DIR/merged/           merge, when heal.merge is masked or dense
    RUN_DIR/eval/NAME.json    evaluate for dense, pruned, healed (and merged), one protocol for all
    RUN_DIR/report.md, report.json, *.png

A stage is finished when its output exists (outputs are written atomically) and the settings it ran
with, kept in the run record, equal the recipe's; a finished stage is skipped, a changed one is an
error naming the setting, and ``--force STAGE`` redoes it. A stage whose input is redone is redone
too, so forcing a stage redoes everything downstream of it (``--force prune`` redoes all but the
dense evaluation; ``--force evaluate`` redoes every evaluation). An interrupted heal continues from
its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparseheal import api
from sparseheal.checks import check_free_space
from sparseheal.errors import ConfigError
from sparseheal.heal.checkpoints import checkpoint_dir_for, last_checkpoint
from sparseheal.models import weights_bytes
from sparseheal.records import RECORD_FILE, read_record, versions, write_json_atomic
from sparseheal.registry import HEALERS
from sparseheal.run.recipe import Recipe, check_run_links, section_defaults

__all__ = ["STAGES", "Unit", "plan_units", "decide", "check_run_dir", "run_recipe", "MemorySampler"]

log = logging.getLogger(__name__)

STAGES = ("prune", "heal", "merge", "evaluate")


@dataclass
class Unit:
    """One piece of work: a stage output (pruned/, healed/, merged/) or one evaluation file."""

    name: str  # prune, heal, merge, eval-dense, eval-pruned, ...
    stage: str  # one of STAGES
    path: Path
    settings: dict[str, Any]
    deps: tuple[str, ...] = ()
    todo: bool = False
    resume: bool = False
    reason: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


class MemorySampler:
    """Peak resident memory (MiB) of this process while a block runs, sampled every 50 ms (psutil),
    the peak CUDA memory allocated in that block when CUDA is in use, and the CPU seconds it used."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak_mb = 0.0
        self.peak_gpu_mb: float | None = None
        self.cpu_seconds = 0.0

    def _cpu(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / 2**20)
            self._stop.wait(self._interval)

    def __enter__(self) -> MemorySampler:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self._cpu_start = self._cpu()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        self._stop.set()
        self._thread.join()
        self.peak_mb = round(max(self.peak_mb, self._process.memory_info().rss / 2**20), 1)
        self.cpu_seconds = round(self._cpu() - self._cpu_start, 1)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.peak_gpu_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _filled(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """The recipe section with every default filled in, so omitting a key equals giving its default."""
    return {**section_defaults(section), **values}


def plan_units(recipe: Recipe) -> list[Unit]:
    """The units of a recipe in execution order, each with the settings it runs with."""
    run = recipe.output
    heal = _filled("heal", recipe.heal)
    ev = _filled("evaluate", recipe.evaluate)
    units = [
        Unit("prune", "prune", run / "pruned", {"model": recipe.model, **_filled("prune", recipe.prune)}),
        Unit("heal", "heal", run / "healed", _kwargs(heal, ("merge",)), deps=("prune",)),
    ]
    if recipe.merge_mode != "none":
        units.append(Unit("merge", "merge", run / "merged", {"mode": recipe.merge_mode}, deps=("heal",)))
    evals = [("dense", ()), ("pruned", ("prune",)), ("healed", ("heal",))]
    if recipe.merge_mode != "none":
        evals.append(("merged", ("merge",)))
    for name, deps in evals:
        target = {"dense": recipe.model}.get(name, name)
        units.append(Unit(f"eval-{name}", "evaluate", run / "eval" / f"{name}.json",
                          {"target": target, **ev}, deps=deps))
    return units


def _recorded_settings(unit: Unit, run_record: dict) -> dict | None:
    """The settings a finished unit ran with, or None when it is not finished."""
    if unit.stage == "evaluate":
        if not unit.path.is_file():
            return None
        try:
            return json.loads(unit.path.read_text()).get("settings")
        except json.JSONDecodeError:
            return None
    entry = run_record.get("stages", {}).get(unit.name, {})
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
    section = {"merge": "heal", "evaluate": "evaluate"}.get(unit.stage, unit.stage)
    key = "merge" if unit.stage == "merge" else key
    name = "model" if key in ("model", "target") else f"{section}.{key}"
    raise ConfigError(name.replace("_", "-"),
                      f"the finished {unit.name} stage in {unit.path} ran with {old!r}, the recipe now says "
                      f"{new!r}; pass --force {unit.stage} to redo it (and the stages that use its "
                      "output), or use another --output")


def decide(units: list[Unit], run_record: dict, force: str | None) -> None:
    """Marks each unit todo or skipped; raises before any work when a finished stage's settings changed."""
    if force is not None and force not in STAGES:
        raise ConfigError("--force", f"choose a stage from {', '.join(STAGES)}; got {force!r}")
    if force is not None and not any(u.stage == force for u in units):
        raise ConfigError("--force", f"this recipe has no {force} stage (merge runs when heal.merge is "
                                     "masked or dense)")
    todo = set()
    for unit in units:
        recorded = _recorded_settings(unit, run_record)
        if unit.stage == force:
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
    heal = by_name["heal"]
    last = last_checkpoint(checkpoint_dir_for(heal.path))
    entry = run_record.get("stages", {}).get("heal", {})
    heal.resume = bool(
        heal.todo and last and heal.reason == "not finished" and not by_name["prune"].todo
        and entry.get("status") == "running" and entry.get("settings") == heal.settings
    )
    if heal.resume:
        heal.reason = f"resuming from {Path(last).name}"


class RunRecord:
    """The run's sparseheal.json, rewritten atomically after every change."""

    def __init__(self, recipe: Recipe) -> None:
        self.path = recipe.output / RECORD_FILE
        self.data = read_existing(recipe.output)
        self.data.update(stage="run", recipe=recipe.to_dict(),
                         environment={"SPARSEHEAL_DATA_DIR": os.environ.get("SPARSEHEAL_DATA_DIR")})
        self.data.setdefault("stages", {})

    def update(self, unit: Unit, **values: Any) -> None:
        entry = self.data["stages"].setdefault(unit.name, {})
        entry.update(stage=unit.stage, path=str(unit.path.relative_to(self.path.parent)), **values)
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, {**self.data, "versions": versions()})


def read_existing(run_dir: Path) -> dict:
    """The run record of ``run_dir`` (empty when missing or unreadable)."""
    try:
        return read_record(run_dir) or {}
    except json.JSONDecodeError:
        log.warning("%s is unreadable; finished stages will be checked again", run_dir / RECORD_FILE)
        return {}


def _kwargs(settings: dict, exclude: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in settings.items() if k not in exclude}


def _execute(unit: Unit, recipe: Recipe) -> None:
    run = recipe.output
    exists = unit.path.exists()
    if unit.name == "prune":
        api.prune(output=str(unit.path), overwrite=exists, **unit.settings)
    elif unit.name == "heal":
        if not unit.resume:
            shutil.rmtree(checkpoint_dir_for(unit.path), ignore_errors=True)
        api.heal(str(run / "pruned"), str(unit.path), overwrite=exists, resume=unit.resume,
                 **unit.settings, merge="none")
    elif unit.name == "merge":
        heal = recipe.heal
        # eval-merged measures the merged model with the evaluation protocol, so merge's own
        # adapter-vs-merged comparison is skipped (eval_windows=0)
        api.merge(str(run / "healed"), str(unit.path), mode=unit.settings["mode"], overwrite=exists,
                  eval_windows=0, dtype=heal.get("dtype"), device=heal.get("device"))
    else:
        _evaluate(unit, run)


def _evaluate(unit: Unit, run: Path) -> None:
    target = unit.settings["target"]
    model, adapter = target, None
    if target in ("pruned", "healed", "merged"):
        model = str(run / target)
        if target == "healed" and (run / "healed" / "adapter_config.json").is_file():
            model, adapter = str(run / "pruned"), str(run / "healed")
    report = api.evaluate(model, adapter=adapter, **_kwargs(unit.settings, ("target",)))
    unit.path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(unit.path, {**report, "settings": unit.settings})


def _run_unit(unit: Unit, recipe: Recipe, record: RunRecord) -> None:
    log.info("run: %s (%s)", unit.name, unit.reason)
    record.update(unit, status="running", settings=unit.settings, reason=unit.reason)
    start = time.perf_counter()
    with MemorySampler() as memory:
        _execute(unit, recipe)
    unit.stats = {"seconds": round(time.perf_counter() - start, 3), "cpu_seconds": memory.cpu_seconds,
                  "peak_rss_mb": memory.peak_mb, "peak_gpu_mb": memory.peak_gpu_mb,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    record.update(unit, status="done", settings=unit.settings, skipped=False, **unit.stats)


def _check_space(units: list[Unit], recipe: Recipe) -> None:
    """Refuses a run whose remaining stages would not fit on the run directory's file system."""
    weights = weights_bytes(recipe.model) or 0
    needed, names = 0, []
    for unit in (u for u in units if u.todo and u.stage != "evaluate"):
        names.append(unit.name)
        if unit.stage == "heal":
            heal = _filled("heal", recipe.heal)
            kept = heal["save_total_limit"] if heal["save_steps"] else 0
            needed += HEALERS.get(str(heal["method"]))().output_bytes(weights, kept, False)[0]
        else:  # a pruned or merged model is about as large as the dense one
            needed += weights
    if names:
        check_free_space(recipe.output, needed, f"the stages still to run: {', '.join(names)}")


def check_run_dir(run_dir: Path) -> None:
    """Refuses a run directory that another command wrote, or one with a link that leads out of it."""
    existing = read_existing(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()) and existing.get("stage") != "run":
        raise ConfigError("--output", f"{run_dir} is not empty and holds no run record; give a new "
                                      "directory or one an earlier sparseheal run wrote")
    check_run_links(run_dir)


def run_recipe(recipe: Recipe, force: str | None, after: Callable[[Path], dict] | None = None) -> dict:
    """Runs (or resumes) every unit of ``recipe``; returns the run record.

    ``after`` (the report writer) is called with the run directory once all units are done; its
    result (a dict with "path") replaces "report" in the returned record.
    """
    units = plan_units(recipe)
    check_run_dir(recipe.output)
    existing = read_existing(recipe.output)
    decide(units, existing, force)
    _check_space(units, recipe)
    recipe.output.mkdir(parents=True, exist_ok=True)
    (recipe.output / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    record = RunRecord(recipe)
    stale = set(record.data["stages"]) - {u.name for u in units}
    for name in stale:  # e.g. merge was asked before and is not now
        record.data["stages"].pop(name)
    for unit in units:
        if unit.todo:
            _run_unit(unit, recipe, record)
        else:
            log.info("run: %s is finished with the same settings; skipped", unit.name)
            record.update(unit, skipped=True)
    if after is None:
        return record.data
    report = after(recipe.output)
    record.data["report"] = Path(report["path"]).name
    record.save()
    return {**record.data, "report": report}
