"""Zero-shot accuracy through lm-evaluation-harness, on the model already in memory.

The loaded model (with its adapter, when one is given) and tokenizer are wrapped in lm-eval's
``HFLM`` and scored by ``lm_eval.simple_evaluate``: for each multiple-choice question, the choice
with the highest log-likelihood given the context is the prediction (``acc``), and ``acc_norm``
divides each choice's log-likelihood by its length in bytes (Gao et al., "A framework for few-shot
language model evaluation", https://github.com/EleutherAI/lm-evaluation-harness):

    acc      = mean_i [ argmax_c  log p(c | x_i)          == y_i ]
    acc_norm = mean_i [ argmax_c  log p(c | x_i) / |c|_bytes == y_i ]

Standard task names (``boolq``, ``piqa``, ...) pass through to the harness, which fetches their data
from the Hub. Offline, ``local:PATH`` names a JSON-lines file (or a directory of them) whose lines
are ``{"context": str, "choices": [str, ...], "label": int}``; a task YAML for it is generated in a
temporary directory and registered through ``TaskManager(include_path=...)``, so it runs through the
same harness path as the standard tasks. A relative PATH that does not exist is looked up under
``$SPARSEHEAL_DATA_DIR``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from sparseheal.card_stages import number
from sparseheal.charts import grouped_bars, models_of, pyplot, save
from sparseheal.checks import positive
from sparseheal.errors import ConfigError
from sparseheal.evaluate.base import Evaluator
from sparseheal.registry import EVALUATORS
from sparseheal.settings import Settings, setting

__all__ = ["ZeroShotSettings", "LOCAL_PREFIX", "LocalTask", "ZeroShotTasks", "local_task_config",
           "prepare_tasks",
           "run_zeroshot", "summarize_results", "ZeroShotEvaluator"]

log = logging.getLogger(__name__)

LOCAL_PREFIX = "local:"
_FLAG = "--tasks"
_METRICS = ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")
_HINT = "(standard lm-eval names such as boolq,piqa, or local:PATH.jsonl with lines " \
        '{"context": ..., "choices": [...], "label": i})'


@dataclass
class ZeroShotSettings(Settings):
    """Which zero-shot tasks lm-evaluation-harness scores, and on how many questions."""

    tasks: str | None = setting(None, "zero-shot tasks, comma-separated: lm-eval names (boolq,piqa) or "
                                      "local:PATH.jsonl.")
    limit: int | None = setting(None, "score only the first N questions of each zero-shot task.",
                                check=positive)

    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in (self.tasks or "").split(",") if t.strip()]


@dataclass
class LocalTask:
    """A multiple-choice task read from JSON-lines files."""

    name: str  # the lm-eval task name, "local_<stem>"
    spec: str  # what the user wrote after "local:"
    files: list[Path]
    docs: int


@dataclass
class ZeroShotTasks:
    """Validated tasks and the lm-eval TaskManager that knows them (local ones included)."""

    names: list[str]  # lm-eval task names, in the order asked
    local: list[LocalTask]
    manager: Any  # lm_eval.tasks.TaskManager
    sources: dict[str, str] = field(default_factory=dict)  # task name -> "local:<file>" or "lm-eval"


def _validate_line(line: str, where: str) -> None:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(_FLAG, f"{where} is not valid JSON ({err.msg})") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("context"), str):
        raise ConfigError(_FLAG, f"{where} needs a string field 'context'")
    choices = doc.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ConfigError(_FLAG, f"{where} needs 'choices': a list of at least 2 strings")
    label = doc.get("label")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ConfigError(_FLAG, f"{where} needs 'label': an index into choices (0..{len(choices) - 1})")


def _count_docs(path: Path) -> int:
    """Validates every line of a task file; returns the number of questions."""
    count = 0
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                _validate_line(line, f"{path}:{number}")
                count += 1
    return count


def _resolve_local(spec: str, data_dir: str | None) -> LocalTask:
    path = Path(spec).expanduser()
    root = data_dir or os.environ.get("SPARSEHEAL_DATA_DIR")
    if not path.exists() and not path.is_absolute() and root:
        path = Path(root) / spec
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
    elif path.is_file() and path.suffix == ".jsonl":
        files = [path]
    else:
        where = root or "$SPARSEHEAL_DATA_DIR"
        raise ConfigError(_FLAG, f"local task {spec!r} is not a .jsonl file or a directory of them "
                                 f"(looked in the working directory and under {where})")
    if not files:
        raise ConfigError(_FLAG, f"local task directory {path} holds no .jsonl files")
    docs = sum(_count_docs(f) for f in files)
    if docs == 0:
        raise ConfigError(_FLAG, f"local task {spec!r} has no questions")
    stem = path.stem if path.is_file() else path.name
    name = "local_" + re.sub(r"[^0-9A-Za-z_]+", "_", stem).strip("_")
    return LocalTask(name=name, spec=spec, files=[f.resolve() for f in files], docs=docs)


def _distinct_names(tasks: list[LocalTask]) -> list[LocalTask]:
    """Local tasks with one name per set of files: a second file of the same name elsewhere gets
    ``local_<stem>_2`` (and so on), so that two tasks never collapse into one result."""
    owners: dict[str, list[Path]] = {}
    for task in tasks:
        base, number = task.name, 1
        while task.name in owners and owners[task.name] != task.files:
            number += 1
            task.name = f"{base}_{number}"
        owners[task.name] = task.files
    return tasks


def local_task_config(task: LocalTask, cache_dir: Path) -> dict:
    """The lm-eval task YAML (as a dict) for a local multiple-choice task."""
    return {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": [str(f) for f in task.files]}, "cache_dir": str(cache_dir)},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def _split(tasks: list[str] | str) -> list[str]:
    items = tasks.split(",") if isinstance(tasks, str) else tasks
    return [t.strip() for t in items if t and t.strip()]


def _check_standard(names: list[str], manager: Any) -> None:
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(_FLAG, f"lm-eval has no task {name!r}{hint} {_HINT}")


@contextlib.contextmanager
def prepare_tasks(tasks: list[str] | str, data_dir: str | None = None) -> Iterator[ZeroShotTasks]:
    """Validates ``--tasks`` before any model is loaded and yields the tasks ready to run.

    Local task files are checked line by line and given a generated YAML in a temporary directory
    (removed on exit). The harness's own task index (several seconds to build) is scanned only when
    a standard task name is asked for.
    """
    from lm_eval.tasks import TaskManager

    wanted = _split(tasks)
    if not wanted:
        raise ConfigError(_FLAG, f"no task given {_HINT}")
    local = _distinct_names([_resolve_local(t[len(LOCAL_PREFIX):], data_dir) for t in wanted
                             if t.startswith(LOCAL_PREFIX)])
    standard = [t for t in wanted if not t.startswith(LOCAL_PREFIX)]
    with tempfile.TemporaryDirectory(prefix="sparseheal-tasks-") as tmp:
        for task in local:
            config = local_task_config(task, Path(tmp) / "cache")
            (Path(tmp) / f"{task.name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        manager = TaskManager(include_path=tmp if local else None, include_defaults=bool(standard))
        _check_standard(standard, manager)
        by_spec = {t.spec: t for t in local}
        names = [by_spec[t[len(LOCAL_PREFIX):]].name if t.startswith(LOCAL_PREFIX) else t for t in wanted]
        sources = {t.name: LOCAL_PREFIX + ",".join(map(str, t.files)) for t in local}
        sources.update({name: "lm-eval" for name in standard})
        yield ZeroShotTasks(names=list(dict.fromkeys(names)), local=local, manager=manager, sources=sources)


def summarize_results(results: dict, sources: dict[str, str] | None = None) -> dict[str, dict]:
    """Reduces lm-eval's output to {task: {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n"}}.

    lm-eval keys metrics as ``"<metric>,<filter>"`` (``"acc,none"``); tasks and groups without an
    accuracy are left out.
    """
    summary = {}
    n_samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if metric in _METRICS and isinstance(value, (int, float)):
                row[metric] = float(value)
        if "acc" not in row:
            continue
        counts = n_samples.get(task, {})
        row["n"] = int(counts.get("effective", counts.get("original", 0)))
        if sources and task in sources:
            row["source"] = sources[task]
        summary[task] = row
    return summary


def run_zeroshot(
    model: nn.Module, tokenizer: Any, tasks: ZeroShotTasks, limit: int | None = None, batch_size: int = 1
) -> dict[str, dict]:
    """Zero-shot accuracy of the loaded ``model`` on ``tasks`` through lm-eval's HFLM.

    Args:
        model: a causal LM (or a PeftModel wrapping one), already on its device.
        tokenizer: its tokenizer.
        tasks: from ``prepare_tasks``.
        limit: score only the first ``limit`` questions of each task.
        batch_size: requests per forward pass.

    Returns:
        {task: {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n"[, "source"]}}
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    log.info("zero-shot evaluation on %s (limit %s per task)", ", ".join(tasks.names), limit)
    try:
        results = lm_eval.simple_evaluate(
            model=wrapped, tasks=tasks.names, task_manager=tasks.manager, limit=limit, num_fewshot=0,
            log_samples=False, bootstrap_iters=1000,
        )
    finally:
        model.train(was_training)
    return summarize_results(results or {}, tasks.sources)


@EVALUATORS.register("zeroshot")
class ZeroShotEvaluator(Evaluator):
    """Zero-shot accuracy on ``--tasks`` through lm-evaluation-harness; a result is
    {task: {"acc", "acc_norm", "n", ...}} (the report's ``zeroshot``)."""

    settings = ZeroShotSettings
    key = "zeroshot"
    title = "Zero-shot accuracy (lm-evaluation-harness)"
    caption = "zero-shot accuracy"

    def wanted(self) -> bool:
        return bool(self.options.task_list)

    def prepare(self, model: str, stack: contextlib.ExitStack) -> None:
        self.tasks = stack.enter_context(prepare_tasks(self.options.task_list, self.data_dir))

    def run(self, lm: nn.Module, tokenizer: Any, batch_size: int) -> dict[str, dict]:
        return run_zeroshot(lm, tokenizer, self.tasks, self.options.limit, batch_size)

    @classmethod
    def lines(cls, result: dict[str, dict]) -> list[str]:
        out = ["", f"{'zero-shot task':<32} {'n':>6} {'acc':>8} {'acc_norm':>8}"]
        for task, row in result.items():
            norm = f"{row['acc_norm']:>8.4f}" if "acc_norm" in row else f"{'-':>8}"
            out.append(f"{task:<32} {row['n']:>6} {row['acc']:>8.4f} {norm}")
        return out

    @classmethod
    def card_lines(cls, results: dict[str, dict]) -> list[str]:
        lines = ["Zero-shot accuracy:", "", "| model | task | acc | acc_norm | examples |",
                 "|---|---|---:|---:|---:|"]
        return lines + [f"| `{label}` | `{task}` | {number(row.get('acc'))} | "
                        f"{number(row.get('acc_norm'))} | {number(row.get('n'))} |"
                        for label, result in results.items() for task, row in result.items()]

    @classmethod
    def table(cls, results: dict[str, dict]) -> dict:
        """{task: {MODEL: {"acc", "acc_norm", "n"}}}."""
        table: dict[str, dict] = {}
        for model, result in results.items():
            for task, row in result.items():
                table.setdefault(task, {})[model] = {k: row.get(k) for k in ("acc", "acc_norm", "n")}
        return table

    @classmethod
    def table_lines(cls, table: dict) -> list[str]:
        models = models_of(table)
        head = ["task", "n", "metric", *models]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for task, row in table.items():
            n = next((r.get("n") for r in row.values() if r.get("n") is not None), None)
            for metric in ("acc", "acc_norm"):
                cells = [task if metric == "acc" else "", str(n) if metric == "acc" else "", metric]
                cells += [_percent((row.get(m) or {}).get(metric)) for m in models]
                lines.append("| " + " | ".join(cells) + " |")
        return lines

    @classmethod
    def plot(cls, table: dict, path: Path, title: str) -> Path | None:
        """Accuracy per task for each evaluated model."""
        if not table:
            return None
        series = {m: [None if (table[t].get(m) or {}).get("acc") is None else 100 * table[t][m]["acc"]
                      for t in table] for m in models_of(table)}
        fig, ax = pyplot().subplots(figsize=(max(6, 2.5 * len(table) + 3), 4))
        grouped_bars(ax, list(table), series, "{:.1f}")
        ax.set_ylim(0, 110)
        ax.set_ylabel("accuracy (%)")
        ax.set_xlabel("zero-shot task")
        ax.set_title(title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="y", alpha=0.3)
        return save(fig, path)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"
