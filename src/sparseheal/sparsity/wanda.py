"""Wanda: pruning by weights and activations.

Score ``S_ij = |W_ij| * ||X_j||``, where ``||X_j||`` is the root mean square of input feature j over
all calibration tokens, compared within each output row (unstructured) or within each group of M
inputs of a row (N:M). Sun et al., "A Simple and Effective Pruning Approach for Large Language
Models", https://arxiv.org/abs/2306.11695.
"""

from __future__ import annotations

import torch

from sparseheal.registry import PRUNERS
from sparseheal.sparsity.base import LinearPruner
from sparseheal.sparsity.masks import mask_from_scores

__all__ = ["wanda_scores", "WandaPruner"]


def wanda_scores(weight: torch.Tensor, mean_sq_input: torch.Tensor) -> torch.Tensor:
    """S = |W| * sqrt(E[x^2]) per input column.

    Args:
        weight: (out, in) weight.
        mean_sq_input: (in,) mean over calibration tokens of each squared input feature.

    Returns:
        (out, in) float32 scores.
    """
    return weight.detach().abs().float() * mean_sq_input.float().sqrt().reshape(1, -1)


@PRUNERS.register("wanda")
class WandaPruner(LinearPruner):
    """Accumulates the per-column sum of squared inputs, then prunes per output row."""

    statistics = ("sq_sum", "tokens")

    def __init__(self, module: torch.nn.Module, options: None = None) -> None:
        super().__init__(module, options)
        self.sq_sum: torch.Tensor | None = None
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).float()  # (B*T, in)
        batch_sq = flat.pow(2).sum(dim=0)  # (in,)
        self.sq_sum = batch_sq if self.sq_sum is None else self.sq_sum + batch_sq
        self.tokens += flat.shape[0]

    def select(self, weight: torch.Tensor, nm: tuple[int, int] | None, sparsity: float) -> torch.Tensor:
        if self.sq_sum is None:
            raise RuntimeError("wanda needs calibration inputs before pruning")
        scores = wanda_scores(weight, self.sq_sum / self.tokens)
        return mask_from_scores(scores, nm, sparsity, per_row=True)
