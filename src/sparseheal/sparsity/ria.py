"""RIA: relative importance and activations, with channel reallocation for N:M.

Score ``S_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||^a``: a weight's share of its
input column's and of its output row's absolute sum, times the activation norm to the power ``a``
(default 0.5). Unstructured pruning compares the scores over the whole matrix (the reference's default;
``--ria-per-row`` compares within each output row), N:M within each group of M inputs of a row.

Channel reallocation (``--ria-permute``, N:M only) reorders the input channels before the groups are
formed, so that strong channels are not crowded into one group: channels sorted by their summed score
are dealt in M rounds of ``in / M``, round ``r`` filling position ``r`` of every group, ascending when
``r`` is even and descending when odd (a snake); the N:M mask is chosen in that order. The mask is then
N:M along the permuted inputs, not the stored ones: the order is saved with the masks (``input_orders``
in the masks file), and a kernel gathers its inputs by it.

Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language Models",
ICLR 2024, https://openreview.net/forum?id=Tr0lPx9woF. Their code prunes ``numel * s + 1`` weights and
ties at a threshold (``metric <= sorted[k]``); here exactly ``floor(numel * s)``, ties by position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseheal.checks import non_negative
from sparseheal.errors import ConfigError
from sparseheal.registry import PRUNERS
from sparseheal.settings import Settings, setting
from sparseheal.sparsity.masks import mask_from_scores, nm_mask
from sparseheal.sparsity.wanda import WandaPruner

__all__ = ["RiaSettings", "ria_scores", "snake_order", "RiaPruner"]


@dataclass
class RiaSettings(Settings):
    """RIA's own options (the reference code's defaults)."""

    ria_power: float = setting(0.5, "ria: exponent a of the activation norm ||X_j||^a.", check=non_negative())
    ria_per_row: bool = setting(False, "ria: compare scores within each output row instead of over the whole "
                                       "matrix (unstructured).")
    ria_permute: bool = setting(False, "ria: channel reallocation before N:M groups are formed (the mask is "
                                       "N:M along the saved input order; N:M only).")

    def check_pattern(self, pattern) -> None:
        if self.ria_permute and pattern.kind != "nm":
            raise ConfigError("--ria-permute", "applies to N:M patterns only (it forms the groups of M); "
                                               "drop it or pass --pattern N:M")
        if self.ria_per_row and pattern.kind != "unstructured":
            raise ConfigError("--ria-per-row", "applies to unstructured pruning only (a pattern compares "
                                               "within its own groups)")


def ria_scores(weight: torch.Tensor, mean_sq_input: torch.Tensor, power: float) -> torch.Tensor:
    """``(|W| / column sums + |W| / row sums) * sqrt(E[x^2])^a``; a column or row of zeros scores 0.

    Args:
        weight: (out, in) weight.
        mean_sq_input: (in,) mean over calibration tokens of each squared input feature.
        power: the exponent ``a``.

    Returns:
        (out, in) float32 scores.
    """
    magnitude = weight.detach().abs().float()  # (out, in)
    col = magnitude.sum(dim=0, keepdim=True)  # (1, in)
    row = magnitude.sum(dim=1, keepdim=True)  # (out, 1)
    relative = magnitude / col.where(col > 0, 1.0) + magnitude / row.where(row > 0, 1.0)  # (out, in)
    return relative * mean_sq_input.float().sqrt().reshape(1, -1).pow(power)


def snake_order(scores: torch.Tensor, m: int) -> torch.Tensor:
    """The reallocated input order: position ``g * m + r`` holds the channel dealt to group ``g`` in
    round ``r``.

    When ``in`` is not a multiple of ``m``, the ``in mod m`` channels of lowest summed score form the
    trailing partial group.

    Args:
        scores: (out, in) scores.
        m: group size.

    Returns:
        (in,) long: ``order[p]`` is the stored input channel at permuted position ``p``.
    """
    ranked = torch.sort(scores.sum(dim=0), stable=True).indices  # (in,) ascending summed score
    tail, ranked = ranked[: scores.shape[1] % m], ranked[scores.shape[1] % m :]
    order = torch.empty_like(ranked)
    per_round = ranked.numel() // m
    for r in range(m):
        chunk = ranked[r * per_round : (r + 1) * per_round]
        order[r::m] = chunk if r % 2 == 0 else chunk.flip(0)
    return torch.cat([order, tail])


@PRUNERS.register("ria")
class RiaPruner(WandaPruner):
    """Wanda's activation statistic, RIA's score; the reallocated input order kept in ``input_order``."""

    settings = RiaSettings

    def __init__(self, module, options: RiaSettings | None = None) -> None:
        super().__init__(module, options or RiaSettings())

    @property
    def per_row(self) -> bool:
        return self.options.ria_per_row

    def scores(self, weight: torch.Tensor) -> torch.Tensor:
        if self.sq_sum is None:
            raise RuntimeError("ria needs calibration inputs before pruning")
        return ria_scores(weight, self.sq_sum / self.tokens, self.options.ria_power)  # (out, in)

    def select(self, weight: torch.Tensor, nm: tuple[int, int] | None, sparsity: float) -> torch.Tensor:
        scores = self.scores(weight)  # (out, in)
        if nm is None or not self.options.ria_permute:
            return mask_from_scores(scores, nm, sparsity, per_row=self.options.ria_per_row)
        order = snake_order(scores, nm[1])  # (in,)
        keep = torch.empty_like(scores, dtype=torch.bool)
        keep[:, order] = nm_mask(scores[:, order], *nm)  # N:M along the permuted inputs
        self.input_order = order
        return keep
