"""Evaluation: the evaluator contract (base.py), one module per evaluation, and the stage's pipeline.

A new evaluation is one file in this package plus its name in the import below (which registers it),
or a module of another installed package named under the entry-point group ``sparseheal.evaluations``
(loaded here, before the evaluate stage lists the evaluations' settings).
"""

from importlib.metadata import entry_points

from sparseheal.evaluate import perplexity, zeroshot  # noqa: F401  (registers the evaluations)

for _plugin in entry_points(group="sparseheal.evaluations"):
    _plugin.load()  # its import registers it

__all__: list[str] = []
