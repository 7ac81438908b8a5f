"""The healer contract: what the heal pipeline asks of a healing method (the twin of sparsity/base.py).

A healer is one file: a :class:`Healer` subclass registered with ``@HEALERS.register(name)`` and
imported in ``heal/__init__.py``. The pipeline never tests a healer's name; it reads the class:

- ``settings``: the healer's own settings group (its flags; refused with another ``--method``); healers
  may share one;
- ``uses``: the shared settings (training, distillation, self-generated data) it reads; None: all of
  them. A value given for any other is refused, with ``unused_note`` saying what the healer does instead;
- ``defaults``: its defaults of shared training settings that depend on the method (``lr``, ``scheduler``);
- ``can_merge``: whether ``--merge`` applies (an adapter merged into the sparse base);
- ``requires_sparsity``: whether the input must hold pruned weights (masks or zeros);
- ``packed_masks``: whether it wants bit-packed masks (one layer unpacked at a time);
- ``writes``: what its output holds, for messages;
- :meth:`check_training` (the shared training settings, when the heal is planned), :meth:`output_bytes`
  (how large the output and checkpoints are), :meth:`validate` (on a weightless skeleton, in the
  preflight), :meth:`prepare`, :meth:`callbacks` and :meth:`save`;
- or, with ``trainer_based = False``, :meth:`run` (its own loop and output) and
  :meth:`latest_checkpoint` (what ``--resume`` continues from).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from sparseheal.registry import HEALERS
from sparseheal.settings import Settings, refuse_unused, setting

__all__ = ["Healer", "HealMethodSettings", "refuse_foreign_settings", "refuse_unused_shared", "format_rate"]


class Healer:
    """Base of a healing method.

    Args:
        options: the built ``settings`` group (None when the healer has none; defaults when omitted).
    """

    name: ClassVar[str]  # set by the registration
    settings: ClassVar[type[Settings] | None] = None
    uses: ClassVar[frozenset[str] | None] = None  # the shared settings it reads; None: every one
    unused_note: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    can_merge: ClassVar[bool] = False
    requires_sparsity: ClassVar[bool] = False
    packed_masks: ClassVar[bool] = False
    trainer_based: ClassVar[bool] = True  # False: the healer runs its own loop and writes its output (run)
    writes: ClassVar[str] = "a model directory"

    def __init__(self, options: Settings | None = None) -> None:
        self.options = options if options is not None or self.settings is None else self.settings()

    def check_training(self, training: Any) -> None:
        """Checks the shared training settings (a ``TrainingSettings``) when the heal is planned."""

    def output_bytes(self, weights: int, checkpoints: int, merged: bool) -> tuple[int, str]:
        """Estimated bytes of the output (a model of ``weights`` bytes) plus ``checkpoints`` kept
        checkpoints, and how the estimate was made. Default: the model, checkpoints of 3x its size
        (weights and two AdamW moments)."""
        what = f"the model's weights, plus {checkpoints} checkpoints of 3x that"
        return weights * (1 + 3 * checkpoints), what

    def validate(self, skeleton: nn.Module) -> None:
        """Checks the settings against the model's structure (a meta-device skeleton, no weights)."""

    def prepare(self, model: nn.Module, masks: dict[str, torch.Tensor], seed: int,
                gradient_checkpointing: bool) -> nn.Module:
        """Returns the module the Trainer trains (the model itself, or a wrapper of it)."""
        raise NotImplementedError

    def callbacks(self) -> list:
        """Trainer callbacks the healer needs (none by default)."""
        return []

    def latest_checkpoint(self, checkpoint_dir: Path) -> Path | None:
        """The newest complete checkpoint in ``checkpoint_dir`` (the Trainer's, by default)."""
        from sparseheal.heal.checkpoints import last_checkpoint

        return last_checkpoint(checkpoint_dir)

    def run(self, job: Any) -> Path:
        """The whole heal, for a healer that is not ``trainer_based``."""
        raise NotImplementedError

    def save(self, model: nn.Module, tokenizer, out_dir: Path, masks: dict[str, torch.Tensor],
             pattern: str) -> dict:
        """Writes the healed artifacts into ``out_dir``; returns fields for the record."""
        raise NotImplementedError

    @classmethod
    def summary(cls, record: dict) -> str | None:
        """The command line's one-line account of a finished heal, from its record (None: the account of a
        Trainer-based heal: steps, tokens, losses)."""
        return None


def format_rate(value: float) -> str:
    """A learning rate as people write it: 1e-4, 2e-5, 3e-4 (``%g`` when it needs more digits)."""
    mantissa, exponent = f"{value:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}" if float(f"{value:.0e}") == value else f"{value:g}"


@dataclass
class HealMethodSettings(Settings):
    """Which healer runs."""

    method: str = setting("lora", lambda: HEALERS.describe() + ".")

    def validate(self) -> None:
        self.method = HEALERS.canonical(self.method)

    @property
    def healer(self) -> type[Healer]:
        return HEALERS.get(self.method)


def refuse_foreign_settings(group: Settings, owner: str, chosen: str, chosen_writes: str) -> None:
    """Refuses a value other than its default in ``group``, the settings of healer(s) ``owner``, when
    ``chosen`` runs instead (they would be silently ignored)."""
    refuse_unused(group, (), lambda _name: f"applies to --method {owner} only (--method {chosen} writes "
                                           f"{chosen_writes})")


def refuse_unused_shared(groups: list[Settings], healer: type[Healer]) -> None:
    """Refuses a value given for a shared setting ``healer`` does not read (``Healer.uses``), naming the
    healers that do read it."""
    if healer.uses is None:
        return
    for group in groups:
        def explain(name: str) -> str:
            users = " or ".join(n for n, h in HEALERS.items() if h.uses is None or name in h.uses)
            return f"applies to --method {users}; {healer.name} {healer.unused_note or 'does not read it'}"

        refuse_unused(group, healer.uses, explain)
