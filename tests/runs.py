"""Helpers shared by test files: a tiny end-to-end ``sparseheal run`` (built once per session) and a
two-process torchrun launch of ``sparseheal heal``."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import synthetic_text

STAGE_PATHS = ("pruned", "healed", "merged", "eval")
# the tiny heal stage of write_recipe, for recipes that list several
HEAL_STAGE = {"method": "lora", "max-steps": 6, "block-size": 32, "max-train-samples": 24,
              "max-eval-samples": 2, "logging-steps": 1, "eval-steps": 3, "save-steps": 3, "lr": 1e-3}


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


def write_heals_recipe(path: Path, model: Path, output: Path, stages: list[dict]) -> Path:
    """The recipe of :func:`write_recipe` with a list of heal stages, each the tiny LoRA stage updated by
    the given keys (``name``, ``from``, ``method``, ...); a block-wise stage gets only its own keys (the
    Trainer's settings of the tiny stage do not apply to it and would be refused)."""
    import yaml

    recipe = {"model": str(model),
              "prune": {"method": "wanda", "sparsity": 0.5, "nsamples": 4, "seqlen": 32,
                        "calibration-batch-size": 2},
              "heal": [{**(HEAL_STAGE if stage.get("method") != "blockwise" else {}), **stage}
                       for stage in stages],
              "evaluate": {"seqlen": 32, "max-windows": 4}, "output": str(output)}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def copy_run(finished: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of a finished run, with its recipe (beside the run) pointing at the copy, for tests that
    change it; returns (run directory, recipe path)."""
    import shutil

    run_dir = shutil.copytree(finished, tmp_path / "run", symlinks=True)
    text = (finished.parent / "recipe.yaml").read_text().replace(f"output: {finished}", f"output: {run_dir}")
    (tmp_path / "recipe.yaml").write_text(text)
    return run_dir, str(tmp_path / "recipe.yaml")


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


def snapshot(run_dir: Path, tops: tuple[str, ...] = STAGE_PATHS) -> dict[str, tuple[int, str]]:
    """(mtime in ns, sha256) of every file the stages wrote (in the directories ``tops``)."""
    found = {}
    for top in tops:
        for path in sorted((run_dir / top).rglob("*")):
            if path.is_file():
                found[str(path.relative_to(run_dir))] = (path.stat().st_mtime_ns,
                                                         hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_heal(pruned: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """``sparseheal heal PRUNED -o OUT --batch-size 1 FLAGS`` in two torchrun processes on the CPU (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port())]
    heal = ["-m", "sparseheal", "heal", str(pruned), "-o", str(out), "--batch-size", "1", *flags]
    return subprocess.run(launcher + heal, env=env, capture_output=True, text=True, timeout=300)


def prune_for_launch(tmp_path_factory, llama_dir: Path, data_dir: Path, name: str) -> Path:
    """A tiny Wanda-pruned LLaMA, for a module-scoped fixture (set up before the per-test environment)."""
    import pytest

    import sparseheal

    out = tmp_path_factory.mktemp(name) / "pruned"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SPARSEHEAL_DATA_DIR", str(data_dir))
        return sparseheal.prune(str(llama_dir), str(out), nsamples=4, seqlen=32, calibration_batch_size=2)
