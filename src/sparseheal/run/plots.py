"""PNG plots of a run (matplotlib, Agg backend): training loss, per-layer sparsity and the heal stages of
a run side by side (each evaluation draws its own results: ``Evaluator.plot``)."""

from __future__ import annotations

import re
from pathlib import Path

from sparseheal.charts import COLORS as _COLORS
from sparseheal.charts import PALETTE as _PALETTE
from sparseheal.charts import pyplot as _pyplot
from sparseheal.charts import save as _save

__all__ = ["loss_curves", "moving_average", "plot_loss", "plot_layer_losses", "plot_sparsity",
           "plot_heal_comparison"]

_LAYER_RE = re.compile(r"\.(\d+)\.")


def loss_curves(log_lines: list[dict], key: str = "step") -> tuple[list[tuple[int, float]],
                                                                     list[tuple[int, float]]]:
    """(step, loss) and (step, eval_loss) points from train_log.jsonl entries; with ``key`` another
    logged count instead of the step (``num_input_tokens_seen``: tokens seen).

    A resumed run logs the steps between its last checkpoint and the interruption twice; the
    later entry of a step wins.
    """
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for entry in log_lines:
        step = entry.get(key)
        if step is None:
            continue
        if isinstance(entry.get("loss"), (int, float)):
            train[int(step)] = float(entry["loss"])
        if isinstance(entry.get("eval_loss"), (int, float)):
            evals[int(step)] = float(entry["eval_loss"])
    return sorted(train.items()), sorted(evals.items())


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values: out[i] = mean(values[max(0, i - window + 1) : i + 1])."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out




def plot_loss(log_lines: list[dict], path: Path, title: str) -> Path | None:
    """Training and held-out loss (nats per token) against the optimizer step."""
    train, evals = loss_curves(log_lines)
    if not train and not evals:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    if len(train) >= 8:  # per-step losses are noisy; a trailing mean shows the trend
        steps, losses = zip(*train, strict=True)
        window = max(3, len(train) // 5)
        ax.plot(steps, losses, marker="o", markersize=2, linewidth=0.8, alpha=0.35, color="#4c72b0",
                label="training loss")
        ax.plot(steps, moving_average(list(losses), window), linewidth=2.2, color="#4c72b0",
                label=f"training loss, mean of last {window} logs")
    elif train:
        ax.plot(*zip(*train, strict=True), marker="o", markersize=3, label="training loss", color="#4c72b0")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="s", markersize=6, linestyle="--", label="held-out loss",
                color="#dd8452")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_layer_losses(layers: list[dict], path: Path, title: str) -> Path | None:
    """Block-wise healing: each decoder layer's reconstruction MSE before and after its training."""
    if not layers:
        return None
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    index = [r["index"] for r in layers]
    ax.plot(index, [r["loss_before"] for r in layers], marker="o", markersize=3, label="before (pruned)")
    ax.plot(index, [r["loss_after"] for r in layers], marker="s", markersize=3, label="after (healed)")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(_pyplot().MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("MSE to the dense layer's output, log scale")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _layer_index(name: str) -> int | None:
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def plot_sparsity(layers: dict[str, float], target: float | None, path: Path, title: str) -> Path | None:
    """Sparsity of every pruned linear, by decoder layer and module kind."""
    if not layers:
        return None
    kinds: dict[str, list[tuple[int, float]]] = {}
    for position, (name, value) in enumerate(layers.items()):
        index = _layer_index(name)
        x = position if index is None else index
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append((x, 100 * value))
    fig, ax = _pyplot().subplots(figsize=(8, 4))
    width = 0.6 / max(len(kinds), 1)  # module kinds side by side within a layer
    for i, (kind, points) in enumerate(kinds.items()):
        xs = [x + (i - (len(kinds) - 1) / 2) * width for x, _ in points]
        ys = [y for _, y in points]
        ax.plot(xs, ys, marker="o", markersize=4, linestyle="none", alpha=0.85, label=kind)
    ax.xaxis.set_major_locator(_pyplot().MaxNLocator(integer=True))
    if target is not None:
        ax.axhline(100 * target, color="black", linestyle=":", linewidth=1, label=f"target {100 * target:g}%")
    values = [100 * v for v in layers.values()]
    low, high = min(values), max(values)
    pad = max(1.0, (high - low) * 0.2)
    ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("weights pruned (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="module")
    return _save(fig, path)


def _loss_panel(ax, curves: dict[str, tuple[list, list]], colors: dict[str, str]) -> None:
    """Training loss (trailing mean, thin) and held-out loss (markers) of each heal stage by tokens."""
    for label, (train, evals) in curves.items():
        color = colors[label]
        if train:
            tokens, losses = zip(*train, strict=True)
            window = max(1, len(train) // 5)
            mean = f" (mean of last {window})" if window > 1 else ""
            ax.plot(tokens, moving_average(list(losses), window), linewidth=1.2, alpha=0.6, color=color,
                    label=f"{label}: training loss{mean}")
        if evals:
            ax.plot(*zip(*evals, strict=True), marker="s", markersize=5, linestyle="--", color=color,
                    label=f"{label}: held-out loss")
    ax.set_xlabel("tokens seen by the heal stage")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _ppl_panel(ax, points: list[dict], dense: float | None, colors: dict[str, str], dataset: str) -> None:
    """Each model's perplexity at the wall time spent healing from the pruned model, joined to the
    model it started from."""
    for p in points:
        color = colors.get(p["stage"], _COLORS.get(p["model"], "#444444"))
        if p.get("start") is not None:
            (x0, y0) = p["start"]
            ax.plot([x0, p["x"]], [y0, p["y"]], color=color, linewidth=1,
                    linestyle=":" if p["model"].startswith("merged") else "-")
        ax.plot(p["x"], p["y"], marker="o", color=color, linestyle="none")
        below = p["model"].startswith("merged")  # a merged model sits next to its healed one
        ax.annotate(p["model"], (p["x"], p["y"]), fontsize=7, xytext=(4, -10 if below else 4),
                    textcoords="offset points")
    if dense is not None:
        ax.axhline(dense, color=_COLORS["dense"], linestyle="--", linewidth=1, label=f"dense {dense:.2f}")
        ax.legend(fontsize=7)
    ax.set_xlabel("wall time from the pruned model (s)")
    ax.set_ylabel(f"{dataset} perplexity (lower is better)")
    ax.grid(alpha=0.3)


def plot_heal_comparison(curves: dict[str, tuple[list, list]], points: list[dict], dense: float | None,
                         dataset: str, path: Path, title: str) -> Path | None:
    """The heal stages of a run on shared axes: loss against tokens seen (stages that log one) and the
    perplexity each model reached against the wall time it took.

    Args:
        curves: per heal stage, its (tokens, training loss) and (tokens, held-out loss) points.
        points: per model, {"model", "stage", "x" (seconds), "y" (perplexity), "start" ((x, y) of the
            model it started from, or None)}.
        dense: the dense model's perplexity (a reference line), or None.
        dataset: the data set of the perplexities.
        path: the PNG to write.
        title: the figure's title.

    Returns:
        ``path``, or None when there is nothing to plot.
    """
    curves = {k: v for k, v in curves.items() if v[0] or v[1]}
    if not curves and not points:
        return None
    stages = list(dict.fromkeys([*curves, *(p["stage"] for p in points if p["stage"])]))
    colors = {s: _PALETTE[i % len(_PALETTE)] for i, s in enumerate(stages)}
    panels = [p for p in (curves and "loss", points and "ppl") if p]
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "loss":
            _loss_panel(ax, curves, colors)
        else:
            _ppl_panel(ax, points, dense, colors, dataset)
    fig.suptitle(title)
    return _save(fig, path)
