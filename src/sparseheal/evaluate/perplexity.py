"""Perplexity under the Wanda protocol.

Protocol ``wanda``: the evaluation token stream is cut into non-overlapping windows of ``seqlen``
tokens (the tail shorter than a window is dropped); each window's loss is the mean next-token
cross-entropy over positions 1..seqlen-1, and ``ppl = exp(mean over windows of the window losses)``.
Sun et al., https://arxiv.org/abs/2306.11695 (the evaluation of their reference code).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparseheal.card_stages import number
from sparseheal.charts import grouped_bars, models_of, pyplot, save
from sparseheal.checks import positive, window_length
from sparseheal.data import check_source, eval_tokens
from sparseheal.errors import ConfigError, StageError
from sparseheal.evaluate.base import Evaluator
from sparseheal.models import (
    check_positions,
    check_seqlen,
    load_config,
    load_tokenizer,
    max_positions,
    resolve_source,
)
from sparseheal.registry import EVALUATORS
from sparseheal.settings import Settings, setting

__all__ = ["PerplexitySettings", "PerplexityResult", "window_losses", "perplexity", "eval_streams",
           "PerplexityEvaluator"]

log = logging.getLogger(__name__)


_MAX_LOG = math.log(1.7976931348623157e308)  # the largest mean loss whose exp is a float


@dataclass
class PerplexitySettings(Settings):
    """What perplexity is measured on, in which windows, and how many windows per forward pass."""

    dataset: str = setting("wikitext2", "wikitext2, c4, ptb or a local file; several separated by commas "
                                        "(none: no perplexity).")
    seqlen: int | None = setting(None, "window length, at least 2 (default min(2048, the model's "
                                       "positions)).", check=window_length)
    max_windows: int | None = setting(None, "evaluate only the first K windows.", check=positive)

    @property
    def datasets(self) -> list[str]:
        """The data sets named in ``--dataset`` (``none`` names none)."""
        return [d.strip() for d in self.dataset.split(",") if d.strip() and d.strip() != "none"]


@dataclass
class PerplexityResult:
    """One perplexity measurement with everything needed to compare it with another."""

    dataset: str
    protocol: str
    seqlen: int
    windows: int
    tokens: int
    dtype: str
    ppl: float
    seconds: float = 0.0
    tokens_per_second: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


_CHUNK_BYTES = 16 * 2**20  # per cross-entropy call: small enough to be served from the allocator's cache


def _window_loss(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per window. logits (B, T, V), inputs (B, T) -> (B,).

    The loss is computed over a few rows of positions at a time: per row it is the same computation as
    one call over all rows (bit for bit), without a second (B*(T-1), V) tensor for the log-softmax, whose
    allocation and first touch cost more than the arithmetic.
    """
    batch, length, vocab = logits.shape
    shift_logits = logits[:, :-1].float().reshape(-1, vocab)  # (B*(T-1), V), softmax over contiguous rows
    shift_labels = inputs[:, 1:].reshape(-1)  # (B*(T-1),)
    rows = max(1, _CHUNK_BYTES // (4 * vocab))
    chunks = zip(shift_logits.split(rows), shift_labels.split(rows), strict=True)
    loss = torch.cat([F.cross_entropy(x, y, reduction="none") for x, y in chunks])  # (B*(T-1),)
    return loss.view(batch, length - 1).mean(dim=1)


@torch.no_grad()
def window_losses(
    model: nn.Module, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, batch_size: int = 1
) -> torch.Tensor:
    """Mean loss of each non-overlapping window.

    Args:
        tokens: (1, N) token stream.

    Returns:
        (W,) float32 loss per window.
    """
    n_windows = tokens.shape[1] // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = tokens[0, : n_windows * seqlen].reshape(n_windows, seqlen)  # (W, T)
    device = next(model.parameters()).device
    losses = []
    for start in tqdm(range(0, n_windows, batch_size), desc=f"perplexity (seqlen {seqlen})", unit="batch"):
        batch = windows[start : start + batch_size].to(device)  # (B, T)
        logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
        losses.append(_window_loss(logits, batch).cpu())
    return torch.cat(losses) if losses else torch.empty(0)


def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    dataset: str,
    seqlen: int,
    max_windows: int | None = None,
    batch_size: int = 1,
) -> PerplexityResult:
    """Wanda-protocol perplexity of ``model`` on a (1, N) token stream."""
    if tokens.shape[1] < seqlen:
        n_tokens = tokens.shape[1]
        raise ConfigError("--seqlen", f"{seqlen} is longer than the {dataset} stream ({n_tokens} tokens)")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    losses = window_losses(model, tokens, seqlen, max_windows, batch_size)
    seconds = time.perf_counter() - start
    model.train(was_training)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    n_tokens = losses.numel() * seqlen
    mean = losses.double().mean().item()
    if not math.isfinite(mean) or mean > _MAX_LOG:
        advice = "check its weights" + ("" if dtype == "float32" else ", or evaluate in float32 (--dtype)")
        raise StageError("MODEL", f"the mean loss over {losses.numel()} {dataset} windows is {mean:.4g} in "
                                  f"{dtype}: the model's outputs are not finite or overflow (its exp is no "
                                  f"number); {advice}")
    return PerplexityResult(
        dataset=dataset,
        protocol="wanda",
        seqlen=seqlen,
        windows=losses.numel(),
        tokens=n_tokens,
        dtype=dtype,
        ppl=math.exp(mean),
        seconds=round(seconds, 3),
        tokens_per_second=round(n_tokens / seconds, 1) if seconds > 0 else 0.0,
    )


def eval_streams(model: str, ppl: PerplexitySettings,
                 data_dir: str | None) -> tuple[int, dict[str, torch.Tensor]]:
    """The window length and each data set's (1, N) token stream, from the config and tokenizer alone."""
    config = load_config(model)
    seqlen = ppl.seqlen or min(2048, max_positions(config) or 2048)
    check_positions(config, seqlen, "--seqlen")
    tokenizer = load_tokenizer(resolve_source(model))
    streams = {}
    for name in ppl.datasets:
        streams[name] = eval_tokens(name, tokenizer, seqlen, data_dir)  # (1, N)
        if streams[name].shape[1] < seqlen:
            n_tokens = streams[name].shape[1]
            raise ConfigError("--seqlen", f"{seqlen} is longer than the {name} stream ({n_tokens} tokens)")
    return seqlen, streams


@EVALUATORS.register("perplexity")
class PerplexityEvaluator(Evaluator):
    """Perplexity of each ``--dataset`` under the Wanda protocol; a result is a list of
    :class:`PerplexityResult` dicts, one per data set (the report's ``results``)."""

    settings = PerplexitySettings
    key = "results"
    title = "Perplexity (lower is better)"
    caption = "perplexity"

    def wanted(self) -> bool:
        return True  # with --dataset none too: a report always holds its (then empty) list of results

    def inputs(self) -> list[tuple[str, str]]:
        return [("--dataset", d) for d in self.options.datasets]

    def check(self, model: str | None) -> None:
        for name in self.options.datasets:
            check_source(name, "--dataset")
        if self.options.seqlen is not None and model is not None:
            check_seqlen(model, self.options.seqlen)

    def prepare(self, model: str, stack) -> None:
        self.seqlen, self.streams = eval_streams(model, self.options, self.data_dir)

    def run(self, lm: nn.Module, tokenizer, batch_size: int) -> list[dict]:
        return [perplexity(lm, tokens, name, self.seqlen, self.options.max_windows, batch_size).to_dict()
                for name, tokens in self.streams.items()]

    @classmethod
    def lines(cls, result: list[dict]) -> list[str]:
        out = [f"{'dataset':<12} {'protocol':<9} {'seqlen':>6} {'windows':>7} {'tokens':>9} {'dtype':<9} "
               f"{'ppl':>10}"]
        return out + [f"{r['dataset']:<12} {r['protocol']:<9} {r['seqlen']:>6} {r['windows']:>7} "
                      f"{r['tokens']:>9} {r['dtype']:<9} {r['ppl']:>10.3f}" for r in result]

    @classmethod
    def card_lines(cls, results: dict[str, list[dict]]) -> list[str]:
        rows = [(label, r) for label, result in results.items() for r in result]
        lines = [f"{cls.title}:", "", "| model | dataset | protocol | seqlen | windows | tokens | dtype | "
                 "perplexity |", "|---|---|---|---:|---:|---:|---|---:|"]
        return lines + [f"| `{label}` | `{r.get('dataset')}` | `{r.get('protocol')}` | "
                        f"{number(r.get('seqlen'))} | {number(r.get('windows'))} | "
                        f"{number(r.get('tokens'))} | `{r.get('dtype')}` | {number(r.get('ppl'))} |"
                        for label, r in rows]

    @classmethod
    def table(cls, results: dict[str, list[dict]]) -> dict:
        """{data set: {protocol, seqlen, windows, tokens, MODEL: ppl, ...}}."""
        table: dict[str, dict] = {}
        for model, result in results.items():
            for r in result:
                row = table.setdefault(r["dataset"], {"protocol": r["protocol"], "seqlen": r["seqlen"],
                                                      "windows": r["windows"], "tokens": r["tokens"]})
                row[model] = r["ppl"]
        return table

    @classmethod
    def plot(cls, table: dict, path, title: str):
        """Perplexity per data set for each model; log scale when they differ a lot."""
        table = {d: {m: v for m, v in row.items() if m not in _ROW_FIELDS} for d, row in table.items()}
        if not table:
            return None
        series = {m: [table[d].get(m) for d in table] for m in models_of(table)}
        fig, ax = pyplot().subplots(figsize=(max(6, 2.5 * len(table) + 3), 4))
        grouped_bars(ax, list(table), series, "{:.2f}")
        values = [v for vs in series.values() for v in vs if v]
        if values and max(values) / min(values) > 20:
            ax.set_yscale("log")
            ax.set_ylabel("perplexity, log scale (lower is better)")
        else:
            ax.set_ylim(0, 1.12 * max(values))
            ax.set_ylabel("perplexity (lower is better)")
        ax.set_xlabel("evaluation data set")
        ax.set_title(title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="y", alpha=0.3)
        return save(fig, path)


_ROW_FIELDS = ("protocol", "seqlen", "windows", "tokens", "gap_closed", "gap_closed_merged")
