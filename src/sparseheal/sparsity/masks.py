"""Pure tensor functions for sparsity masks: patterns, selection, packing, applying, verifying.

A mask is a bool tensor shaped like the weight it belongs to, ``True`` = kept. Selection functions
take a score tensor oriented ``(out_features, in_features)``: rows are output units, and N:M groups
run along the input dimension (the hardware convention, where N of every M weights stay non-zero).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "MAX_GROUP",
    "PackedMask",
    "as_bool",
    "unstructured_mask",
    "nm_mask",
    "mask_from_scores",
    "pack_mask",
    "unpack_mask",
    "apply_mask",
    "count_violations",
    "nm_violations",
    "detect_nm",
    "sparsity_of",
]

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
# byte value -> its eight bools, most significant bit first, as the eight bytes of one int64
_UNPACKED = ((torch.arange(256).reshape(-1, 1) & _BIT_WEIGHTS.long()) != 0).to(torch.uint8)  # (256, 8)
_UNPACKED = _UNPACKED.view(torch.int64)[:, 0]  # (256,)
MAX_GROUP = 1024  # the largest M of an N:M pattern


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Prunes the ``floor(n * sparsity)`` lowest scores, per row or over the whole tensor.

    Ties are broken by position: among equal scores the earlier one is pruned first, so the count is
    exact and the result deterministic. This is the first ``k`` of a stable ascending sort, found
    without sorting: the ``k``-th lowest score ``t`` (a selection, linear time) prunes every score below
    ``t`` and the earliest of those equal to it until ``k`` are pruned (when every row holds exactly
    ``k`` scores ``<= t``, the usual case, that is one comparison). NaN scores sort last, as in
    ``torch.sort``; a row whose ``k``-th lowest is NaN falls back to the sort.

    Args:
        scores: (out, in) importance scores; higher means more important.
        sparsity: fraction of weights to prune, in [0, 1).
        per_row: compare within each output row (Wanda) or across the whole matrix (magnitude).

    Returns:
        (out, in) bool mask, True where the weight is kept.
    """
    flat = scores.reshape(scores.shape[0], -1) if per_row else scores.reshape(1, -1)  # (R, C)
    k = int(flat.shape[1] * sparsity)
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = flat.kthvalue(k, dim=1, keepdim=True).values  # (R, 1) the k-th lowest of each row
    if kth.isnan().any():
        mask = torch.ones_like(flat, dtype=torch.bool)
        mask.scatter_(1, torch.sort(flat, dim=1, stable=True).indices[:, :k], False)
        return mask.reshape(scores.shape)
    kept = flat > kth  # (R, C)
    if bool((kept.sum(dim=1) == flat.shape[1] - k).all()):  # k scores <= the k-th lowest in every row
        return kept.reshape(scores.shape)
    return _prune_ties_from_the_left(flat, kth, k).reshape(scores.shape)


def _prune_ties_from_the_left(flat: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """The keep-mask that prunes, in each row of ``flat`` (R, C), every score below the row's ``kth``
    (R, 1) and the earliest of those equal to it until ``k`` are pruned."""
    keep = flat >= kth  # (R, C)
    keep |= flat.isnan()  # NaN sorts last: kept
    tied_rows, tied_cols = (flat == kth).nonzero(as_tuple=True)  # (n_tied,) each, in row-major order
    room = k - (flat < kth).sum(dim=1)  # (R,) ties to prune per row, at least 1
    counts = torch.bincount(tied_rows, minlength=flat.shape[0])  # (R,)
    first = counts.cumsum(0) - counts  # (R,) where each row's ties start among all ties
    rank = torch.arange(tied_rows.numel(), device=flat.device) - first[tied_rows]  # (n_tied,) within its row
    take = rank < room[tied_rows]
    keep[tied_rows[take], tied_cols[take]] = False
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keeps the ``n`` highest scores in every group of ``m`` consecutive inputs of a row.

    A trailing partial group (in_features not divisible by m) keeps at most ``n`` of its weights.

    Args:
        scores: (out, in) importance scores.
        n: weights kept per group.
        m: group size.

    Returns:
        (out, in) bool mask with at most n True values in every group of m.
    """
    rows, cols = scores.shape
    pad = (-cols) % m
    padded = torch.nn.functional.pad(scores.float(), (0, pad), value=float("-inf"))  # (out, in + pad)
    groups = padded.reshape(rows, -1, m)  # (out, G, m)
    order = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]  # (out, G, m - n) lowest
    mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, order, False)
    return mask.reshape(rows, -1)[:, :cols]


def mask_from_scores(
    scores: torch.Tensor, nm: tuple[int, int] | None, sparsity: float, per_row: bool = True
) -> torch.Tensor:
    """Dispatches to :func:`nm_mask` (when ``nm`` is given) or :func:`unstructured_mask`."""
    if nm is not None:
        return nm_mask(scores, *nm)
    return unstructured_mask(scores, sparsity, per_row)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Packs a bool mask into uint8, eight positions per byte, most significant bit first."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    return (flat.reshape(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: returns a bool tensor of ``shape`` on ``packed``'s device.

    One table lookup per byte: ``_UNPACKED[b]`` holds the eight bools of byte ``b`` as one int64, so
    the gather writes eight positions at a time (about 1.6x faster than testing each bit on CPU).
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    table = _UNPACKED.to(packed.device)
    rows = table.index_select(0, packed.reshape(-1).int())  # (bytes,) int64 = (bytes, 8) bool
    return rows.view(torch.bool)[:numel].reshape(tuple(shape))


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zeroes pruned positions in place with +0.0 (never -0.0) and returns ``weight``."""
    return weight.masked_fill_(~mask.to(weight.device), 0.0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    int_type = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(int_type)


def count_violations(weight: torch.Tensor, mask: torch.Tensor) -> int:
    """Counts pruned positions whose stored bits are not exactly +0.0 (so -0.0 counts too)."""
    pruned = ~mask.to(weight.device)
    return int((_bits(weight.detach())[pruned] != 0).sum())


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Counts groups of ``m`` consecutive inputs (per row) with more than ``n`` non-zeros.

    Args:
        weight: (out, in) weight or bool keep-mask.
    """
    nonzero = (weight != 0).to(torch.int32)
    rows, cols = nonzero.shape
    nonzero = torch.nn.functional.pad(nonzero, (0, (-cols) % m))
    per_group = nonzero.reshape(rows, -1, m).sum(-1)  # (out, G)
    return int((per_group > n).sum())


def detect_nm(weight: torch.Tensor, sizes: tuple[int, ...] = (4, 8, 16)) -> tuple[int, int] | None:
    """Finds an N:M pattern that every group of an (out, in) weight obeys exactly.

    Returns the (n, m) with the smallest m such that every full group holds exactly n non-zeros
    (0 < n < m), or None when no such pattern exists (unstructured or dense).
    """
    nonzero = weight != 0
    rows, cols = nonzero.shape
    for m in sizes:
        if cols % m:
            continue
        per_group = nonzero.reshape(rows, -1, m).sum(-1)  # (out, G)
        n = int(per_group.max())
        if 0 < n < m and bool((per_group == n).all()):
            return n, m
    return None


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((weight == 0).sum()) / max(weight.numel(), 1)


class PackedMask(NamedTuple):
    """A keep-mask stored eight positions per byte (1/8 of a bool tensor's memory)."""

    bits: torch.Tensor  # (ceil(numel / 8),) uint8
    shape: tuple[int, ...]

    @classmethod
    def pack(cls, mask: torch.Tensor) -> PackedMask:
        return cls(pack_mask(mask.cpu()), tuple(mask.shape))

    def unpack(self) -> torch.Tensor:
        return unpack_mask(self.bits, self.shape)

    def numel(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel

    def kept(self) -> int:
        """Number of kept positions (set bits; padding bits are zero)."""
        return int(_POPCOUNT[self.bits.long()].sum())


def as_bool(mask: torch.Tensor | PackedMask) -> torch.Tensor:
    """A keep-mask as a bool tensor, unpacking a :class:`PackedMask` (one layer at a time)."""
    return mask.unpack() if isinstance(mask, PackedMask) else mask


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)
