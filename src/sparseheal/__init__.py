"""sparseheal: prune Hugging Face causal LMs and heal them, keeping every pruned weight exactly zero.

The stage functions are the package's API: ``sparseheal.prune(...)``, ``heal``, ``merge``, ``evaluate``,
``inspect``, ``run`` and ``report``. Two of them share their name with a subpackage (``sparseheal.heal``,
``sparseheal.evaluate``): those subpackages are callable and call their stage, so that both
``sparseheal.heal(PRUNED, OUT)`` and ``import sparseheal.heal.lora`` (or ``from sparseheal.evaluate import
perplexity``) work.
"""

import inspect as _inspect
import sys as _sys
import types as _types

import sparseheal.config  # noqa: F401  (where ConfigError was first importable from)
import sparseheal.evaluate
import sparseheal.heal
import sparseheal.run  # noqa: F401
from sparseheal import api as _api
from sparseheal.api import inspect, merge, prune
from sparseheal.run import report, run

__all__ = ["prune", "heal", "merge", "evaluate", "inspect", "run", "report"]


class _StagePackage(_types.ModuleType):
    """A subpackage that is also a stage function: calling it runs the stage; any attribute the package
    lacks (``preflight``, ``fields``) is the stage function's."""

    def __call__(self, *args, **kwargs):
        return self.__dict__["_stage"](*args, **kwargs)

    def __getattr__(self, name: str):
        stage = self.__dict__.get("_stage")
        if stage is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(stage, name)


def _stage_package(package: _types.ModuleType, stage) -> _types.ModuleType:
    package.__class__ = _StagePackage
    package._stage = stage
    package.__signature__ = _inspect.signature(stage)
    return package


heal = _stage_package(_sys.modules["sparseheal.heal"], _api.heal)
evaluate = _stage_package(_sys.modules["sparseheal.evaluate"], _api.evaluate)
