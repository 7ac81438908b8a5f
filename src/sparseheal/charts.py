"""Chart pieces shared by the run report's plots and the evaluators' plots (matplotlib, Agg backend,
loaded by the first chart rather than when a command starts)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["COLORS", "PALETTE", "pyplot", "save", "grouped_bars", "models_of"]

COLORS = {"dense": "#4c72b0", "pruned": "#c44e52", "healed": "#55a868", "merged": "#8172b2"}
PALETTE = ("#55a868", "#dd8452", "#8172b2", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")


def pyplot():
    """matplotlib's pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Writes ``fig`` to ``path`` (PNG, 120 dpi), closes it and returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def grouped_bars(ax, groups: list[str], series: dict[str, list[float | None]], fmt: str) -> None:
    """One bar per series in each group, each bar annotated with its value (``fmt``); one colour per
    series across the groups (the run's models keep their usual colours)."""
    width = 0.8 / max(len(series), 1)
    others = iter(PALETTE * len(series))
    for i, (label, values) in enumerate(series.items()):
        color = COLORS.get(label) or next(others)
        for j, value in enumerate(values):
            if value is None:
                continue
            x = j + (i - (len(series) - 1) / 2) * width
            ax.bar(x, value, width, color=color, label=label if j == 0 else None)
            ax.annotate(fmt.format(value), (x, value), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(groups)), groups)


def models_of(table: dict[str, dict]) -> list[str]:
    """The models of a per-item table ({item: {model: value}}), in the order they first appear."""
    return list(dict.fromkeys(m for row in table.values() for m in row))
