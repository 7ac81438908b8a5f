"""The interface between the layer-by-layer driver and a pruning method."""

from __future__ import annotations

import torch
from torch import nn

from sparseheal.models import weight_view
from sparseheal.sparsity.masks import apply_mask

__all__ = ["LinearPruner"]


class LinearPruner:
    """Prunes one linear layer. Subclasses implement ``add_batch`` (if calibrated) and ``select``.

    Attributes:
        needs_calibration: whether the driver must feed layer inputs through ``add_batch``.
    """

    needs_calibration: bool = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Accumulates statistics of a batch of layer inputs, shaped (B, T, in)."""

    def select(self, weight: torch.Tensor, nm: tuple[int, int] | None, sparsity: float) -> torch.Tensor:
        """Returns the (out, in) keep-mask for ``weight``; may update kept weights in place."""
        raise NotImplementedError

    def prune(self, nm: tuple[int, int] | None, sparsity: float) -> torch.Tensor:
        """Prunes the module's weight in place and returns its keep-mask in the parameter's own shape."""
        weight = weight_view(self.module)  # (out, in) view
        mask = self.select(weight, nm, sparsity)
        apply_mask(weight, mask)
        return mask if isinstance(self.module, nn.Linear) else mask.t().contiguous()
