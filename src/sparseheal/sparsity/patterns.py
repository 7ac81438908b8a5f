"""Sparsity patterns shaped for hardware: their notation, selection from scores, and verification.

Every pattern is stated on a weight in its ``(out, in)`` orientation, groups running along the input
(reduction) dimension:

- ``unstructured``: any ``floor(n * s)`` weights (per row or per matrix, as the method compares).
- ``N:M``: at most N non-zeros in every group of M consecutive inputs of a row (NVIDIA's 2:4).
- ``V:N:M`` (VENOM, Castro et al., SC'23, https://arxiv.org/abs/2310.02065): the weight is tiled into
  blocks of V consecutive rows by M consecutive inputs; each block keeps 4 of its M columns (one choice
  shared by its V rows) and each row keeps N = 2 of those 4 (the sparse tensor cores' 2:4); density N/M.
  The 4 columns are the subset whose rows' two best scores sum highest over the block
  ``argmax_{C in (M choose 4)} sum_{r in block} (top-2 of S_rc, c in C)``, as the authors' reference
  (``nm_vector_mask_sparsify``) searches it, exhaustively; ties go to the first subset in lexicographic
  order, and within a row to the earlier column.
- ``block:RxC``: whole tiles of R rows by C inputs, pruned by their summed score
  ``T_ab = sum_{(i, j) in tile ab} S_ij``: the ``floor(tiles * s)`` lowest tiles of the matrix go (ties by
  position).

Each function is pure and raises ValueError on a pattern or shape it cannot serve.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch

from sparseheal.sparsity.masks import MAX_GROUP, mask_from_scores, nm_violations, unstructured_mask

__all__ = ["Pattern", "parse", "vnm_mask", "block_mask", "vnm_violations", "block_violations"]

_NM = re.compile(r"^(\d+):(\d+)$")
_VNM = re.compile(r"^(\d+):(\d+):(\d+)$")
_BLOCK = re.compile(r"^block:(\d+)x(\d+)$")
_VNM_COLUMNS = 4  # columns kept per V x M block: the sparse tensor cores' group of 4
_VNM_MAX_M = 32  # (32 choose 4) = 35,960 subsets per block at most


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern. ``kind`` is unstructured, nm, vnm or block."""

    kind: str
    n: int = 0
    m: int = 0
    v: int = 0
    rows: int = 0
    cols: int = 0

    @property
    def text(self) -> str:
        """The notation: ``unstructured``, ``2:4``, ``64:2:8`` or ``block:16x16``."""
        return {"unstructured": "unstructured", "nm": f"{self.n}:{self.m}",
                "vnm": f"{self.v}:{self.n}:{self.m}", "block": f"block:{self.rows}x{self.cols}"}[self.kind]

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern; None for any other kind."""
        return (self.n, self.m) if self.kind == "nm" else None

    @property
    def implied(self) -> float | None:
        """The sparsity the pattern fixes (N:M and V:N:M: 1 - N/M); None when a ratio is given."""
        return 1.0 - self.n / self.m if self.kind in ("nm", "vnm") else None

    def misfit(self, out_features: int, in_features: int) -> str | None:
        """Why an (out, in) weight cannot take the pattern (None when it can)."""
        if self.kind == "vnm" and (out_features % self.v or in_features % self.m):
            return f"V:N:M {self.text} needs rows divisible by {self.v} and inputs by {self.m}"
        if self.kind == "block" and (out_features % self.rows or in_features % self.cols):
            return (f"tiles of {self.rows}x{self.cols} need rows divisible by {self.rows} and inputs by "
                    f"{self.cols}")
        return None

    def select(self, scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
        """(out, in) keep-mask from (out, in) scores (higher is more important)."""
        if self.kind == "vnm":
            return vnm_mask(scores, self.v, self.n, self.m)
        if self.kind == "block":
            return block_mask(scores, self.rows, self.cols, sparsity)
        return mask_from_scores(scores, self.nm, sparsity, per_row)

    def violations(self, weight: torch.Tensor, sparsity: float | None = None) -> int:
        """Groups, blocks or tiles of an (out, in) weight (or keep-mask) that break the pattern."""
        if self.kind == "nm":
            return nm_violations(weight, self.n, self.m)
        if self.kind == "vnm":
            return vnm_violations(weight, self.v, self.n, self.m)
        if self.kind == "block" and sparsity is not None:
            return block_violations(weight, self.rows, self.cols, sparsity)
        return 0

    def meta(self) -> dict:
        """The pattern as the masks file states it per module."""
        fields = {"nm": ("n", "m"), "vnm": ("v", "n", "m"), "block": ("rows", "cols")}.get(self.kind, ())
        return {"pattern": self.text, "kind": self.kind, "axis": "input",
                **{name: getattr(self, name) for name in fields}}


def parse(text: str) -> Pattern:
    """Parses a pattern's notation (see the module docstring); ValueError says what is allowed."""
    spec = str(text).strip().lower().replace(" ", "")
    if spec == "unstructured":
        return Pattern("unstructured")
    if match := _NM.match(spec):
        n, m = map(int, match.groups())
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M (N weights kept of every M), got {n}:{m}")
        if m > MAX_GROUP:
            raise ValueError(f"M of N:M is at most {MAX_GROUP} (hardware patterns use 4 to 16), got {n}:{m}")
        return Pattern("nm", n=n, m=m)
    if match := _VNM.match(spec):
        v, n, m = map(int, match.groups())
        if n != 2 or not _VNM_COLUMNS < m <= _VNM_MAX_M or v < 1:
            raise ValueError(f"V:N:M keeps N = 2 of 4 columns chosen in every block of V rows by M inputs, "
                             f"with 4 < M <= {_VNM_MAX_M} and V >= 1 (such as 64:2:8), got {spec}")
        return Pattern("vnm", n=n, m=m, v=v)
    if match := _BLOCK.match(spec):
        rows, cols = map(int, match.groups())
        if rows < 1 or cols < 1:
            raise ValueError(f"block tiles need R, C >= 1, got {spec}")
        return Pattern("block", rows=rows, cols=cols)
    raise ValueError(f"expected unstructured, N:M (2:4), V:N:M (64:2:8) or block:RxC (block:16x16), "
                     f"got {text!r}")


def vnm_mask(scores: torch.Tensor, v: int, n: int, m: int) -> torch.Tensor:
    """VENOM's V:N:M keep-mask of (out, in) scores (see the module docstring).

    Returns:
        (out, in) bool mask, N per row in 4 shared columns of every V x M block.
    """
    rows, cols = scores.shape
    subsets = torch.tensor(list(itertools.combinations(range(m), _VNM_COLUMNS)),
                           device=scores.device)  # (K, 4)
    # blocks as (block, V, m): every V x M block of the weight, row bands first
    blocks = scores.float().reshape(rows // v, v, cols // m, m).permute(0, 2, 1, 3).reshape(-1, v, m)
    keep = torch.zeros_like(blocks, dtype=torch.bool)  # (blocks, V, m)
    chunk = max(1, 2**24 // (v * subsets.shape[0] * _VNM_COLUMNS))  # blocks per step: about 64 MiB
    for start in range(0, blocks.shape[0], chunk):
        part = blocks[start : start + chunk]  # (b, V, m)
        best = part[..., subsets].topk(n, dim=-1).values.sum(-1)  # (b, V, K) each row's best N of the 4
        choice = subsets[_first_argmax(best.sum(dim=1))]  # (b, 4) the subset of highest total
        chosen = choice.unsqueeze(1).expand(-1, v, -1)  # (b, V, 4)
        order = torch.sort(-part.gather(-1, chosen), dim=-1, stable=True).indices[..., :n]  # (b, V, N)
        keep[start : start + chunk].scatter_(-1, chosen.gather(-1, order), True)
    return keep.reshape(rows // v, cols // m, v, m).permute(0, 2, 1, 3).reshape(rows, cols)


def _first_argmax(values: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum along the last dimension."""
    best = values.max(dim=-1, keepdim=True).values
    hits = values == best
    return hits.int().argmax(dim=-1)  # argmax of a 0/1 tensor returns the first 1


def block_mask(scores: torch.Tensor, rows: int, cols: int, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning the ``floor(tiles * sparsity)`` R x C tiles of lowest summed score."""
    out, inp = scores.shape
    tiles = scores.float().reshape(out // rows, rows, inp // cols, cols).sum(dim=(1, 3))  # (out/R, in/C)
    keep_tiles = unstructured_mask(tiles, sparsity, per_row=False)  # (out/R, in/C)
    return keep_tiles.repeat_interleave(rows, 0).repeat_interleave(cols, 1)


def vnm_violations(weight: torch.Tensor, v: int, n: int, m: int) -> int:
    """V x M blocks with non-zeros in more than 4 columns or a row with more than N non-zeros."""
    rows, cols = weight.shape
    nonzero = (weight != 0).reshape(rows // v, v, cols // m, m)  # (R, V, B, m)
    columns = nonzero.any(dim=1).sum(-1)  # (R, B)
    per_row = nonzero.sum(-1).amax(dim=1)  # (R, B)
    return int(((columns > _VNM_COLUMNS) | (per_row > n)).sum())


def block_violations(weight: torch.Tensor, rows: int, cols: int, sparsity: float) -> int:
    """Tiles holding a non-zero beyond the ``tiles - floor(tiles * sparsity)`` a block pattern keeps."""
    out, inp = weight.shape
    live = (weight != 0).reshape(out // rows, rows, inp // cols, cols).any(dim=3).any(dim=1)  # (out/R, in/C)
    allowed = live.numel() - int(live.numel() * sparsity)
    return max(0, int(live.sum()) - allowed)
