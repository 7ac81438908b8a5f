"""Recipes for ``sparseheal run``: one YAML mapping with a section per stage, checked before any work.

```yaml
model: smollm2-135m
prune: {method: wanda, sparsity: 0.5, nsamples: 128, seqlen: 2048}
heal: {method: lora, max-steps: 1000, block-size: 1024, data: c4, merge: masked}
evaluate: {dataset: wikitext2, seqlen: 2048, tasks: [boolq, piqa]}
output: runs/smollm2-wanda-lora
```

Keys are the flags of ``sparseheal prune``, ``heal`` and ``evaluate`` (dashed or underscored). The keys
that place a stage's output (``output``, ``overwrite``, ``resume``, the input model of a later stage)
belong to ``run`` and are refused in a recipe, so nothing a recipe says is written outside the run
directory. ``heal: {merge: masked|dense}`` adds the ``merged/`` stage. ``heal`` may also be a list of
named heal stages, each healing the pruned model or (``from: NAME``) an earlier stage's output; see
:mod:`sparseheal.run.heals`. Flags override the file: ``--prune sparsity=0.6 --heal max-steps=50``;
with several heal stages ``--heal KEY=VALUE`` sets KEY for every stage and ``--heal NAME.KEY=VALUE`` for
the stage NAME only.

YAML is read with YAML 1.2 number rules, so ``2:4`` stays a string and ``1e-4`` is a float.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparseheal import api
from sparseheal.data import protected_inputs
from sparseheal.errors import ConfigError
from sparseheal.registry import HEALERS
from sparseheal.run.heals import HealItem, route_overrides, split_items
from sparseheal.settings import Field, Stage, flag_keys, parse_yaml

__all__ = [
    "SECTIONS",
    "Recipe",
    "load_recipe",
    "section_defaults",
    "section_fields",
    "validate_recipe",
    "recipe_inputs",
    "check_run_links",
]

SECTIONS = ("prune", "heal", "evaluate")
_TOP = ("model", "output", *SECTIONS)
STAGES: dict[str, Stage] = {"prune": api.PRUNE, "heal": api.HEAL, "evaluate": api.EVALUATE}
# keys that run sets itself (where a stage writes, and what it reads from the stage before)
_RUN_KEYS = {
    "prune": {"model", "output", "overwrite"},
    "heal": {"pruned_dir", "output", "overwrite", "resume"},
    "evaluate": {"model", "adapter", "output", "overwrite"},
}


def section_fields(section: str) -> dict[str, Field]:
    """The recipe keys of ``section``: its stage's settings less those run sets itself."""
    return {f.name: f for f in STAGES[section].fields() if f.name not in _RUN_KEYS[section]}


def section_defaults(section: str) -> dict[str, Any]:
    """Every recipe key of ``section`` with its default."""
    return {name: f.default for name, f in section_fields(section).items()}


def _closest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""


def _coerce(kind: Any, value: Any, where: str) -> Any:
    """Fits a YAML value to the setting's type: numbers from strings, lists joined with commas."""
    types = set(typing.get_args(kind)) or {kind}
    if isinstance(value, list) and str in types:
        return ",".join(map(str, value))
    if isinstance(value, str) and (float in types or int in types) and str not in types:
        try:
            return int(value) if int in types and float not in types else float(value)
        except ValueError as err:
            raise ConfigError(where, f"expected a number, got {value!r}") from err
    if isinstance(value, int) and not isinstance(value, bool) and float in types:
        return float(value)
    return value


def _section(section: str, data: Any, where: str, label: str | None = None) -> dict[str, Any]:
    """Checks the keys of one stage's mapping; errors name ``where: LABEL.KEY`` (LABEL: the section)."""
    label = label or section
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {label}", "must be a mapping of flag names to values")
    keys = section_fields(section)
    valid = sorted(keys)
    out = {}
    flag_keys(data, f"{where}: {label}")  # both spellings of one setting: refused
    for raw, value in data.items():
        key = str(raw).replace("-", "_")
        flag = f"{where}: {label}.{raw}"
        if key in _RUN_KEYS[section]:
            raise ConfigError(flag, "set by run (stages write to RUN_DIR/pruned, healed, merged, eval); "
                                    "remove it from the recipe")
        if key not in keys:
            listing = ", ".join(k.replace("_", "-") for k in valid)
            raise ConfigError(flag, f"unknown key{_closest(key, valid)} (valid: {listing})")
        out[key] = _coerce(keys[key].type, value, flag)
    return out


@dataclass
class Recipe:
    """A validated recipe: the dense model, the run directory, the prune and evaluate settings, and the
    heal stages (one, or several named ones)."""

    model: str
    output: Path
    prune: dict[str, Any] = field(default_factory=dict)
    heals: list[HealItem] = field(default_factory=lambda: [HealItem("heal")])
    evaluate: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # the recipe file, when one was given

    @property
    def heal(self) -> dict[str, Any]:
        """The settings of the recipe's heal stage, when it has one (see ``heals`` for several)."""
        if len(self.heals) != 1:
            raise ValueError(f"the recipe has {len(self.heals)} heal stages; read Recipe.heals")
        return self.heals[0].settings

    def to_dict(self) -> dict[str, Any]:
        """The effective recipe (dashed keys, as a user writes it)."""
        def dashed(values: dict[str, Any]) -> dict[str, Any]:
            return {k.replace("_", "-"): v for k, v in values.items()}

        one = len(self.heals) == 1 and self.heals[0].label == "heal"
        heal = self.heals[0].to_dict() if one else [item.to_dict() for item in self.heals]
        return {"model": self.model, "prune": dashed(self.prune), "heal": heal,
                "evaluate": dashed(self.evaluate), "output": str(self.output)}


def _overrides(section: str, items: list[str] | None, label: str | None = None) -> dict[str, Any]:
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--{section}", f"expected KEY=VALUE (e.g. --{section} seed=1), got {item!r}")
        key = key.strip()
        pairs[key] = parse_yaml(value, f"--{section}", f"the value of {key}") if value.strip() else None
    return _section(section, pairs, f"--{section}", label) if pairs else {}


def _heal_items(data: Any, where: str, pairs: list[str] | None) -> list[HealItem]:
    """The recipe's heal stages with their checked keys, ``--heal`` overrides applied."""
    items = split_items(data, where)
    routed = route_overrides(pairs, [item for item, _ in items])
    for index, (item, raw) in enumerate(items):
        item.settings = {**_section("heal", raw, where, item.label),
                         **_overrides("heal", routed[index], item.label)}
    return [item for item, _ in items]


def _read_file(config: str) -> dict[str, Any]:
    path = Path(config).expanduser()
    if not path.is_file():
        raise ConfigError("--config", f"{config} is not a file")
    data = parse_yaml(path.read_text(), "--config", config)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{config} must hold a mapping with sections {', '.join(_TOP)}")
    for key in data:
        if key not in _TOP:
            raise ConfigError(f"{config}: {key}",
                              f"unknown section{_closest(str(key), list(_TOP))} (valid: {', '.join(_TOP)})")
    return data


def load_recipe(
    config: str | None,
    output: str | None,
    model: str | None,
    overrides: dict[str, list[str] | None],
) -> Recipe:
    """Reads the recipe file (if any), applies flag overrides, and checks every key's name and type."""
    data = _read_file(config) if config else {}
    where = config or "recipe"
    sections = {s: {**_section(s, data.get(s), where), **_overrides(s, overrides.get(s))}
                for s in ("prune", "evaluate")}
    heals = _heal_items(data.get("heal"), where, overrides.get("heal"))
    model = model or data.get("model")
    if not model or not isinstance(model, str):
        raise ConfigError("--model", "give the dense model in the recipe (model: ...) or with --model")
    output = output or data.get("output")
    if not output or not isinstance(output, str):
        raise ConfigError("--output", "give the run directory in the recipe (output: ...) or with --output")
    run_dir = Path(output).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("--output", f"{run_dir} exists and is not a directory")
    return Recipe(model=model, output=run_dir, source=config, heals=heals, **sections)


def recipe_inputs(recipe: Recipe) -> list[tuple[str, str | None]]:
    """What a run reads from outside its directory: the model, the recipe file and the data files."""
    from sparseheal.models import input_path

    files = [("model", input_path(recipe.model)), ("--config", recipe.source)]
    named = [("prune.calibration-data", recipe.prune.get("calibration_data"))]
    for item in recipe.heals:
        named += [(f"{item.label}.data", item.settings.get("data")),
                  (f"{item.label}.teacher", input_path(item.settings.get("teacher")))]
    named += [("evaluate.dataset", d) for d in str(recipe.evaluate.get("dataset") or "").split(",")]
    found = files + [(key, path) for key, path in named if path and Path(path).expanduser().exists()]
    return found + protected_inputs(recipe.prune.get("data_dir"))


def check_run_links(run_dir: Path) -> None:
    """Refuses a link inside the run directory (or its eval/) that leads outside it: run writes through
    such links, so a stage would write outside the run directory."""
    root = run_dir.expanduser().resolve()
    if not root.is_dir():
        return
    entries = list(root.iterdir())
    if (root / "eval").is_dir():
        entries += list((root / "eval").iterdir())
    for entry in entries:
        target = entry.resolve()
        if entry.is_symlink() and target != root and root not in target.parents:
            raise ConfigError("--output", f"{entry} links to {target}, outside the run directory {root}; "
                                          "run writes every stage inside it: remove the link")


def _as_recipe_error(section: str, err: ConfigError) -> ConfigError:
    if err.flag.isupper():  # a positional argument: MODEL is the recipe's model
        return ConfigError("model", err.message)
    key = err.flag.lstrip("-").replace("_", "-")
    return ConfigError(f"{section}.{key}", err.message)


def _built(section: str, values: dict[str, Any]) -> dict:
    """The section's settings groups, built (so each checks its values), without the stage's inputs."""
    stage = STAGES[section]
    fields = section_fields(section)
    groups = [g for g in stage.groups if any(f.name in fields for f in g.fields())]
    return {g: g(**{k: v for k, v in values.items() if k in g.defaults()}) for g in groups}


def _check_section(section: str, recipe: Recipe) -> None:
    built = _built(section, getattr(recipe, section))
    if section == "prune":
        api.check_prune_model(recipe.model, built[api.PruneSettings], built[api.CalibrationSettings])
    else:
        api.check_evaluate_model(recipe.model, built)


def _check_heal(item: HealItem, recipe: Recipe) -> None:
    """One heal stage's values; pruned/ does not exist yet, so its structure is the dense model's."""
    from sparseheal.heal.pipeline import check_heal_model, plan_heal

    built = _built("heal", item.settings)
    job = plan_heal(str(recipe.output / "pruned"), str(recipe.output / f"healed{item.suffix}"), False, built)
    check_heal_model(recipe.model, job)


def _check_sources(heals: list[HealItem]) -> None:
    """A stage healed further must leave a sparse model: a healer that writes an adapter needs a masked
    merge, whose merged model the next stage heals."""
    by_name = {item.name: item for item in heals if item.name}
    for item in heals:
        if item.source is None:
            continue
        source = by_name[item.source]
        healer = HEALERS.get(str(source.settings.get("method") or section_defaults("heal")["method"]))
        if not healer.can_merge or source.merge_mode == "masked":
            continue
        if source.merge_mode == "none":
            why = f"writes {healer.writes}, not a model to heal further"
        else:
            why = "merges densely, which fills the pruned weights"
        raise ConfigError(f"{item.label}.from", f"{source.label} ({source.name}) {why}; give {source.label} "
                                                "merge: masked and this stage heals its merged model")


def validate_recipe(recipe: Recipe) -> None:
    """Checks every stage's values (its settings groups) and what can be checked of its inputs now
    (the dense model's config, data files, zero-shot tasks) before any model is loaded.

    Errors name the recipe key (``heal.lr``) rather than the flag.
    """
    for section in ("prune", "evaluate"):
        try:
            _check_section(section, recipe)
        except ConfigError as err:
            raise _as_recipe_error(section, err) from err
    for item in recipe.heals:
        try:
            _check_heal(item, recipe)
        except ConfigError as err:
            raise _as_recipe_error(item.label, err) from err
    _check_sources(recipe.heals)
    tasks = recipe.evaluate.get("tasks")
    if tasks:
        from sparseheal.evaluate.zeroshot import prepare_tasks

        try:
            with prepare_tasks(tasks, recipe.evaluate.get("data_dir")):
                pass
        except ConfigError as err:
            raise _as_recipe_error("evaluate", err) from err
