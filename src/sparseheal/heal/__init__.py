"""Healing: the shared Trainer set-up, one module per healer (registered in ``registry.HEALERS``),
adapters and merges."""

from __future__ import annotations

import importlib
import importlib.util

__all__ = ["HEALER_MODULES", "load_healers"]

HEALER_MODULES = ("lora", "full")


def load_healers() -> None:
    """Imports every healer module present, so that each registers its method names."""
    for name in HEALER_MODULES:
        module = f"sparseheal.heal.{name}"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
