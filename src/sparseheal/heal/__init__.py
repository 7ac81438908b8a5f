"""Healing: the healer contract (base.py), the shared Trainer set-up, one module per healer, adapters,
distillation, self-generated data and merges.

A new healer is one file in this package plus its name in the import below (which registers it).
"""

from sparseheal.heal import auto, blockwise, full, lora, perp  # noqa: F401  (registers the healers)

__all__: list[str] = []
