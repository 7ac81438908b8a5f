"""sparseheal: prune Hugging Face causal LMs and heal them, keeping every pruned weight exactly zero."""

# The subpackages named like API functions load first, so that the names below stay the functions
# (importing a subpackage later would otherwise rebind ``sparseheal.heal`` to the package).
import sparseheal.config  # where ConfigError was first importable from: sparseheal.config.ConfigError
import sparseheal.evaluate
import sparseheal.heal
import sparseheal.run  # noqa: F401
from sparseheal.api import evaluate, heal, inspect, merge, prune
from sparseheal.run import report, run

__all__ = ["prune", "heal", "merge", "evaluate", "inspect", "run", "report"]
