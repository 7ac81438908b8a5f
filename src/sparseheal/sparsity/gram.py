"""The Gram matrix ``XᵀX`` of layer inputs (SparseGPT's Hessian), computed on its upper panels only.

``XᵀX`` is symmetric, so the panels of columns ``[s, s + w)`` against ``[s, d)`` hold all of it: about
half the multiply-adds of one full product (``n·d·(d + w)`` instead of ``2·n·d²`` FLOPs), and the lower
triangle is their mirror. Each entry is the same dot product over the same rows either way; whether the
BLAS also sums it in the same order (the same bits) depends on the library and the shapes, so the
panels are used for a shape only after they gave the very bits of the full product on its first input
(checked once per shape and process; otherwise that shape keeps the full product).
"""

from __future__ import annotations

import logging

import torch

__all__ = ["PANEL_WIDTH", "panel_gram", "gram"]

log = logging.getLogger(__name__)

PANEL_WIDTH = 192  # columns per panel: wide enough for full-speed products, narrow enough to save work
_AGREES: dict[tuple, bool] = {}  # (rows, cols, dtype, device type) -> panels gave the full product's bits


def panel_gram(flat: torch.Tensor, width: int = PANEL_WIDTH) -> torch.Tensor:
    """``flatᵀ flat`` from its upper panels, mirrored.

    Args:
        flat: (n, d) inputs, one row per token.
        width: columns per panel.

    Returns:
        (d, d) Gram matrix.
    """
    d = flat.shape[1]
    out = flat.new_empty(d, d)  # (d, d)
    for start in range(0, d, width):
        stop = min(start + width, d)
        rows = flat[:, start:stop].t() @ flat[:, start:]  # (w, d - start): this panel's rows, upper part
        out[start:stop, start:] = rows
        out[stop:, start:stop] = rows[:, stop - start :].t()  # the mirror below the diagonal block
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def gram(flat: torch.Tensor) -> torch.Tensor:
    """``flatᵀ flat`` (float32), by :func:`panel_gram` where it gives the full product's bits.

    Args:
        flat: (n, d) float32 inputs.

    Returns:
        (d, d) Gram matrix, bit for bit the full product ``flat.t() @ flat``.
    """
    if flat.shape[1] <= PANEL_WIDTH or flat.dtype != torch.float32:
        return flat.t() @ flat
    key = (*flat.shape, flat.dtype, flat.device.type)
    agrees = _AGREES.get(key)
    if agrees is False:
        return flat.t() @ flat
    panels = panel_gram(flat)
    if agrees is None:
        full = flat.t() @ flat  # (d, d)
        _AGREES[key] = _same_bits(panels, full)
        if not _AGREES[key]:
            log.info("gram: panels differ from the full product in the last bits for %s; using the full "
                     "product for that shape", tuple(flat.shape))
            return full
    return panels
