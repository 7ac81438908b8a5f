"""The heal stages of a run side by side: what each one read, trained and cost, and one row per
evaluated model (dense, pruned, each healed and merged model) for the report's comparison table.

Everything comes from the run record (each unit's settings, input, wall time) and the stage records;
the tokens seen and wall time of a row are its heal stage's own (a stage healed from another starts
where that one ended; the plot adds them up along the chain).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparseheal.records import read_record
from sparseheal.run import plots

__all__ = ["gap_closed", "healing_summary", "heal_stages", "model_rows", "comparison_table",
           "healing_table", "heal_sparsity_lines", "heal_points", "heal_plots", "read_log"]


def gap_closed(dense: float | None, pruned: float | None, healed: float | None) -> float | None:
    """(pruned - healed) / (pruned - dense); None when a value is missing or pruning cost nothing."""
    if dense is None or pruned is None or healed is None or abs(pruned - dense) < 1e-12:
        return None
    return (pruned - healed) / (pruned - dense)


def read_log(path: Path) -> list[dict]:
    """The entries of a ``train_log.jsonl`` (none when it is missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def healing_summary(healed: dict) -> dict:
    """What a heal record says about the training (missing fields are None)."""
    keys = ("method", "trainable_parameters", "total_parameters", "steps", "tokens_seen", "train_loss",
            "first_loss", "final_loss", "eval_loss", "tokens_per_second", "train_seconds", "data")
    found = {k: healed.get(k) for k in keys}
    if found["trainable_parameters"] is None and healed.get("parameter_tensors"):
        found["trainable_tensors"] = healed["parameter_tensors"]
    return found


def heal_stages(run_dir: Path, stages: dict[str, dict]) -> list[dict[str, Any]]:
    """One entry per heal unit of the run record, in run order: its name (None for the unnamed stage),
    method, input (``from``), wall time, training summary, mask check, merge and per-layer losses."""
    found = []
    for unit, entry in stages.items():
        if entry.get("stage") != "heal":
            continue
        suffix = unit[len("heal"):]
        record = read_record(run_dir / entry.get("path", f"healed{suffix}")) or {}
        merge = stages.get(f"merge{suffix}")
        merged = (read_record(run_dir / merge.get("path", f"merged{suffix}")) or {}) if merge else {}
        found.append({
            "name": suffix[1:] or None, "unit": unit, "model": f"healed{suffix}",
            "path": entry.get("path", f"healed{suffix}"),
            "method": (entry.get("settings") or {}).get("method"), "from": entry.get("input", "pruned"),
            "seconds": entry.get("seconds"), "healing": healing_summary(record),
            "mask_check": (record.get("mask_verification") or {}).get("ok"),
            "layer_losses": (record.get("blockwise") or {}).get("layers") or [],
            "merge": None if merge is None else {
                "model": f"merged{suffix}", "mode": (merge.get("settings") or {}).get("mode"),
                "seconds": merge.get("seconds"),
                "sparsity_after": (merged.get("merge") or {}).get("sparsity_after")},
        })
    return found


def _row(model: str, method: str | None, source: str | None, ppl: dict, base: dict, **cost: Any) -> dict:
    gaps = {d: gap_closed(base[d].get("dense"), base[d].get("pruned"), v) for d, v in ppl.items()}
    gaps = {d: None if g is None else g + 0.0 for d, g in gaps.items()}  # the pruned row: 0.0, not -0.0
    return {"model": model, "method": method, "from": source, "ppl": ppl,
            "gap_closed": {} if model == "dense" else gaps, **cost}


def model_rows(perplexity: dict[str, dict], heals: list[dict], prune_method: str | None) -> list[dict]:
    """A row per evaluated model: perplexity and gap closed per data set, tokens seen and wall time of
    its heal (and merge)."""
    def ppl_of(model: str) -> dict[str, float]:
        return {d: row[model] for d, row in perplexity.items() if model in row}

    rows = [_row(m, prune_method if m == "pruned" else None, "dense" if m == "pruned" else None,
                 ppl_of(m), perplexity) for m in ("dense", "pruned") if ppl_of(m)]
    for heal in heals:
        tokens = heal["healing"].get("tokens_seen")
        if ppl := ppl_of(heal["model"]):
            rows.append(_row(heal["model"], heal["method"], heal["from"], ppl, perplexity, tokens_seen=tokens,
                             heal_seconds=heal["seconds"]))
        merge = heal["merge"]
        if merge and (ppl := ppl_of(merge["model"])):
            rows.append(_row(merge["model"], f"{merge['mode']} merge", heal["model"], ppl, perplexity,
                             tokens_seen=tokens, heal_seconds=heal["seconds"],
                             merge_seconds=merge["seconds"]))
    return rows


def _num(value: Any, spec: str) -> str:
    return "–" if value is None else f"{value:{spec}}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _seconds(row: dict) -> str:
    heal, merge = row.get("heal_seconds"), row.get("merge_seconds")
    return _num(heal, ".1f") + (f" + {merge:.1f}" if merge is not None else "")


def comparison_table(rows: list[dict], perplexity: dict[str, dict]) -> list[str]:
    """The comparison table as markdown lines: a row per model, perplexity and gap closed per data set."""
    head = ["model", "method", "from"]
    for dataset in perplexity:
        head += [f"ppl {dataset}", f"gap closed {dataset}"]
    head += ["tokens seen", "heal wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], row["method"] or "–", row["from"] or "–"]
        for dataset in perplexity:
            cells += [_num(row["ppl"].get(dataset), ".3f"), _pct(row["gap_closed"].get(dataset))]
        cells += [_num(row.get("tokens_seen"), ",d"), _seconds(row)]
        lines.append("| " + " | ".join(cells) + " |")
    protocols = "; ".join(f"{d}: {r['protocol']} protocol, seqlen {r['seqlen']} × {r['windows']} windows"
                          for d, r in perplexity.items())
    return lines + ["", f"{protocols}. Gap closed = (ppl_pruned − ppl) / (ppl_pruned − ppl_dense). Tokens "
                        "seen and wall time are each heal stage's own (a merged row adds its merge); a stage "
                        "healed from another starts where that one ended."]


def healing_table(heals: list[dict]) -> list[str]:
    """What each heal stage trained, as markdown lines."""
    lines = ["| heal stage | method | from | trainable parameters | steps | tokens seen | loss first → last "
             "| held-out loss | tokens/s | training text |", "|" + "---|" * 10]
    for heal in heals:
        h, data = heal["healing"], heal["healing"].get("data") or {}
        trainable, total = h.get("trainable_parameters"), h.get("total_parameters")
        shown = _num(trainable, ",d") + (f" ({100 * trainable / total:.3f}%)" if trainable and total else "")
        text = f"{data['source']}, {data.get('train_blocks', '–')} × {data.get('block_size', '–')}" if data \
            else "–"
        cells = [heal["name"] or heal["unit"], heal["method"] or "–", heal["from"], shown,
                 _num(h.get("steps"), "d"), _num(h.get("tokens_seen"), ",d"),
                 f"{_num(h.get('first_loss'), '.3f')} → {_num(h.get('final_loss'), '.3f')}",
                 _num(h.get("eval_loss"), ".3f"), _num(h.get("tokens_per_second"), ",.0f"), text]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def heal_sparsity_lines(heals: list[dict]) -> list[str]:
    """The sparsity checks of each heal stage's model and merged model, as markdown list lines."""
    lines = []
    for heal in heals:
        if heal["mask_check"] is not None:
            verdict = "yes" if heal["mask_check"] else "NO"
            lines.append(f"- {heal['model']}: every pruned weight is +0.0: {verdict}")
        merge = heal["merge"]
        if merge and merge["sparsity_after"] is not None:
            share = 100 * merge["sparsity_after"]
            lines.append(f"- {merge['model']}: sparsity of the pruned layers {share:.2f}%")
    return lines


def heal_points(perplexity: dict[str, dict],
                heals: list[dict]) -> tuple[list[dict], float | None, str | None]:
    """Each model's perplexity on the first data set at the wall time spent from the pruned model (its
    heal and merge added to those of the stage it started from), with the point it started from.

    Returns:
        (points for :func:`plots.plot_heal_comparison`, the dense perplexity, the data set)
    """
    if not perplexity:
        return [], None, None
    dataset, row = next(iter(perplexity.items()))
    at: dict[str, tuple[float, float | None]] = {"pruned": (0.0, row.get("pruned"))}
    points = [] if row.get("pruned") is None else [
        {"model": "pruned", "stage": None, "x": 0.0, "y": row["pruned"], "start": None}]
    for heal in heals:
        steps = [(heal["model"], heal["from"], heal["seconds"])]
        if heal["merge"]:
            steps.append((heal["merge"]["model"], heal["model"], heal["merge"]["seconds"]))
        for model, source, seconds in steps:
            start = at.get(source)
            at[model] = ((start[0] if start else 0.0) + (seconds or 0.0), row.get(model))
            if row.get(model) is not None:
                points.append({"model": model, "stage": heal["name"], "x": at[model][0], "y": row[model],
                               "start": start if start and start[1] is not None else None})
    return points, row.get("dense"), dataset


def heal_plots(report: dict, run_dir: Path, model: str) -> dict[str, Path | None]:
    """Named heal stages: one figure of them side by side (``healing.png``), and each block-wise stage's
    per-layer losses (``layer_losses-NAME.png``)."""
    curves = {name: plots.loss_curves(lines, "num_input_tokens_seen")
              for name, lines in report["train_logs"].items()}
    points, dense, dataset = heal_points(report["perplexity"], report["heals"])
    made = {"heal stages side by side": plots.plot_heal_comparison(
        curves, points, dense, dataset or "", run_dir / "healing.png", f"Heal stages of {model}")}
    for heal in report["heals"]:
        made[f"per-layer reconstruction loss ({heal['name']})"] = plots.plot_layer_losses(
            heal["layer_losses"], run_dir / f"layer_losses-{heal['name']}.png",
            f"Block-wise healing of {model} ({heal['name']})")
    return made
