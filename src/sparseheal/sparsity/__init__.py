"""Pruning: mask maths, the layer-by-layer driver and one module per method."""

from sparseheal.sparsity import magnitude, sparsegpt, wanda  # noqa: F401  (registers the methods)
from sparseheal.sparsity.calibrate import prune_model

__all__ = ["prune_model"]
