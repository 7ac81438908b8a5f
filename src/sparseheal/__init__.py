"""sparseheal: prune Hugging Face causal LMs and heal them, keeping every pruned weight exactly zero."""

from sparseheal.api import evaluate, inspect, prune

__all__ = ["prune", "evaluate", "inspect"]
