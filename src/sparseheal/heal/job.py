"""One heal, settled from its settings: what :mod:`sparseheal.heal.pipeline` runs and
:mod:`sparseheal.heal.output` writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparseheal.heal.base import Healer
from sparseheal.heal.checkpoints import checkpoint_dir_for
from sparseheal.heal.distill import DistillSettings
from sparseheal.heal.selfgen import SelfGenSettings
from sparseheal.heal.training import TrainingSettings
from sparseheal.models import ComputeSettings, TrustSettings

__all__ = ["HealJob"]


@dataclass
class HealJob:
    """One heal, settled: where from and to, the healer with its options, and the shared settings."""

    pruned_dir: str
    output: str
    overwrite: bool
    healer: Healer
    training: TrainingSettings
    merge: str
    distill: DistillSettings
    selfgen: SelfGenSettings
    fsdp: bool
    compute: ComputeSettings
    trust: TrustSettings
    data_dir: str | None
    recipe: dict[str, Any]  # every setting's value, as the record and a later --resume see them

    @property
    def checkpoint_dir(self) -> Path:
        """Where training checkpoints go: ``<output>.ckpt/``."""
        return checkpoint_dir_for(self.output)
