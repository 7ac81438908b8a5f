"""Pruning: mask maths, the layer-by-layer driver and one module per method.

A new method is one file in this package plus its name in the import below (which registers it).
"""

from sparseheal.sparsity import ablate, magnitude, ria, sparsegpt, wanda  # noqa: F401  (registers the methods)
from sparseheal.sparsity.calibrate import prune_model

__all__ = ["prune_model"]
