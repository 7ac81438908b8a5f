"""The Wanda code's weight-update ablations: a magnitude or Wanda mask with SparseGPT's reconstruction.

Each keeps SparseGPT's column loop (blocks of ``--sparsegpt-block-size`` columns, the dampened inverse
Hessian's upper factor ``U``, each pruned column's error ``e = (w - q) / U_jj`` spread over the later
columns) and changes only which weights are pruned:

- ``ablate_mag_seq``: the mask is chosen once, before the loop, by ``|W_ij|`` over the whole matrix
  (N:M: per group), as magnitude pruning chooses it; the loop only reconstructs.
- ``ablate_wanda_seq``: likewise with Wanda's ``|W_ij| * ||X_j||`` per output row.
- ``ablate_mag_iter``: each block of columns (each N:M group) chooses its pruned set from its weights as
  the earlier blocks' updates left them, by ``|W_ij|`` over the whole block.
- ``ablate_wanda_iter``: likewise with ``|W_ij| * ||X_j||``.

Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", appendix ("weight
update"), https://arxiv.org/abs/2306.11695; their code's ``prune_ablate`` and ``AblateGPT.fasterprune``.
Their ablation statistic weights the k-th calibration sample by ``1/k`` (a running-mean artefact); here
``||X_j||`` is Wanda's own (every token alike), the statistic the paper defines.
"""

from __future__ import annotations

import torch

from sparseheal.registry import PRUNERS
from sparseheal.sparsity.masks import mask_from_scores
from sparseheal.sparsity.sparsegpt import Saliency, SparseGPTPruner

__all__ = ["magnitude_saliency", "wanda_saliency", "AblateMagSeq", "AblateWandaSeq", "AblateMagIter",
           "AblateWandaIter"]


def magnitude_saliency(wt: torch.Tensor, hdiag: torch.Tensor, start: int) -> torch.Tensor:
    """``|W|`` of (b, out) transposed columns (the Hessian's diagonal is not read)."""
    return wt.abs()


def wanda_saliency(mean_sq: torch.Tensor) -> Saliency:
    """``|W_ij| * sqrt(E[x_j^2])`` of (b, out) transposed columns starting at column ``start``."""
    norms = mean_sq.float().sqrt()  # (in,)

    def saliency(wt: torch.Tensor, hdiag: torch.Tensor, start: int) -> torch.Tensor:
        return wt.abs() * norms[start : start + wt.shape[0]].reshape(-1, 1)  # (b, out)

    return saliency


def _fixed_mask(weights: list[torch.Tensor], scores: list[torch.Tensor], nm: tuple[int, int] | None,
                sparsity: float, per_row: bool) -> torch.Tensor:
    """The stacked (Σ out_i, in) keep-mask, each weight's chosen alone from its (out_i, in) scores."""
    return torch.cat([mask_from_scores(s, nm, sparsity, per_row=per_row) for s in scores])


@PRUNERS.register("ablate_mag_seq")
class AblateMagSeq(SparseGPTPruner):
    """Magnitude mask chosen once, then SparseGPT's reconstruction of the kept weights."""

    @classmethod
    def mask_rule(cls, mean_sq, weights, nm, sparsity):
        scores = [w.detach().abs().float() for w in weights]  # (out_i, in)
        return None, _fixed_mask(weights, scores, nm, sparsity, per_row=False)


@PRUNERS.register("ablate_wanda_seq")
class AblateWandaSeq(SparseGPTPruner):
    """Wanda mask chosen once (per output row), then SparseGPT's reconstruction of the kept weights."""

    @classmethod
    def mask_rule(cls, mean_sq, weights, nm, sparsity):
        norms = mean_sq.float().sqrt().reshape(1, -1)  # (1, in)
        scores = [w.detach().abs().float() * norms for w in weights]  # (out_i, in)
        return None, _fixed_mask(weights, scores, nm, sparsity, per_row=True)


@PRUNERS.register("ablate_mag_iter")
class AblateMagIter(SparseGPTPruner):
    """Each block's (or N:M group's) pruned set by |W| of its updated weights, then reconstruction."""

    @classmethod
    def mask_rule(cls, mean_sq, weights, nm, sparsity):
        return magnitude_saliency, None


@PRUNERS.register("ablate_wanda_iter")
class AblateWandaIter(SparseGPTPruner):
    """Each block's (or N:M group's) pruned set by Wanda's score of its updated weights, then
    reconstruction."""

    @classmethod
    def mask_rule(cls, mean_sq, weights, nm, sparsity):
        return wanda_saliency(mean_sq), None
