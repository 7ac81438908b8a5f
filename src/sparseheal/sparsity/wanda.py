"""Wanda: pruning by weights and activations.

Score ``S_ij = |W_ij| * ||X_j||``, where ``||X_j||`` is the root mean square of input feature j over
all calibration tokens, compared within each output row (unstructured) or within each group of M
inputs of a row (N:M). Sun et al., "A Simple and Effective Pruning Approach for Large Language
Models", https://arxiv.org/abs/2306.11695.

The variant of their appendix (``--wanda-variant``, the reference code's ``--use_variant``) prunes each
row's lowest scores up to a share ``alpha`` of the row's summed score, one ``alpha`` for the whole
matrix, found by bisection so that the matrix's sparsity is within 0.001 of the target:
row ``r`` prunes ``{j : S_rj <= t_r}``, ``t_r`` the largest sorted score whose cumulative sum is at most
``alpha * sum_j S_rj``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseheal.errors import ConfigError
from sparseheal.registry import PRUNERS
from sparseheal.settings import Settings, setting
from sparseheal.sparsity.base import LinearPruner
from sparseheal.sparsity.masks import mask_from_scores

__all__ = ["WandaSettings", "wanda_scores", "variant_mask", "WandaPruner"]

_TOLERANCE = 0.001  # the reference's: on the sparsity reached and on the width of alpha's interval


@dataclass
class WandaSettings(Settings):
    """Wanda's own option."""

    wanda_variant: bool = setting(False, "wanda: the appendix variant, each row pruned to one share alpha of "
                                         "its summed score (alpha by bisection; unstructured only).")

    def check_pattern(self, pattern) -> None:
        if self.wanda_variant and pattern.kind != "unstructured":
            raise ConfigError("--wanda-variant", "applies to unstructured pruning only (a pattern fixes the "
                                                 "count of every group); drop it or pass --pattern "
                                                 "unstructured")


def wanda_scores(weight: torch.Tensor, mean_sq_input: torch.Tensor) -> torch.Tensor:
    """S = |W| * sqrt(E[x^2]) per input column.

    Args:
        weight: (out, in) weight.
        mean_sq_input: (in,) mean over calibration tokens of each squared input feature.

    Returns:
        (out, in) float32 scores.
    """
    return weight.detach().abs().float() * mean_sq_input.float().sqrt().reshape(1, -1)


def variant_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The appendix variant's keep-mask: ``alpha`` bisected on [0, 0.8] from 0.4 until the matrix's
    sparsity is within 0.001 of ``sparsity`` or the interval is narrower than 0.001.

    Args:
        scores: (out, in) Wanda scores.
        sparsity: the target fraction pruned.

    Returns:
        (out, in) bool keep-mask (its sparsity is the one the bisection reached).
    """
    ordered = torch.sort(scores, dim=1, stable=True).values  # (out, in) ascending
    cumulative = torch.cumsum(ordered, dim=1)  # (out, in)
    totals = scores.sum(dim=1, keepdim=True)  # (out, 1)

    def pruned_at(alpha: float) -> tuple[torch.Tensor, float]:
        count = (cumulative <= alpha * totals).sum(dim=1, keepdim=True)  # (out, 1) scores within alpha
        threshold = ordered.gather(1, (count - 1).clamp(min=0))  # (out, 1)
        pruned = (scores <= threshold) & (count > 0)  # a row with no score within alpha prunes none
        return pruned, float(pruned.sum()) / pruned.numel()

    alpha, low, high = 0.4, 0.0, 0.8
    pruned, reached = pruned_at(alpha)
    while abs(reached - sparsity) > _TOLERANCE and high - low >= _TOLERANCE:
        if reached > sparsity:
            alpha, high = (alpha + low) / 2, alpha
        else:
            alpha, low = (alpha + high) / 2, alpha
        pruned, reached = pruned_at(alpha)
    return ~pruned


@PRUNERS.register("wanda")
class WandaPruner(LinearPruner):
    """Accumulates the per-column sum of squared inputs, then prunes per output row."""

    settings = WandaSettings
    statistics = ("sq_sum", "tokens")
    kinds = ("unstructured", "nm", "vnm", "block")

    def __init__(self, module: torch.nn.Module, options: WandaSettings | None = None) -> None:
        super().__init__(module, options or WandaSettings())
        self.sq_sum: torch.Tensor | None = None
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).float()  # (B*T, in)
        batch_sq = flat.pow(2).sum(dim=0)  # (in,)
        self.sq_sum = batch_sq if self.sq_sum is None else self.sq_sum + batch_sq
        self.tokens += flat.shape[0]

    def scores(self, weight: torch.Tensor) -> torch.Tensor:
        if self.sq_sum is None:
            raise RuntimeError("wanda needs calibration inputs before pruning")
        return wanda_scores(weight, self.sq_sum / self.tokens)

    def select(self, weight: torch.Tensor, nm: tuple[int, int] | None, sparsity: float) -> torch.Tensor:
        scores = self.scores(weight)
        if self.options.wanda_variant:
            return variant_mask(scores, sparsity)
        return mask_from_scores(scores, nm, sparsity, per_row=True)
