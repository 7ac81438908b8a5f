"""Run records -> report.md, report.json and PNG plots, all regenerated from the files of a run.

Sources: the run record (``RUN_DIR/sparseheal.json``: recipe, per-stage settings, time, memory), the
stage records (``pruned/``, ``healed/``, ``merged/`` ``sparseheal.json``), ``healed/train_log.jsonl``
and the evaluation files ``eval/*.json``. The share of the pruning gap that healing closed, per data
set, is

    gap_closed = (ppl_pruned - ppl_healed) / (ppl_pruned - ppl_dense)

(1 = back to dense, 0 = no better than pruned, < 0 = worse than pruned).

A run with named heal stages (``healed-NAME/``, see :mod:`sparseheal.run.heals`) gets a comparison
instead of the one-heal tables: a row per evaluated model (:mod:`sparseheal.run.compare`), a row per heal
stage, and one plot of the stages side by side (``healing.png``).
"""

from __future__ import annotations

import json
import logging
import shlex
import statistics
from pathlib import Path
from typing import Any

from sparseheal.errors import ConfigError
from sparseheal.evaluate.base import Evaluator, evaluators
from sparseheal.evaluate.perplexity import PerplexityEvaluator
from sparseheal.records import read_record, replace_file
from sparseheal.run import compare, plots
from sparseheal.run.compare import gap_closed
from sparseheal.run.recipe import section_defaults

__all__ = ["gap_closed", "build_report", "write_report", "render_markdown", "results_table", "commands"]

log = logging.getLogger(__name__)

MODELS = ("dense", "pruned", "healed", "merged")  # the models of a run with one unnamed heal stage


def _evaluations(run_dir: Path, stages: dict) -> dict[str, dict]:
    """Each evaluated model's file (``eval-NAME`` units of the run record), in run order."""
    found = {}
    for unit, entry in stages.items():
        if entry.get("stage") != "evaluate" or not unit.startswith("eval-"):
            continue
        model = unit[len("eval-"):]
        if data := _read_json(run_dir / entry.get("path", f"eval/{model}.json")):
            found[model] = data
    return found


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _perplexity(evals: dict[str, dict], named: bool) -> dict[str, dict]:
    """{data set: {protocol, seqlen, windows, tokens, MODEL: ppl, ...}}; with one unnamed heal stage
    also its gap closed (named stages have theirs in the model rows)."""
    table = PerplexityEvaluator.table({model: data.get("results") or [] for model, data in evals.items()})
    for row in table.values() if not named else ():
        row["gap_closed"] = gap_closed(row.get("dense"), row.get("pruned"), row.get("healed"))
        if "merged" in row:
            row["gap_closed_merged"] = gap_closed(row.get("dense"), row.get("pruned"), row.get("merged"))
    return table


def _others() -> list[type[Evaluator]]:
    """The evaluations other than perplexity, whose tables the report shows as they come (perplexity is
    the report's headline: the gap closed is computed from it)."""
    return [e for e in evaluators() if e is not PerplexityEvaluator]


def _tables(evals: dict[str, dict]) -> dict[str, dict]:
    """Each other evaluation's table, by its name, from the models that have its results."""
    return {e.name: e.table({model: data[e.key] for model, data in evals.items() if data.get(e.key)})
            for e in _others()}


def _sparsity(pruned: dict, healed: dict, merged: dict) -> dict:
    layers = pruned.get("layers") or {}
    values = list(layers.values())
    summary = {"min": min(values), "mean": statistics.fmean(values), "max": max(values),
               "count": len(values)} if values else {}
    return {
        "method": pruned.get("method"), "pattern": pruned.get("pattern"), "target": pruned.get("sparsity"),
        "layer_sparsity": (pruned.get("layer_sparsity") or {}).get("mode", "uniform"),
        "achieved": pruned.get("sparsity_achieved"), "pruned_parameters": pruned.get("pruned_parameters"),
        "prunable_parameters": pruned.get("prunable_parameters"), "layers": summary,
        "healed_mask_check": (healed.get("mask_verification") or {}).get("ok"),
        "merged": (merged.get("merge") or {}).get("sparsity_after") if merged else None,
    }


def _stages(run_record: dict) -> list[dict]:
    rows = []
    for name, entry in run_record.get("stages", {}).items():
        rows.append({"name": name, "status": entry.get("status"), "seconds": entry.get("seconds"),
                     "cpu_seconds": entry.get("cpu_seconds"), "peak_rss_mb": entry.get("peak_rss_mb"),
                     "peak_gpu_mb": entry.get("peak_gpu_mb"),
                     "skipped_last_run": entry.get("skipped", False),
                     "finished_at": entry.get("finished_at")})
    return rows


def _flags(settings: dict, defaults: dict, skip: tuple[str, ...] = ()) -> list[str]:
    out = []
    for key, value in settings.items():
        if key in skip or value is None or value == defaults.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{flag[2:]}")
        else:
            out += [flag, str(value)]
    return out


def _stage_command(run: str, run_dir: Path, unit: str, entry: dict) -> list[str] | None:
    """The stand-alone command of one unit of the run record (None for a unit of another kind)."""
    stage, s = entry.get("stage"), entry.get("settings") or {}
    path = f"{run}/{entry.get('path')}"
    if stage == "prune":
        return ["sparseheal", "prune", s["model"], "--output", path,
                *_flags(s, section_defaults("prune"), ("model",))]
    if stage == "heal":
        source = entry.get("input", "pruned")
        return ["sparseheal", "heal", f"{run}/{source}", "--output", path,
                *_flags(s, section_defaults("heal"), ("from",))]
    if stage == "merge":
        return ["sparseheal", "merge", f"{run}/{entry.get('input', 'healed')}", "--output", path, "--mode",
                s["mode"]]
    if stage != "evaluate":
        return None
    model = unit[len("eval-"):]
    target = [s["target"]] if model == "dense" else [f"{run}/{model}"]
    if model != "dense" and (run_dir / model / "adapter_config.json").is_file():
        target = [f"{run}/{entry.get('input', 'pruned')}", "--adapter", f"{run}/{model}"]
    return ["sparseheal", "evaluate", *target, *_flags(s, section_defaults("evaluate"), ("target",)),
            "--output", path]


def commands(run_dir: Path, run_record: dict) -> list[str]:
    """Shell commands that reproduce the run: the one ``run`` command, then the stage-by-stage ones."""
    run = str(run_dir)
    lines = [["sparseheal", "run", "--config", f"{run}/recipe.yaml", "--output", run]]
    data_dir = (run_record.get("environment") or {}).get("SPARSEHEAL_DATA_DIR")
    if data_dir:
        lines.insert(0, ["export", f"SPARSEHEAL_DATA_DIR={data_dir}"])
    for unit, entry in run_record.get("stages", {}).items():
        if (line := _stage_command(run, run_dir, unit, entry)) is not None:
            lines.append(line)
    return [shlex.join(line) for line in lines]


def build_report(run_dir: str | Path) -> dict[str, Any]:
    """Collects everything the report shows from the records of ``run_dir``."""
    run_dir = Path(run_dir)
    run_record = read_record(run_dir, "RUN_DIR") if run_dir.is_dir() else None
    if not run_record or run_record.get("stage") != "run":
        raise ConfigError("RUN_DIR", f"{run_dir} holds no run record (the sparseheal.json of sparseheal run)")
    # only finished stages: one redone or interrupted is pending, and its old output belongs to another
    # upstream (a report never sets a new prune's sparsity beside the old models' perplexities)
    stages = {k: v for k, v in run_record.get("stages", {}).items() if v.get("status", "done") == "done"}
    heals = compare.heal_stages(run_dir, stages)
    named = any(h["name"] for h in heals)
    pruned = (read_record(run_dir / "pruned") or {}) if "prune" in stages else {}
    healed = {} if named or "heal" not in stages else (read_record(run_dir / "healed") or {})
    merged = (read_record(run_dir / "merged") or {}) if "merge" in stages else {}
    evals = _evaluations(run_dir, stages)
    perplexity = _perplexity(evals, named)
    return {
        "run_dir": str(run_dir),
        "model": run_record.get("recipe", {}).get("model"),
        "recipe": run_record.get("recipe"),
        "perplexity": perplexity,
        **_tables(evals),
        "sparsity": _sparsity(pruned, healed, merged),
        "healing": None if named else compare.healing_summary(healed),
        "merge": merged.get("merge") if merged else None,
        "heals": heals,
        "models": compare.model_rows(perplexity, heals, pruned.get("method")),
        "stages": _stages(run_record),
        "versions": run_record.get("versions", {}),
        "commands": commands(run_dir, run_record),
        "train_log": [] if named else compare.read_log(run_dir / "healed" / "train_log.jsonl"),
        "train_logs": {h["name"]: compare.read_log(run_dir / h["path"] / "train_log.jsonl")
                       for h in heals if h["name"]},
        "layers": pruned.get("layers") or {},
        "layer_losses": (healed.get("blockwise") or {}).get("layers") or [],
    }


def _num(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def _ppl_table(ppl: dict) -> list[str]:
    models = [m for m in MODELS if any(m in row for row in ppl.values())]
    merged = "merged" in models
    head = ["data set", "protocol", "seqlen × windows", *models, "gap closed (healed)"]
    head += ["gap closed (merged)"] if merged else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in ppl.items():
        cells = [name, row["protocol"], f"{row['seqlen']} × {row['windows']}"]
        cells += [_num(row.get(m), ".3f") for m in models] + [_pct(row.get("gap_closed"))]
        cells += [_pct(row.get("gap_closed_merged"))] if merged else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _named(report: dict) -> bool:
    """Whether the run has named heal stages (the comparison report) rather than one unnamed stage."""
    return any(h["name"] for h in report.get("heals") or [])


def _ppl_lines(report: dict) -> list[str]:
    if not report["perplexity"]:
        return ["(not evaluated)"]
    if _named(report):
        return compare.comparison_table(report["models"], report["perplexity"])
    return _ppl_table(report["perplexity"])


def results_table(report: dict) -> str:
    """The perplexity table (one row per model when the run has named heal stages; the zero-shot table
    too when tasks ran), as markdown."""
    lines = _ppl_lines(report)
    for evaluator in _others():
        if report.get(evaluator.name):
            lines += [""] + evaluator.table_lines(report[evaluator.name])
    return "\n".join(lines)


def _sparsity_lines(s: dict) -> list[str]:
    lines = [f"- method **{s['method']}**, pattern {s['pattern']}, target sparsity {_pct(s['target'], 2)}",
             f"- achieved: {_pct(s['achieved'], 2)} of the prunable weights "
             f"({_num(s['pruned_parameters'], ',d')} of {_num(s['prunable_parameters'], ',d')})"]
    if s["layers"]:
        layer = s["layers"]
        lines.append(f"- per layer ({layer['count']} linears): min {_pct(layer['min'], 2)}, "
                     f"mean {_pct(layer['mean'], 2)}, max {_pct(layer['max'], 2)}")
    if s["healed_mask_check"] is not None:
        verdict = "yes" if s["healed_mask_check"] else "NO"
        lines.append(f"- healed model: every pruned weight is +0.0: {verdict}")
    if s["merged"] is not None:
        lines.append(f"- merged model: sparsity of the pruned layers {_pct(s['merged'], 2)}")
    return lines


def _healing_lines(h: dict) -> list[str]:
    trainable, total = h.get("trainable_parameters"), h.get("total_parameters")
    shown = _num(trainable, ",d")
    if trainable and total:
        shown += f" ({100 * trainable / total:.3f}% of {total:,d})"
    elif h.get("trainable_tensors"):
        shown = "tensors: " + ", ".join(f"{k} {v}" for k, v in h["trainable_tensors"].items())
    data = h.get("data") or {}
    cells = [h.get("method") or "–", shown, _num(h.get("steps"), "d"), _num(h.get("tokens_seen"), ",d"),
             f"{_num(h.get('first_loss'), '.3f')} → {_num(h.get('final_loss'), '.3f')}",
             _num(h.get("eval_loss"), ".3f"), _num(h.get("tokens_per_second"), ",.0f")]
    return [
        "| method | trainable parameters | steps | tokens seen | loss first → last | held-out loss "
        "| tokens/s |",
        "|---|---|---|---|---|---|---|",
        "| " + " | ".join(cells) + " |",
        "",
        f"Training text: {data.get('source', '–')}, {data.get('train_blocks', '–')} blocks of "
        f"{data.get('block_size', '–')} tokens ({data.get('eval_blocks', '–')} held out).",
    ]


def _stage_lines(stages: list[dict]) -> list[str]:
    lines = ["| stage | wall time (s) | CPU time (s) | peak RSS (MiB) | peak GPU (MiB) | status |",
             "|---|---|---|---|---|---|"]
    for s in stages:
        status = (s["status"] or "–") + (" (skipped in the last run)" if s["skipped_last_run"] else "")
        lines.append(f"| {s['name']} | {_num(s['seconds'], '.1f')} | {_num(s.get('cpu_seconds'), '.1f')} "
                     f"| {_num(s['peak_rss_mb'], ',.0f')} | {_num(s['peak_gpu_mb'], ',.0f')} | {status} |")
    total = sum(s["seconds"] or 0 for s in stages)
    lines.append(f"\nTotal wall time of the stages: {total:.1f} s. Peak RSS is the resident memory of the "
                 "process while the stage ran (sampled every 50 ms).")
    return lines


def _intro(report: dict) -> str:
    s = report["sparsity"]
    pruned = f"Run directory `{report['run_dir']}`: {s['method']} {s['pattern']} at {_pct(s['target'], 0)}"
    if not _named(report):
        return f"{pruned}, healed with {(report['healing'] or {}).get('method') or '–'}."
    stages = [f"{h['name']} ({h['method']}" + (f", from {h['from']})" if h["from"] != "pruned" else ")")
              for h in report["heals"]]
    return f"{pruned}; heal stages side by side: {', '.join(stages)}."


def render_markdown(report: dict, images: dict[str, str]) -> str:
    """The report as markdown; ``images`` maps a plot's caption to its file name."""
    s, named = report["sparsity"], _named(report)
    lines = [f"# sparseheal report: {report['model']}", "", _intro(report), "", "## Perplexity", "",
             *_ppl_lines(report)]
    if not named:
        lines += ["", "Gap closed = (ppl_pruned − ppl_healed) / (ppl_pruned − ppl_dense); every model is "
                      "evaluated with the same protocol, windows and dtype."]
    for evaluator in _others():
        if report.get(evaluator.name):
            lines += ["", f"## {evaluator.title}", "", *evaluator.table_lines(report[evaluator.name])]
    lines += ["", "## Sparsity", "", *_sparsity_lines(s)]
    if named:
        lines += [*compare.heal_sparsity_lines(report["heals"]), "", "## Healing", "",
                  *compare.healing_table(report["heals"])]
    else:
        lines += ["", "## Healing", "", *_healing_lines(report["healing"])]
    lines += ["", "## Stages: time and memory", "", *_stage_lines(report["stages"])]
    if images:
        lines += ["", "## Plots", ""] + [f"![{caption}]({name})" for caption, name in images.items()]
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines += ["", "## Versions", "", versions, "", "## Reproduce", "", "```sh", *report["commands"], "```",
              ""]
    return "\n".join(lines)


def _plots(report: dict, run_dir: Path) -> dict[str, str]:
    s, model = report["sparsity"], Path(str(report["model"])).name
    if _named(report):
        made = compare.heal_plots(report, run_dir, model)
    else:
        made = {"training and held-out loss": plots.plot_loss(
            report["train_log"], run_dir / "loss.png",
            f"Healing ({report['healing'].get('method')}) of {model}")}
    made["per-layer sparsity"] = plots.plot_sparsity(
        report["layers"], s["target"], run_dir / "sparsity.png",
        f"Per-layer sparsity of {model}: {s['method']} {s['pattern']} ({s['layer_sparsity']} layers), "
        f"{_pct(s['achieved'], 2)} overall")
    if not _named(report):
        made["per-layer reconstruction loss"] = plots.plot_layer_losses(
            report["layer_losses"], run_dir / "layer_losses.png", f"Block-wise healing of {model}")
    names = [row["model"] for row in report["models"]]
    made["perplexity"] = PerplexityEvaluator.plot(
        {d: {m: row[m] for m in names if m in row} for d, row in report["perplexity"].items()},
        run_dir / "perplexity.png", f"Perplexity of {model}")
    for evaluator in _others():
        caption = evaluator.caption
        made[caption] = evaluator.plot(report.get(evaluator.name) or {}, run_dir / f"{evaluator.name}.png",
                                       f"{caption[:1].upper()}{caption[1:]} of {model}")
    return {caption: path.name for caption, path in made.items() if path is not None}


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Writes report.md, report.json and the PNG plots into ``run_dir``; returns the report."""
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    images = _plots(report, run_dir)
    curves = plots.loss_curves(report.pop("train_log"))
    by_tokens = {name: plots.loss_curves(lines, "num_input_tokens_seen")
                 for name, lines in report.pop("train_logs").items()}
    data = {**report, "loss_curve": {"train": curves[0], "eval": curves[1]}, "plots": images}
    if by_tokens:  # named heal stages: each one's loss against the tokens it has seen
        data["loss_curves"] = {name: {"train": c[0], "eval": c[1]} for name, c in by_tokens.items()}
    for name, text in (("report.json", json.dumps(data, indent=2) + "\n"),
                       ("report.md", render_markdown(report, images))):
        replace_file(run_dir / name, text)
    log.info("report: %s", run_dir / "report.md")
    return {**data, "path": str(run_dir / "report.md")}
