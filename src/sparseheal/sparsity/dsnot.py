"""DSnoT: training-free prune-and-grow that refines any calibrated method's mask (``--refine dsnot``).

For each output row ``r`` the expected reconstruction error of the pruned layer is
``e_r = sum_j (W_rj - W'_rj) * s_j``, with ``W`` the weights before pruning, ``W'`` after (zero where
pruned; SparseGPT's updated values where kept) and ``s_j`` the mean over calibration samples of input
feature ``j`` summed over a sample's tokens. While ``|e_r| > threshold`` (at most ``cycles`` swaps per row)
one pruned weight is regrown and one kept weight pruned, at fixed sparsity:

- regrow: when ``e_r > 0`` the pruned weight with the largest ``W_rj s_j / Var(x_j)^p``, when ``e_r < 0``
  the smallest (the next one in that order each time); it takes back its value before pruning;
- prune: the kept weight of lowest Wanda score ``|W'_rj| * ||X_j||`` whose contribution ``W'_rj s_j`` has
  the sign opposite to ``e_r`` (unstructured), or the lowest-scoring kept weight of the regrown weight's
  own group of M (N:M: the pattern holds; a swap that would flip the sign of ``e_r`` stops the row);
- ``e_r += W'_rj(pruned) s_j - W_rj(regrown) s_j``.

A row stops for good at its first cycle with ``|e_r| <= threshold`` or with no candidate left. Zhang et
al., "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs", ICLR 2024,
https://arxiv.org/abs/2310.08915 (their code's defaults: 50 cycles, threshold 0.1, variance power 1, and
the MLP linears left as the method pruned them). Their code leaves a pointer at the end of its candidates
running into kept weights; here a row with no candidate stops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseheal.checks import non_negative, positive
from sparseheal.errors import ConfigError
from sparseheal.settings import Settings, setting
from sparseheal.sparsity.base import LinearPruner

__all__ = ["RefineSettings", "DSnoTStats", "dsnot_refine", "refined"]


@dataclass
class RefineSettings(Settings):
    """A training-free refinement of the chosen method's mask, and DSnoT's options."""

    refine: str = setting("none", "refine each mask after the method: none or dsnot (prune-and-grow at fixed "
                                  "sparsity; needs a calibrated method).", choices=("none", "dsnot"))
    dsnot_cycles: int = setting(50, "dsnot: most swaps per row.", check=positive)
    dsnot_threshold: float = setting(0.1, "dsnot: a row stops once its expected error is at most this.",
                                     check=non_negative())
    dsnot_power: float = setting(1.0, "dsnot: power of the input variance dividing the regrowth score.",
                                 check=non_negative())
    dsnot_skip: str = setting("mlp", "dsnot: the family left as the method pruned it: mlp (the reference's "
                                     "default), attention or none.", choices=("mlp", "attention", "none"))

    def check_method(self, method: str, calibrated: bool, kind: str = "unstructured") -> None:
        """Refuses a refinement that the chosen method cannot feed, or a pattern its swaps would break."""
        if self.refine == "dsnot" and not calibrated:
            raise ConfigError("--refine", f"dsnot needs calibration statistics; --method {method} takes none "
                                          "(use wanda, sparsegpt, ria or an ablate_* method)")
        if self.refine == "dsnot" and kind not in ("unstructured", "nm"):
            raise ConfigError("--refine", "dsnot swaps single weights: it refines unstructured and N:M "
                                          "masks, not V:N:M or block tiles")


class DSnoTStats:
    """Per input feature: the sum over tokens (for ``s``), the sum of squares (for ``||X||``), and the
    token-weighted sum of each sample's variance over its tokens.

    Args:
        seqlen: tokens per calibration sample; the routed tokens an expert receives (2-D inputs, no
            sample boundaries) count as ``tokens / seqlen`` samples, so that ``s`` does not depend on the
            batch size.
    """

    def __init__(self, seqlen: int | None = None) -> None:
        self.sum = self.sq_sum = self.var_sum = None
        self.samples, self.tokens, self.seqlen = 0.0, 0, seqlen

    def add(self, inputs: torch.Tensor) -> None:
        """Adds a batch of inputs, (B, T, in), or an expert's routed tokens, (N, in)."""
        x = inputs.float() if inputs.dim() == 3 else inputs.float().reshape(1, -1, inputs.shape[-1])
        parts = (x.sum(dim=(0, 1)), x.pow(2).sum(dim=(0, 1)),
                 (x.var(dim=1, unbiased=False) * x.shape[1]).sum(dim=0))  # (in,) each
        self._add(*parts)
        routed = inputs.dim() != 3 and self.seqlen
        self.samples += x.shape[1] / self.seqlen if routed else x.shape[0]
        self.tokens += x.shape[0] * x.shape[1]

    def absorb(self, other: DSnoTStats) -> None:
        if other.sum is None:
            return
        self._add(other.sum, other.sq_sum, other.var_sum)
        self.samples += other.samples
        self.tokens += other.tokens

    def _add(self, total: torch.Tensor, sq: torch.Tensor, var: torch.Tensor) -> None:
        if self.sum is None:
            self.sum, self.sq_sum, self.var_sum = total.clone(), sq.clone(), var.clone()
        else:
            self.sum, self.sq_sum, self.var_sum = self.sum + total, self.sq_sum + sq, self.var_sum + var

    def signal(self) -> torch.Tensor:
        """(in,) s_j: the sum of x_j over a sample's tokens, averaged over samples."""
        return self.sum / max(self.samples, 1e-9)

    def variance(self) -> torch.Tensor:
        """(in,) the token-weighted mean of each sample's variance of x_j over its tokens."""
        return self.var_sum / max(self.tokens, 1)

    def mean_sq(self) -> torch.Tensor:
        """(in,) E[x_j^2] over every token (Wanda's statistic)."""
        return self.sq_sum / max(self.tokens, 1)


def _sorted_candidates(key: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the positions where ``allowed`` in ascending ``key`` (stable), and how many there are.

    Args:
        key: (out, in) sort key.
        allowed: (out, in) bool.

    Returns:
        ((out, in) long positions, the allowed ones first; (out,) long counts)
    """
    order = torch.sort(key.masked_fill(~allowed, float("inf")), dim=1, stable=True).indices  # (out, in)
    return order, allowed.sum(dim=1)


def _group_choice(score: torch.Tensor, keep: torch.Tensor, regrown: torch.Tensor, rows: torch.Tensor,
                  grown: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M: the kept, never regrown weight of lowest score in the group of M of each ``grown`` position.

    Returns:
        ((k,) positions, (k,) bool whether the group had one)
    """
    start = grown - grown % m  # (k,)
    cols = start.unsqueeze(1) + torch.arange(m, device=grown.device)  # (k, m)
    cols = cols.clamp(max=score.shape[1] - 1)
    free = keep[rows.unsqueeze(1), cols] & ~regrown[rows.unsqueeze(1), cols]  # (k, m)
    cand = score[rows.unsqueeze(1), cols].masked_fill(~free, float("inf"))  # (k, m)
    best = cand.argmin(dim=1)  # (k,) first of the lowest
    return cols.gather(1, best.unsqueeze(1)).squeeze(1), free.any(dim=1)


@torch.no_grad()
def dsnot_refine(original: torch.Tensor, current: torch.Tensor, keep: torch.Tensor, stats: DSnoTStats,
                 nm: tuple[int, int] | None, cycles: int, threshold: float,
                 power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DSnoT's swaps on one matrix (see the module docstring).

    Args:
        original: (out, in) weights before pruning.
        current: (out, in) weights after the method (pruned positions zero).
        keep: (out, in) bool keep-mask of the method.
        stats: the matrix's input statistics.
        nm: (n, m) when the mask is N:M along the inputs (swaps stay within a group), else None.
        cycles, threshold, power: the options.

    Returns:
        ((out, in) refined keep-mask, (out, in) bool the regrown positions)
    """
    s, var = stats.signal().to(original.device), stats.variance().to(original.device)  # (in,)
    d_orig, d_cur = original.float() * s, current.float() * s  # (out, in) contributions
    err = (d_orig - d_cur).sum(dim=1)  # (out,) expected error of each row
    denominator = var.pow(power)  # (in,)
    gain = torch.where(denominator > 0, d_orig / denominator, torch.zeros_like(d_orig))  # (out, in)
    score = current.float().abs() * stats.mean_sq().to(original.device).sqrt()  # (out, in) Wanda's
    keep, regrown = keep.clone(), torch.zeros_like(keep)
    grow_order, n_pruned = _sorted_candidates(gain, ~keep)  # pruned, ascending gain
    neg_order, n_neg = _sorted_candidates(score, keep & (d_cur < 0))
    pos_order, n_pos = _sorted_candidates(score, keep & (d_cur > 0))
    low, high = torch.zeros_like(n_pruned), n_pruned - 1  # regrowth pointers from both ends
    p_neg, p_pos = torch.zeros_like(n_neg), torch.zeros_like(n_pos)
    active = torch.ones_like(err, dtype=torch.bool)
    for _ in range(cycles):
        up = err > 0  # (out,) regrow the largest gain, prune a negative contribution
        active &= (err.abs() > threshold) & (low <= high)
        if nm is None:
            active &= torch.where(up, p_neg < n_neg, p_pos < n_pos)
        rows = active.nonzero().squeeze(1)  # (k,)
        if rows.numel() == 0:
            break
        grown = grow_order[rows, torch.where(up[rows], high[rows], low[rows])]  # (k,)
        if nm is None:
            cut = torch.where(up[rows], neg_order[rows, p_neg[rows].clamp(max=keep.shape[1] - 1)],
                              pos_order[rows, p_pos[rows].clamp(max=keep.shape[1] - 1)])  # (k,)
        else:
            cut, found = _group_choice(score, keep, regrown, rows, grown, nm[1])
            new_err = err[rows] + d_cur[rows, cut] - d_orig[rows, grown]
            found &= torch.sign(new_err) == torch.sign(err[rows])
            active[rows[~found]] = False
            rows, grown, cut = rows[found], grown[found], cut[found]
        keep[rows, grown], regrown[rows, grown], keep[rows, cut] = True, True, False
        err[rows] += d_cur[rows, cut] - d_orig[rows, grown]
        moved = up[rows]
        high[rows[moved]] -= 1
        low[rows[~moved]] += 1
        p_neg[rows[moved]] += 1
        p_pos[rows[~moved]] += 1
    return keep, regrown


def refined(pruner_cls: type[LinearPruner], options: RefineSettings,
            seqlen: int | None = None) -> type[LinearPruner]:
    """``pruner_cls`` with DSnoT after its selection: it also gathers :class:`DSnoTStats`, keeps each
    matrix's weights before pruning, and swaps in ``commit`` (where every method's mask arrives)."""

    class Refined(pruner_cls):
        statistics = (*pruner_cls.statistics, "dsnot") if pruner_cls.statistics else ()

        def __init__(self, module, method_options=None) -> None:
            super().__init__(module, method_options)
            self.dsnot = DSnoTStats(seqlen)
            self.skipped = self.slot.weight.family == options.dsnot_skip
            self.original: torch.Tensor | None = None

        def add_batch(self, inputs: torch.Tensor) -> None:
            super().add_batch(inputs)
            self.dsnot.add(inputs)  # even when skipped: a linear reading the same input adopts them

        def prune(self, nm, sparsity):
            self.nm = nm
            if self.original is None and not self.skipped:
                self.original = self.slot.view().detach().clone()  # (out, in)
            return super().prune(nm, sparsity)

        @classmethod
        def prune_group(cls, group, nm, sparsity):
            for pruner in group:
                pruner.nm = nm
                if not pruner.skipped:
                    pruner.original = pruner.slot.view().detach().clone()
            return super().prune_group(group, nm, sparsity)

        def commit(self, mask: torch.Tensor) -> torch.Tensor:
            if self.original is not None:
                mask = self._swap(mask)
                self.original = None
            return super().commit(mask)

        def _swap(self, mask: torch.Tensor) -> torch.Tensor:
            weight = self.slot.view()  # (out, in), the method's output (pruned positions not yet zeroed)
            current = weight.detach().masked_fill(~mask, 0.0)
            order = self.input_order if self.input_order is not None else torch.arange(weight.shape[1])
            order = order.to(weight.device)
            keep, regrown = dsnot_refine(self.original[:, order], current[:, order], mask[:, order],
                                         _permuted(self.dsnot, order), self.nm, options.dsnot_cycles,
                                         options.dsnot_threshold, options.dsnot_power)
            back = torch.empty_like(mask)
            back[:, order] = keep
            grown = torch.zeros_like(mask)
            grown[:, order] = regrown
            weight[grown] = self.original[grown].to(weight.dtype)  # regrown weights take their values back
            return back

    Refined.__name__ = Refined.__qualname__ = f"DSnoT{pruner_cls.__name__}"
    return Refined


def _permuted(stats: DSnoTStats, order: torch.Tensor) -> DSnoTStats:
    """The statistics with their features in ``order``."""
    out = DSnoTStats(stats.seqlen)
    out.sum, out.sq_sum, out.var_sum = (t.to(order.device)[order] for t in (stats.sum, stats.sq_sum,
                                                                             stats.var_sum))
    out.samples, out.tokens = stats.samples, stats.tokens
    return out
