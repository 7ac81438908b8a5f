"""The pruning-method contract (what the layer-by-layer driver asks of a method) and its settings.

A method is one file: a :class:`LinearPruner` subclass registered with ``@PRUNERS.register(name)``,
and, when it has options of its own, a :class:`~sparseheal.settings.Settings` group named by its
``settings`` attribute (SparseGPT's block size and dampening). The prune stage's signature, command
line and record take the group from there; its values reach the method as ``options``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sparseheal.errors import ConfigError
from sparseheal.layout import Slot
from sparseheal.registry import PRUNERS
from sparseheal.settings import Settings, setting
from sparseheal.sparsity.masks import apply_mask
from sparseheal.sparsity.patterns import Pattern, parse

__all__ = ["LinearPruner", "PruneSettings", "parse_pattern", "pattern_of", "resolve_sparsity"]


def pattern_of(text: str, flag: str = "--pattern") -> Pattern:
    """Parses a pattern given as ``flag`` (see :mod:`sparseheal.sparsity.patterns`)."""
    try:
        return parse(text)
    except ValueError as err:
        raise ConfigError(flag, str(err)) from None


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """Parses ``--pattern`` as unstructured (None) or N:M ((N, M), 0 < N < M); other kinds are refused."""
    parsed = pattern_of(pattern)
    if parsed.kind not in ("unstructured", "nm"):
        raise ConfigError("--pattern", f"expected 'unstructured' or N:M such as 2:4, got {pattern!r}")
    return parsed.nm


def resolve_sparsity(pattern: tuple[int, int] | Pattern | None, sparsity: float | None,
                     flag: str = "--sparsity") -> float:
    """The sparsity implied by a pattern and ``--sparsity``: unstructured and block tiles default to 0.5;
    N:M and V:N:M imply 1 - N/M and refuse an explicit different ratio."""
    if sparsity is not None and not (0.0 <= sparsity < 1.0):
        raise ConfigError(flag, f"must be in [0, 1), got {sparsity}")
    if isinstance(pattern, tuple):
        pattern = Pattern("nm", n=pattern[0], m=pattern[1])
    implied = None if pattern is None else pattern.implied
    if implied is None:
        return 0.5 if sparsity is None else float(sparsity)
    if sparsity is not None and abs(sparsity - implied) > 1e-9:
        raise ConfigError(flag, f"pattern {pattern.text} implies sparsity {implied:g}; omit {flag} or pass "
                                f"{implied:g}")
    return implied


class LinearPruner:
    """Prunes one linear layer. Subclasses implement ``add_batch`` (if calibrated) and ``select``.

    Attributes:
        needs_calibration: whether the driver must feed layer inputs through ``add_batch``.
        settings: the method's own settings group (None when it has no options).
        statistics: the attributes ``add_batch`` accumulates. Linears that read the same input (q, k and
            v; gate and up) then share one accumulation: the driver feeds one of them and the others
            ``adopt`` its statistics, and they are pruned as one group (:meth:`prune_group`). Empty:
            every linear is fed its own.

    Statistics are sums over tokens, so the statistics of several matrices can be pooled
    (:meth:`absorb`): an expert that no calibration token reaches is pruned with the pooled statistics
    of the other experts of its tensor (see ``calibrate.py``).

    Args:
        module: the matrix to prune: a linear layer (nn.Linear or GPT-2's Conv1D), or a
            :class:`~sparseheal.layout.Slot` (a linear's weight or one expert's matrix of a fused tensor).
        options: the built ``settings`` group (None when the method has none).
    """

    name: ClassVar[str]  # set by the registration
    needs_calibration: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("unstructured", "nm")  # the pattern kinds it selects (vnm and
    # block need ``scores``: a per-weight importance the pattern's selection reads)
    per_row: ClassVar[bool] = True  # unstructured scores compared within each output row (else the matrix)
    settings: ClassVar[type[Settings] | None] = None
    statistics: ClassVar[tuple[str, ...]] = ()
    input_order: torch.Tensor | None = None  # (in,) set when N:M groups run along permuted inputs

    def __init__(self, module: nn.Module | Slot, options: Settings | None = None) -> None:
        self.slot = module if isinstance(module, Slot) else Slot.of_linear(module)
        self.module = self.slot.weight.module  # where a linear's inputs are hooked
        self.options = options

    @classmethod
    def check_pattern(cls, options: Settings | None, pattern: Pattern, flag: str = "--pattern") -> None:
        """Refuses (ConfigError naming the flag) a pattern the method or its options do not define; an
        options group may add its own rule as ``check_pattern(pattern)``."""
        if pattern.kind not in cls.kinds:
            shown = {"unstructured": "unstructured", "nm": "N:M", "vnm": "V:N:M", "block": "block tiles"}
            raise ConfigError(flag, f"--method {cls.name} selects {', '.join(shown[k] for k in cls.kinds)}, "
                                    f"not {pattern.text} (V:N:M and block tiles: wanda, magnitude or ria)")
        if (check := getattr(options, "check_pattern", None)) is not None:
            check(pattern)

    def scores(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, in) importance of each weight (higher is kept), for the shaped patterns."""
        raise NotImplementedError

    def prune_shaped(self, pattern: Pattern, sparsity: float) -> torch.Tensor:
        """Prunes the matrix to a V:N:M or block pattern from :meth:`scores`; returns its stored mask."""
        weight = self.slot.view()  # (out, in) view
        return self.commit(pattern.select(self.scores(weight), sparsity, self.per_row))

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Accumulates statistics of a batch of layer inputs, shaped (B, T, in)."""

    def adopt(self, other: LinearPruner) -> None:
        """Takes the statistics ``other`` accumulated from the same inputs (tensors copied, so that each
        pruner may consume its own)."""
        for attr in self.statistics:
            value = getattr(other, attr)
            setattr(self, attr, value.clone() if isinstance(value, torch.Tensor) else value)

    def absorb(self, other: LinearPruner) -> None:
        """Adds the statistics ``other`` accumulated to this pruner's (pooling sums over tokens)."""
        for attr in self.statistics:
            mine, theirs = getattr(self, attr), getattr(other, attr)
            if hasattr(mine, "absorb"):
                mine.absorb(theirs)
            elif theirs is not None:
                setattr(self, attr, theirs.clone() if mine is None and torch.is_tensor(theirs)
                        else theirs if mine is None else mine + theirs)

    def select(self, weight: torch.Tensor, nm: tuple[int, int] | None, sparsity: float) -> torch.Tensor:
        """Returns the (out, in) keep-mask for ``weight``; may update kept weights in place."""
        raise NotImplementedError

    def prune(self, nm: tuple[int, int] | None, sparsity: float) -> torch.Tensor:
        """Prunes the matrix in place and returns its keep-mask in its stored orientation."""
        weight = self.slot.view()  # (out, in) view
        return self.commit(self.select(weight, nm, sparsity))

    def commit(self, mask: torch.Tensor) -> torch.Tensor:
        """Zeroes the matrix's pruned weights; returns ``mask`` (out, in) in its stored orientation."""
        apply_mask(self.slot.view(), mask)
        return self.slot.stored(mask)

    @classmethod
    def prune_group(cls, group: list[LinearPruner], nm: tuple[int, int] | None,
                    sparsity: float) -> list[torch.Tensor]:
        """Prunes linears that read one input, one by one here; a method may prune them together.

        Args:
            group: the pruners of those linears (``group[1:]`` adopted ``group[0]``'s statistics).
            nm: (n, m) pattern or None.
            sparsity: fraction pruned (unstructured).

        Returns:
            Each linear's keep-mask in its parameter's shape, as :meth:`prune` gives it.
        """
        return [pruner.prune(nm, sparsity) for pruner in group]


@dataclass
class PruneSettings(Settings):
    """What is pruned and how: the method, the ratio and the pattern."""

    method: str = setting("wanda", lambda: PRUNERS.describe() + ".")
    sparsity: float | None = setting(
        None, "fraction of each linear's weights pruned, in [0, 1) (default 0.5; implied by N:M).")
    pattern: str = setting("unstructured", "unstructured; N:M such as 2:4 (N of every M consecutive inputs "
                                           "kept); V:N:M such as 64:2:8 (VENOM); or block:RxC tiles.")
    offload: bool = setting(False, "keep the model in host memory and move one decoder layer at a time to "
                                   "the device.")
    plan: str | None = setting(None, "a YAML sparsity plan: ordered rules giving weights (by family, name "
                                     "glob, layer) a method, pattern and ratio, or skip (docs/methods.md).")
    ignore: str | None = setting(None, "weight names or shell globs kept dense, comma-separated (a rule "
                                       "before the plan's).")

    def validate(self) -> None:
        self.method = PRUNERS.canonical(self.method)
        shape = pattern_of(self.pattern)
        self.pattern = shape.text
        self.sparsity = resolve_sparsity(shape, self.sparsity)

    @property
    def shape(self) -> Pattern:
        """The parsed pattern."""
        return parse(self.pattern)

    @property
    def nm(self) -> tuple[int, int] | None:
        """The (N, M) of an N:M pattern; None for any other."""
        return self.shape.nm

    @property
    def pruner(self) -> type[LinearPruner]:
        return PRUNERS.get(self.method)
