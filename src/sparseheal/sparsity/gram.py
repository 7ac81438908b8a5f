"""Sums of Gram matrices ``Σ_b X_bᵀ X_b`` of layer inputs (SparseGPT's Hessian), upper blocks only.

``XᵀX`` is symmetric, so its blocks on and above the diagonal hold all of it. They are found by halving:
the columns ``[lo, hi)`` split at ``mid`` give one off-diagonal block ``X[:, lo:mid]ᵀ X[:, mid:hi]``, a
product at full speed, and the two halves recurse until a diagonal block is at most :data:`LEAF` wide
(computed whole). That is about half the multiply-adds of one full product (``n·d·(d + LEAF)`` FLOPs
against ``2·n·d²``). Each batch's blocks are added to the running sum's upper part; the lower triangle
is mirrored once, when the sum is read.

Each entry is the same dot product over the same rows either way; whether the BLAS also sums it in the
same order (the same bits) depends on the library and the shapes, so the blocks serve a shape only after
they gave the very bits of the full product on its first input (checked once per shape and process;
otherwise that shape keeps the full product).
"""

from __future__ import annotations

import logging

import torch

__all__ = ["LEAF", "upper_blocks", "blocked_gram", "GramSum"]

log = logging.getLogger(__name__)

LEAF = 192  # widest diagonal block computed whole: narrower ones are slower products than they save
_AGREES: dict[tuple, bool] = {}  # (rows, cols, dtype, device type) -> blocks gave the full product's bits


def upper_blocks(d: int, leaf: int = LEAF) -> list[tuple[int, int, int, int]]:
    """(row start, row end, column start, column end) of blocks covering the upper triangle of a (d, d)
    symmetric matrix: off-diagonal blocks from halving, then diagonal blocks at most ``leaf`` wide."""
    def split(lo: int, hi: int) -> list[tuple[int, int, int, int]]:
        if hi - lo <= leaf:
            return [(lo, hi, lo, hi)]
        mid = lo + (hi - lo) // 2
        return [(lo, mid, mid, hi), *split(lo, mid), *split(mid, hi)]

    return split(0, d)


def _mirror(upper: torch.Tensor, blocks: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """Copies every off-diagonal block of ``upper`` (d, d) to its place below the diagonal, in place."""
    for r0, r1, c0, c1 in blocks:
        if r0 != c0:
            upper[c0:c1, r0:r1] = upper[r0:r1, c0:c1].t()
    return upper


def blocked_gram(flat: torch.Tensor, leaf: int = LEAF) -> torch.Tensor:
    """``flatᵀ flat`` from its upper blocks, mirrored.

    Args:
        flat: (n, d) inputs, one row per token.
        leaf: widest diagonal block.

    Returns:
        (d, d) Gram matrix.
    """
    d = flat.shape[1]
    out = flat.new_empty(d, d)  # (d, d)
    blocks = upper_blocks(d, leaf)
    for r0, r1, c0, c1 in blocks:
        out[r0:r1, c0:c1] = flat[:, r0:r1].t() @ flat[:, c0:c1]  # (r1 - r0, c1 - c0)
    return _mirror(out, blocks)


def _blocks_agree(flat: torch.Tensor) -> bool:
    """Whether the blocks give this shape the full product's bits (decided on its first input)."""
    if flat.shape[1] <= LEAF or flat.dtype != torch.float32:
        return False
    key = (*flat.shape, flat.dtype, flat.device.type)
    if key not in _AGREES:
        blocks, full = blocked_gram(flat), flat.t() @ flat  # (d, d) each
        _AGREES[key] = torch.equal(blocks.view(torch.int32), full.view(torch.int32))
        if not _AGREES[key]:
            log.info("gram: blocks differ from the full product in the last bits for %s; that shape keeps "
                     "the full product", tuple(flat.shape))
    return _AGREES[key]


class GramSum:
    """``Σ_b X_bᵀ X_b`` over batches, each entry summed in batch order: the bits of adding each batch's
    full product ``X_bᵀ X_b`` to the sum, with about half the multiply-adds where the blocks agree."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None  # (d, d); only its upper blocks are current while _upper
        self._upper = False

    def add(self, flat: torch.Tensor) -> None:
        """Adds one batch of inputs, (n, d) float32."""
        if (self.total is not None and not self._upper) or not _blocks_agree(flat):
            if self._upper:  # from here on whole products: the sum so far becomes whole first
                _mirror(self.total, upper_blocks(self.total.shape[0]))
                self._upper = False
            batch = flat.t() @ flat  # (d, d)
            self.total = batch if self.total is None else self.total.add_(batch)
            return
        first = self.total is None
        if first:
            self.total, self._upper = flat.new_empty(flat.shape[1], flat.shape[1]), True
        for r0, r1, c0, c1 in upper_blocks(flat.shape[1]):
            product = flat[:, r0:r1].t() @ flat[:, c0:c1]  # (r1 - r0, c1 - c0)
            target = self.total[r0:r1, c0:c1]
            target.copy_(product) if first else target.add_(product)

    @classmethod
    def of(cls, total: torch.Tensor) -> GramSum:
        """A sum that starts from the whole (d, d) ``total``."""
        made = cls()
        made.total = total
        return made

    def value(self) -> torch.Tensor | None:
        """The (d, d) sum so far (None before any batch)."""
        if self._upper:
            _mirror(self.total, upper_blocks(self.total.shape[0]))
            self._upper = False
        return self.total
