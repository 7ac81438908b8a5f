"""SparseGPT: one-shot pruning with optimal-brain-surgeon weight reconstruction.

With the layer-input Hessian ``H = 2/n * sum_t x_t x_t^T`` (dampened by 1% of its mean diagonal),
columns are processed left to right in blocks of 128. Within a block the pruned set is chosen by
``W_ij^2 / [H^-1]_jj^2`` (the OBS saliency), and each column's error
``e = (w - q) / [H^-1]_jj`` is spread over the not-yet-processed columns: ``W_:,j+1: -= e [H^-1]_j,j+1:``
(using the upper Cholesky factor of ``H^-1``). Frantar & Alistarh, "SparseGPT: Massive Language Models
Can Be Accurately Pruned in One-Shot", https://arxiv.org/abs/2301.00774.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseheal.checks import non_negative, positive
from sparseheal.registry import PRUNERS
from sparseheal.settings import Settings, setting
from sparseheal.sparsity.base import LinearPruner
from sparseheal.sparsity.masks import nm_mask, unstructured_mask

__all__ = ["SparseGPTSettings", "inverse_hessian_factor", "sparsegpt_prune", "SparseGPTPruner"]


@dataclass
class SparseGPTSettings(Settings):
    """SparseGPT's own options (the reference code's defaults)."""

    sparsegpt_block_size: int = setting(128, "sparsegpt: columns per lazy-update block.", check=positive)
    sparsegpt_dampening: float = setting(0.01, "sparsegpt: Hessian dampening, a fraction of its mean "
                                               "diagonal.", check=non_negative())


def inverse_hessian_factor(
    hessian: torch.Tensor, weight: torch.Tensor, percdamp: float
) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian; zeroes weights of dead inputs in place.

    Args:
        hessian: (in, in) float32, modified in place.
        weight: (out, in) float32, columns of dead inputs (zero diagonal) are zeroed in place.

    Returns:
        (in, in) upper-triangular U with U^T U = (H + damp I)^-1.
    """
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(hessian))
    hessian.diagonal().add_(damp)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True)


def _block_mask(w_block: torch.Tensor, hinv_diag: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured pruned set of one block: the lowest W^2 / d^2 over the whole block."""
    saliency = w_block.pow(2) / hinv_diag.reshape(1, -1).pow(2)  # (out, cols)
    return ~unstructured_mask(saliency, sparsity, per_row=False)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    nm: tuple[int, int] | None,
    sparsity: float,
    blocksize: int,
    percdamp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prunes ``weight`` with OBS reconstruction.

    Args:
        weight: (out, in) weight (any float dtype; computed in float32).
        hessian: (in, in) float32 Hessian of the layer inputs (consumed).
        nm: (n, m) to keep n of every m inputs, or None for unstructured.
        sparsity: fraction pruned (unstructured).
        blocksize: columns processed per lazy-update block (rounded down to a multiple of M for N:M).
        percdamp: dampening as a fraction of the mean Hessian diagonal.

    Returns:
        (updated (out, in) float32 weight with pruned entries zero, (out, in) bool keep-mask)
    """
    if nm is not None:  # blocks start on group boundaries, so groups never straddle two blocks
        blocksize = max(nm[1], blocksize - blocksize % nm[1])
    w = weight.detach().float().clone()  # (out, in)
    hinv = inverse_hessian_factor(hessian, w, percdamp)  # (in, in)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()  # (out, b)
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]  # (b, b)
        if nm is None:
            p1 = _block_mask(w1, torch.diag(h1), sparsity)  # (out, b) True = pruned
        else:
            p1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                sal = w1[:, i : i + nm[1]].pow(2) / torch.diag(h1)[i : i + nm[1]].reshape(1, -1).pow(2)
                p1[:, i : i + nm[1]] = ~nm_mask(sal, *nm)
            col = w1[:, i]  # (out,)
            q = col.masked_fill(p1[:, i], 0.0)
            err = (col - q) / h1[i, i]  # (out,)
            w1[:, i:] -= err.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = p1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w.masked_fill_(pruned, 0.0)
    return w, ~pruned


@PRUNERS.register("sparsegpt")
class SparseGPTPruner(LinearPruner):
    """Accumulates ``H = 2/n sum x x^T`` in float32, then prunes with reconstruction."""

    settings = SparseGPTSettings
    statistics = ("hessian", "tokens")

    def __init__(self, module: torch.nn.Module, options: SparseGPTSettings | None = None) -> None:
        super().__init__(module, options or SparseGPTSettings())
        self.hessian: torch.Tensor | None = None
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).float()  # (B*T, in)
        gram = flat.t() @ flat  # (in, in)
        self.hessian = gram if self.hessian is None else self.hessian.add_(gram)
        self.tokens += flat.shape[0]

    def select(self, weight: torch.Tensor, nm: tuple[int, int] | None, sparsity: float) -> torch.Tensor:
        if self.hessian is None:
            raise RuntimeError("sparsegpt needs calibration inputs before pruning")
        hessian = self.hessian.mul_(2.0 / self.tokens)
        opts = self.options
        new_weight, mask = sparsegpt_prune(weight, hessian, nm, sparsity, opts.sparsegpt_block_size,
                                           opts.sparsegpt_dampening)
        weight.copy_(new_weight.to(weight.dtype))
        self.hessian = None
        return mask
