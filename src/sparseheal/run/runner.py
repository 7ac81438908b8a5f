"""``sparseheal run``: the stages of a recipe in order, each resumable, then the report.

Layout of a run directory::

    RUN_DIR/sparseheal.json   the run record: recipe, per-stage settings, status, time and memory
    RUN_DIR/recipe.yaml       the effective recipe (file + flags)
    RUN_DIR/pruned/           prune (model + masks + record)
    RUN_DIR/healed/           heal (adapter or model + train_log.jsonl + record); healed.ckpt/ while training
    RUN_DIR/merged/           merge, when heal.merge is masked or dense
    RUN_DIR/eval/NAME.json    evaluate for dense, pruned, healed (and merged), one protocol for all
    RUN_DIR/report.md, report.json, *.png

With several named heal stages each stage NAME writes ``healed-NAME/`` (``healed-NAME.ckpt/``),
``merged-NAME/`` and ``eval/healed-NAME.json``, ``eval/merged-NAME.json`` instead.

A stage is finished when its output exists (outputs are written atomically) and the settings it ran
with, kept in the run record, equal the recipe's; a finished stage is skipped, a changed one is an
error naming the setting, and ``--force STAGE`` redoes it. A stage whose input is redone is redone
too, so forcing a stage redoes everything downstream of it (``--force prune`` redoes all but the
dense evaluation; ``--force evaluate`` redoes every evaluation; ``--force heal`` every heal stage and
``--force heal-NAME`` one, see :mod:`sparseheal.run.plan`). An interrupted heal continues from its last
checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from sparseheal import api
from sparseheal.checks import check_free_space
from sparseheal.errors import ConfigError
from sparseheal.heal.checkpoints import checkpoint_dir_for
from sparseheal.models import weights_bytes
from sparseheal.records import RECORD_FILE, read_record, versions, write_json_atomic
from sparseheal.registry import HEALERS
from sparseheal.run.plan import Unit, decide, plan_units
from sparseheal.run.recipe import Recipe, check_run_links

__all__ = ["check_run_dir", "run_recipe", "read_existing", "MemorySampler"]

log = logging.getLogger(__name__)

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
        if unit.source is not None:  # what it read: the report names where a heal started
            entry["input"] = str(unit.source.relative_to(self.path.parent))
        self.save()

    def keep_only(self, units: list[Unit]) -> None:
        """Drops the entries of units the recipe no longer has (e.g. merge was asked before and is not
        now) and orders the rest as the units run."""
        stages = self.data["stages"]
        self.data["stages"] = {u.name: stages[u.name] for u in units if u.name in stages}

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


def _execute(unit: Unit) -> None:
    exists = unit.path.exists()
    if unit.stage == "prune":
        api.prune(output=str(unit.path), overwrite=exists, **unit.settings)
    elif unit.stage == "heal":
        if not unit.resume:
            shutil.rmtree(checkpoint_dir_for(unit.path), ignore_errors=True)
        api.heal(str(unit.source), str(unit.path), overwrite=exists, resume=unit.resume,
                 **_kwargs(unit.settings, ("from",)), merge="none")
    elif unit.stage == "merge":
        # eval-merged measures the merged model with the evaluation protocol, so merge's own
        # adapter-vs-merged comparison is skipped (eval_windows=0)
        api.merge(str(unit.source), str(unit.path), mode=unit.settings["mode"], overwrite=exists,
                  eval_windows=0, **unit.extra)
    else:
        _evaluate(unit)


def _evaluate(unit: Unit) -> None:
    """Evaluates the dense model by name, any other by its directory in the run (an adapter on the
    model its heal started from)."""
    target = unit.settings["target"]
    model, adapter = target, None
    if unit.name != "eval-dense":
        directory = unit.path.parent.parent / target
        model = str(directory)
        if unit.source is not None and (directory / "adapter_config.json").is_file():
            model, adapter = str(unit.source), str(directory)
    report = api.evaluate(model, adapter=adapter, **_kwargs(unit.settings, ("target",)))
    unit.path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(unit.path, {**report, "settings": unit.settings})


def _run_unit(unit: Unit, record: RunRecord) -> None:
    log.info("run: %s (%s)", unit.name, unit.reason)
    record.update(unit, status="running", settings=unit.settings, reason=unit.reason)
    start = time.perf_counter()
    with MemorySampler() as memory:
        _execute(unit)
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
            heal = unit.settings
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
    record.keep_only(units)
    for unit in units:  # an interruption must not leave what these replace looking finished
        if unit.todo:
            record.update(unit, status="pending", reason=unit.reason)
    for unit in units:
        if unit.todo:
            _run_unit(unit, record)
        else:
            log.info("run: %s is finished with the same settings; skipped", unit.name)
            record.update(unit, skipped=True)
    if after is None:
        return record.data
    report = after(recipe.output)
    record.data["report"] = Path(report["path"]).name
    record.save()
    return {**record.data, "report": report}
