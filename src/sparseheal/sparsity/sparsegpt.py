"""SparseGPT: one-shot pruning with optimal-brain-surgeon weight reconstruction.

With the layer-input Hessian ``H = 2/n * sum_t x_t x_t^T`` (dampened by 1% of its mean diagonal),
columns are processed left to right in blocks of 128. Within a block the pruned set is chosen by
``W_ij^2 / [H^-1]_jj^2`` (the OBS saliency), and each column's error
``e = (w - q) / [H^-1]_jj`` is spread over the not-yet-processed columns: ``W_:,j+1: -= e [H^-1]_j,j+1:``
(using the upper Cholesky factor of ``H^-1``). Frantar & Alistarh, "SparseGPT: Massive Language Models
Can Be Accurately Pruned in One-Shot", https://arxiv.org/abs/2301.00774.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch

from sparseheal.checks import non_negative, positive
from sparseheal.registry import PRUNERS
from sparseheal.settings import Settings, setting
from sparseheal.sparsity.base import LinearPruner
from sparseheal.sparsity.gram import GramSum
from sparseheal.sparsity.masks import nm_mask, unstructured_mask

__all__ = [
    "SparseGPTSettings", "Saliency", "obs_saliency", "inverse_hessian_factor", "sparsegpt_prune",
    "HessianState", "SparseGPTPruner",
]

# which weights of a block (or an N:M group) to prune: (rows (b, out) of the block's columns as updated so
# far, transposed; (b,) diagonal of U for those columns; index of the first column) -> (b, out) scores,
# the lowest pruned
Saliency = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def obs_saliency(wt: torch.Tensor, hdiag: torch.Tensor, start: int) -> torch.Tensor:
    """SparseGPT's OBS saliency ``w^2 / [H^-1]_jj^2`` of (b, out) transposed columns with diagonal (b,)."""
    return wt.pow(2) / hdiag.reshape(-1, 1).pow(2)


@dataclass
class SparseGPTSettings(Settings):
    """SparseGPT's own options (the reference code's defaults)."""

    sparsegpt_block_size: int = setting(128, "sparsegpt: columns per lazy-update block.", check=positive)
    sparsegpt_dampening: float = setting(0.01, "sparsegpt: Hessian dampening, a fraction of its mean "
                                               "diagonal.", check=non_negative())


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the dampened inverse Hessian, and the inputs that never fired.

    Args:
        hessian: (in, in) float32, modified in place (dead inputs' diagonal set to 1, dampening added).
        percdamp: dampening as a fraction of the mean diagonal.

    Returns:
        ((in, in) upper-triangular U with U^T U = (H + damp I)^-1, (in,) bool True where the Hessian's
        diagonal was zero: those inputs' weights are zeroed).
    """
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(hessian))
    hessian.diagonal().add_(damp)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True), dead


def _block_mask(wt: torch.Tensor, hinv_diag: torch.Tensor, sparsity: float, saliency: Saliency,
                start: int) -> torch.Tensor:
    """Unstructured pruned set of one block, transposed: the lowest saliency over the whole block (ties
    in the weight's own row-major order)."""
    scores = saliency(wt, hinv_diag, start).t()  # (out, b)
    return (~unstructured_mask(scores, sparsity, per_row=False)).t().contiguous()  # (b, out)


def _reconstruct_block(wt: torch.Tensor, h1: torch.Tensor, pt: torch.Tensor, nm: tuple[int, int] | None,
                       saliency: Saliency = obs_saliency, start: int = 0) -> torch.Tensor:
    """Prunes one block column by column, spreading each column's error over the block's later columns.

    The block is held transposed so that a column is a contiguous row: column ``i``'s error is
    ``e = (w_i - q) / U_ii``, where ``q`` is ``w_i`` with its pruned entries zeroed, so ``w_i - q`` is
    ``w_i`` where pruned and zero where kept; every later column ``j`` of the block takes
    ``w_j -= U_ij e`` (the same products and differences as the outer-product update
    ``W_:,i: -= e U_i,i:``, so the same bits). A block holding an inf or NaN takes ``w_i - q`` itself,
    which is NaN at such a kept entry (as the reference computes it). No column is read again once its
    error is known, so the pruned entries are zeroed once, after the loop. Every step is elementwise
    along the rows, so the rows of several weights that share ``U`` may be stacked into one block.

    Args:
        wt: (b, out) float32 block of the weight, transposed; updated in place.
        h1: (b, b) the block's square of the upper factor U.
        pt: (b, out) bool pruned set; for N:M filled here group by group (from the updated weights),
            unless ``saliency`` is None (the set is given).
        nm: (n, m) pattern or None.
        saliency: the N:M groups' scores (SparseGPT's OBS saliency by default).
        start: the block's first column in the weight (for a saliency that reads per-column statistics).

    Returns:
        (b, out) the columns' errors, transposed.
    """
    b = wt.shape[0]
    errt = torch.empty_like(wt)  # (b, out)
    # every view the loop needs, made up front: per column i its row, error, pruned set, U_ii, and the
    # block's later columns with their factors U_i,i+1: as a (b - i - 1, 1) column
    hdiag = h1.diagonal()  # (b,)
    cols, errs, pruned, diag = wt.unbind(0), errt.unbind(0), pt.unbind(0), hdiag.unbind(0)
    later = [(wt[i + 1 :], h1[i, i + 1 :, None]) for i in range(b)]
    zero = wt.new_zeros(())  # a tensor, not a Python float: torch.where wraps a float anew every call
    finite = bool(torch.isfinite(wt).all())  # then w_i - q is w_i where pruned and +0 where kept
    for i in range(b):
        if nm is not None and saliency is not None and i % nm[1] == 0:
            scores = saliency(wt[i : i + nm[1]], hdiag[i : i + nm[1]], start + i)  # (m, out)
            pt[i : i + nm[1]] = ~nm_mask(scores.t(), *nm).t()
        col = cols[i]  # (out,)
        lost = torch.where(pruned[i], col, zero) if finite else col - col.masked_fill(pruned[i], 0.0)
        torch.div(lost, diag[i], out=errs[i])  # (out,)
        tail, factors = later[i]
        tail.sub_(factors * errs[i])  # (b - i - 1, out)
    wt.masked_fill_(pt, 0.0)
    return errt


def sparsegpt_prune(
    weight: torch.Tensor | list[torch.Tensor],
    hinv: torch.Tensor,
    dead: torch.Tensor,
    nm: tuple[int, int] | None,
    sparsity: float,
    blocksize: int,
    saliency: Saliency | None = obs_saliency,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prunes ``weight`` with OBS reconstruction.

    Args:
        weight: (out, in) weight (any float dtype; computed in float32), or a list of the (out_i, in)
            weights of linears that share the Hessian. These are stacked by rows and each is pruned as
            it would be alone (its own unstructured selection and trailing updates, the same bits); they
            share the column loop.
        hinv: (in, in) upper Cholesky factor of the inverse Hessian (:func:`inverse_hessian_factor`).
        dead: (in,) bool inputs that never fired; their weights are zeroed first.
        nm: (n, m) to keep n of every m inputs, or None for unstructured.
        sparsity: fraction pruned (unstructured).
        blocksize: columns processed per lazy-update block (rounded down to a multiple of M for N:M).
        saliency: how each block (or N:M group) picks its pruned set from its weights as updated so
            far (SparseGPT's OBS saliency; the Wanda code's ``*_iter`` ablations use |W| or Wanda's
            score); None with ``keep``.
        keep: (Σ out_i, in) bool keep-mask fixed before the column loop (the ``*_seq`` ablations): the
            loop then only reconstructs.

    Returns:
        (updated (Σ out_i, in) float32 weight with pruned entries zero, (Σ out_i, in) bool keep-mask),
        stacked in the order given.
    """
    if nm is not None:  # blocks start on group boundaries, so groups never straddle two blocks
        blocksize = max(nm[1], blocksize - blocksize % nm[1])
    weights = weight if isinstance(weight, list) else [weight]
    w = torch.cat([x.detach().float() for x in weights])  # (Σ out_i, in), a copy
    w[:, dead] = 0.0
    rows = _row_ranges([x.shape[0] for x in weights])
    pruned = torch.zeros_like(w, dtype=torch.bool)
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        wt = w[:, i1:i2].t().contiguous()  # (b, out)
        h1 = hinv[i1:i2, i1:i2]  # (b, b)
        if keep is not None:  # (b, out) True = pruned
            pt = ~keep[:, i1:i2].t().contiguous()
        elif nm is None:
            pt = torch.cat([_block_mask(wt[:, r0:r1], torch.diag(h1), sparsity, saliency, i1)
                            for r0, r1 in rows], dim=1)
        else:
            pt = torch.zeros_like(wt, dtype=torch.bool)
        errt = _reconstruct_block(wt, h1, pt, nm, None if keep is not None else saliency, i1)  # (b, out)
        w[:, i1:i2] = wt.t()
        pruned[:, i1:i2] = pt.t()
        for r0, r1 in rows:  # the block's errors on the later blocks, one product per weight
            w[r0:r1, i2:] -= errt[:, r0:r1].t().contiguous() @ hinv[i1:i2, i2:]
    w.masked_fill_(pruned, 0.0)
    return w, ~pruned


def _row_ranges(parts: list[int]) -> list[tuple[int, int]]:
    """(start, end) rows of each stacked weight."""
    return [(end - n, end) for n, end in zip(parts, accumulate(parts), strict=True)]


class HessianState:
    """``Σ x xᵀ`` of one distinct layer input and its token count, then the inverse factor made from it.

    Linears that read the same input share one state (``adopt`` passes it on, not a copy): the factor is
    computed once, by the first of them to prune, and serves them all.
    """

    def __init__(self) -> None:
        self.gram_sum: GramSum | None = GramSum()  # Σ x xᵀ, (in, in)
        self.tokens = 0
        self._factor: tuple[torch.Tensor, torch.Tensor] | None = None
        self.mean_sq: torch.Tensor | None = None  # (in,) E[x_j^2], Wanda's statistic, kept when factored

    def add(self, flat: torch.Tensor) -> None:
        """Adds a batch of inputs, (N, in) float32."""
        self.gram_sum.add(flat)
        self.tokens += flat.shape[0]

    def absorb(self, other: HessianState) -> None:
        """Adds the sum and token count of another state (before either is factored)."""
        theirs = other.gram_sum.value() if other.gram_sum is not None else None
        if theirs is None:
            return
        mine = self.gram_sum.value()
        self.gram_sum = GramSum.of(theirs.clone() if mine is None else mine.add_(theirs))
        self.tokens += other.tokens

    def factor(self, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, dead) of :func:`inverse_hessian_factor` for ``H = 2/n Σ x xᵀ`` (the sum is consumed)."""
        if self._factor is None:
            total = self.gram_sum.value() if self.gram_sum is not None else None
            if total is None:
                raise RuntimeError("sparsegpt needs calibration inputs before pruning")
            self.mean_sq = total.diagonal() / self.tokens  # (in,) a copy, before the factor changes it
            self._factor = inverse_hessian_factor(total.mul_(2.0 / self.tokens), percdamp)
            self.gram_sum = None
        return self._factor


@PRUNERS.register("sparsegpt")
class SparseGPTPruner(LinearPruner):
    """Accumulates ``H = 2/n sum x x^T`` in float32, then prunes with reconstruction."""

    settings = SparseGPTSettings
    statistics = ("hessian",)

    def __init__(self, module: torch.nn.Module, options: SparseGPTSettings | None = None) -> None:
        super().__init__(module, options or SparseGPTSettings())
        self.hessian = HessianState()

    def add_batch(self, inputs: torch.Tensor) -> None:
        self.hessian.add(inputs.reshape(-1, inputs.shape[-1]).float())  # (B*T, in)

    def select(self, weight: torch.Tensor, nm: tuple[int, int] | None, sparsity: float) -> torch.Tensor:
        return self._reconstruct([self], [weight], nm, sparsity)[0]

    @classmethod
    def prune_group(cls, group: list[LinearPruner], nm: tuple[int, int] | None,
                    sparsity: float) -> list[torch.Tensor]:
        """Prunes linears that share a Hessian (q, k, v; gate, up) stacked by rows, in one column loop.

        Args:
            group: SparseGPT pruners whose ``hessian`` is one shared state (``adopt``).
            nm: (n, m) pattern or None.
            sparsity: fraction pruned (unstructured).

        Returns:
            Each linear's keep-mask in its parameter's shape, as :meth:`prune` gives it alone.
        """
        if cls.select is not SparseGPTPruner.select or any(p.hessian is not group[0].hessian for p in group):
            return super().prune_group(group, nm, sparsity)  # a subclass's own select; unshared states
        masks = cls._reconstruct(group, [p.slot.view() for p in group], nm, sparsity)
        return [pruner.commit(mask) for pruner, mask in zip(group, masks, strict=True)]

    @classmethod
    def mask_rule(cls, mean_sq: torch.Tensor, weights: list[torch.Tensor], nm: tuple[int, int] | None,
                  sparsity: float) -> tuple[Saliency | None, torch.Tensor | None]:
        """How the column loop chooses what to prune: (saliency, None) per block, or (None, keep-mask)
        fixed up front; SparseGPT's own is the OBS saliency.

        Args:
            mean_sq: (in,) E[x_j^2] of the shared input.
            weights: the (out_i, in) weights, before pruning.
        """
        return obs_saliency, None

    @classmethod
    def _reconstruct(cls, group: list[SparseGPTPruner], weights: list[torch.Tensor],
                     nm: tuple[int, int] | None, sparsity: float) -> list[torch.Tensor]:
        """Prunes ``weights`` (each (out_i, in), one per pruner of ``group``, sharing ``group[0]``'s
        Hessian) with reconstruction, writes the new values into them and returns their keep-masks."""
        opts = group[0].options
        hinv, dead = group[0].hessian.factor(opts.sparsegpt_dampening)
        saliency, fixed = cls.mask_rule(group[0].hessian.mean_sq, weights, nm, sparsity)
        new, keep = sparsegpt_prune(weights, hinv, dead, nm, sparsity, opts.sparsegpt_block_size, saliency,
                                    fixed)
        parts = [w.shape[0] for w in weights]
        for pruner, weight, new_w in zip(group, weights, new.split(parts), strict=True):
            weight.copy_(new_w.to(weight.dtype))
            pruner.hessian = HessianState()  # its reference to the shared factor is dropped
        return list(keep.split(parts))
