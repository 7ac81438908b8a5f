"""A tiny end-to-end ``sparseheal run`` shared by the run and report tests (built once per session)."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from conftest import synthetic_text

STAGE_PATHS = ("pruned", "healed", "merged", "eval")


def write_task(path: Path, n: int = 6) -> Path:
    """A small local multiple-choice task for the zero-shot evaluation."""
    rows = [{"context": synthetic_text(6, 300 + i), "choices": ["the river", "music history", "quiet hills"],
             "label": i % 3} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_recipe(path: Path, model: Path, output: Path, task: Path | None = None, **heal: object) -> Path:
    """A recipe for a tiny LLaMA: Wanda 50%, a few LoRA steps with checkpoints, masked merge."""
    heal_section = {"method": "lora", "max-steps": 6, "block-size": 32, "max-train-samples": 24,
                    "max-eval-samples": 2, "logging-steps": 1, "eval-steps": 3, "save-steps": 3, "lr": "1e-3",
                    "merge": "masked", **heal}
    lines = [
        f"model: {model}",
        "prune: {method: wanda, sparsity: 0.5, nsamples: 4, seqlen: 32, calibration-batch-size: 2}",
        "heal: {" + ", ".join(f"{k}: {v}" for k, v in heal_section.items()) + "}",
        "evaluate: {seqlen: 32, max-windows: 4" + (f", tasks: ['local:{task}']" if task else "") + "}",
        f"output: {output}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@functools.cache
def tiny_run(base: Path, model: Path) -> Path:
    """Runs the tiny recipe once into ``base/run`` through the CLI; returns the run directory."""
    import pytest

    from sparseheal.cli import main

    base.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(base / "recipe.yaml", model, base / "run", write_task(base / "task.jsonl"))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", str(recipe)])
    assert exit_info.value.code == 0
    return base / "run"


def snapshot(run_dir: Path) -> dict[str, tuple[int, str]]:
    """(mtime in ns, sha256) of every file the stages wrote."""
    found = {}
    for top in STAGE_PATHS:
        for path in sorted((run_dir / top).rglob("*")):
            if path.is_file():
                found[str(path.relative_to(run_dir))] = (path.stat().st_mtime_ns,
                                                         hashlib.sha256(path.read_bytes()).hexdigest())
    return found
