"""The heal stages of a recipe: ``heal:`` as one mapping (one stage) or a list of named stages.

```yaml
heal:
  - {name: lora, method: lora, max-steps: 40, merge: masked}
  - {name: full, method: full, max-steps: 40, lr: 3.0e-4}
  - {name: full-after-lora, from: lora, method: full, max-steps: 20}
```

A stage named ``NAME`` writes ``RUN_DIR/healed-NAME/`` (and ``merged-NAME/``), evaluated into
``eval/healed-NAME.json`` (and ``merged-NAME.json``); the one stage of a mapping (or of a list item without
a name) keeps the plain ``healed/`` and ``merged/``. ``from: NAME`` heals that earlier stage's output
instead of the pruned model. Names are letters, digits and dashes, unique, and required when the list
holds several stages. This module checks the structure only; the keys of each stage are the heal
section's and are checked by :mod:`sparseheal.run.recipe`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sparseheal.errors import ConfigError

__all__ = ["HealItem", "STRUCTURE_KEYS", "split_items", "route_overrides"]

STRUCTURE_KEYS = ("name", "from")
_NAME = re.compile(r"[A-Za-z0-9]+(-[A-Za-z0-9]+)*")
_NAME_RULE = "letters, digits and single dashes between them, at most 40 characters"


@dataclass
class HealItem:
    """One heal stage of a recipe.

    Attributes:
        label: where its keys live in the recipe, for errors: ``heal`` or ``heal[1]``.
        name: its name (None for the one unnamed stage, which writes ``healed/``).
        source: the name of the earlier stage whose output it heals (None: the pruned model).
        settings: its heal settings (underscored keys), as given.
    """

    label: str
    name: str | None = None
    source: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def suffix(self) -> str:
        """``-NAME`` for a named stage, empty for the unnamed one (directory and unit names)."""
        return f"-{self.name}" if self.name else ""

    @property
    def merge_mode(self) -> str:
        """Its ``merge`` setting: none, masked or dense."""
        return self.settings.get("merge") or "none"

    def to_dict(self) -> dict[str, Any]:
        """The stage as a user writes it (dashed keys, name and from first)."""
        head = {"name": self.name} if self.name else {}
        head.update({"from": self.source} if self.source else {})
        return {**head, **{k.replace("_", "-"): v for k, v in self.settings.items()}}


def _check_name(value: Any, label: str, where: str) -> str:
    if not isinstance(value, str) or len(value) > 40 or not _NAME.fullmatch(value):
        raise ConfigError(f"{where}: {label}.name", f"{value!r} is not a valid name; use {_NAME_RULE}")
    return value


def _items_of(data: Any, where: str) -> list[tuple[str, dict]]:
    """(label, mapping) per stage: a mapping is one stage labelled ``heal``, a list is labelled by index."""
    if data is None:
        return [("heal", {})]
    if isinstance(data, dict):
        return [("heal", data)]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{where}: heal", "must be a mapping of flag names to values, or a non-empty list "
                                            "of them (one per heal stage)")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: heal[{i}]", "must be a mapping of flag names to values")
    return [(f"heal[{i}]", item) for i, item in enumerate(data)]


def split_items(data: Any, where: str) -> list[tuple[HealItem, dict]]:
    """The heal stages of the recipe's ``heal`` section, each with its remaining (unchecked) keys.

    Raises:
        ConfigError: naming ``heal[I].name`` or ``heal[I].from`` for a missing, malformed or repeated
            name, or a ``from`` that names no earlier stage.
    """
    items = _items_of(data, where)
    every = [raw.get("name") for _, raw in items]
    found: list[tuple[HealItem, dict]] = []
    earlier: dict[str, str] = {}
    for label, raw in items:
        given = {str(k).replace("_", "-"): v for k, v in raw.items()}
        rest = {k: v for k, v in raw.items() if str(k).replace("_", "-") not in STRUCTURE_KEYS}
        name = _check_name(given["name"], label, where) if "name" in given else None
        if name is None and len(items) > 1:
            raise ConfigError(f"{where}: {label}.name", f"required when heal lists several stages "
                                                        f"({_NAME_RULE})")
        if name in earlier:
            raise ConfigError(f"{where}: {label}.name", f"{name!r} already names {earlier[name]}; names "
                                                        "must be unique")
        source = given.get("from")
        if source is not None:
            _check_source(source, name, earlier, every, f"{where}: {label}.from")
        if name is not None:
            earlier[name] = label
        found.append((HealItem(label, name, source), rest))
    return found


def _check_source(source: Any, name: str | None, earlier: dict[str, str], every: list, flag: str) -> None:
    """``from`` must name a stage listed before this one."""
    if source == name:
        raise ConfigError(flag, f"{source!r} is this stage itself; name an earlier heal stage")
    if isinstance(source, str) and source in earlier:
        return
    listed = ", ".join(earlier) or "none"
    if isinstance(source, str) and source in every:
        raise ConfigError(flag, f"{source!r} comes later in the list; a stage heals the output of one listed "
                                f"before it (earlier: {listed})")
    raise ConfigError(flag, f"no earlier heal stage is named {source!r} (earlier: {listed})")


def route_overrides(pairs: list[str] | None, items: list[HealItem]) -> dict[int, list[str]]:
    """Sorts ``--heal`` values by stage: ``KEY=VALUE`` applies to every stage, ``NAME.KEY=VALUE`` to the
    stage NAME only (keys hold no dots). Returns the ``KEY=VALUE`` strings per stage index, the
    every-stage ones first.

    Raises:
        ConfigError("--heal"): for a NAME no stage has, or for ``name`` and ``from`` (the recipe's
            structure, set in the file only).
    """
    common, named = [], {i: [] for i in range(len(items))}
    by_name = {item.name: i for i, item in enumerate(items) if item.name}
    for value in pairs or []:
        key, sep, rest = value.partition("=")
        target, dot, bare = key.strip().rpartition(".")
        if (bare.strip() if dot else key.strip()).replace("_", "-") in STRUCTURE_KEYS and sep:
            raise ConfigError("--heal", f"{key.strip()} is part of the recipe's structure; set it in the "
                                        "recipe file")
        if not dot:
            common.append(value)
        elif target in by_name:
            named[by_name[target]].append(f"{bare}{sep}{rest}")
        else:
            listed = ", ".join(by_name) or "none (the recipe's heal stage has no name)"
            raise ConfigError("--heal", f"{target!r} names no heal stage (names: {listed}); use "
                                        "--heal KEY=VALUE for every stage or --heal NAME.KEY=VALUE for one")
    return {i: common + named[i] for i in named}
