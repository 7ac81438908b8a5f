"""Magnitude pruning: keep the largest |W| of each weight matrix.

Score ``S_ij = |W_ij|``, compared over the whole matrix (unstructured) or within each group of M
inputs (N:M). Needs no calibration data. Han et al., "Learning both Weights and Connections for
Efficient Neural Networks", https://arxiv.org/abs/1506.02626.
"""

from __future__ import annotations

import torch

from sparseheal.registry import PRUNERS
from sparseheal.sparsity.base import LinearPruner
from sparseheal.sparsity.masks import mask_from_scores

__all__ = ["magnitude_scores", "MagnitudePruner"]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """S = |W|, in float32. (out, in) -> (out, in)."""
    return weight.detach().abs().float()


@PRUNERS.register("magnitude")
class MagnitudePruner(LinearPruner):
    """Per-matrix threshold on |W| (one threshold per linear layer)."""

    needs_calibration = False
    kinds = ("unstructured", "nm", "vnm", "block")
    per_row = False

    def scores(self, weight: torch.Tensor) -> torch.Tensor:
        return magnitude_scores(weight)

    def select(self, weight: torch.Tensor, nm: tuple[int, int] | None, sparsity: float) -> torch.Tensor:
        return mask_from_scores(magnitude_scores(weight), nm, sparsity, per_row=False)
