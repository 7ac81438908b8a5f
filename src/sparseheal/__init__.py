"""sparseheal: prune Hugging Face causal LMs and heal them, keeping every pruned weight exactly zero."""

from sparseheal.api import evaluate, heal, inspect, merge, prune, run

__all__ = ["prune", "heal", "merge", "evaluate", "inspect", "run"]
