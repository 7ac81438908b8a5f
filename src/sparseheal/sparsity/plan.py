"""Sparsity plans: ordered rules that give each prunable weight its method, pattern and ratio, or keep it
dense.

A plan file (``prune --plan plan.yaml``) is a mapping::

    all_must_match: false        # true: a weight no rule matches is an error (else the flags apply)
    rules:
      - layers: 0                # match by layer (an index, "a-b", or [a, b], inclusive) ...
        skip: true               # ... and keep it dense
      - family: attention        # ... by family (attention, mlp, experts; one or a list)
        pattern: unstructured
        sparsity: 0.4
      - names: "*.mlp.*"         # ... by name: shell globs on the weight's key (one or a list)
        pattern: "2:4"
        method: magnitude

A rule's match keys all have to hold; what it does not say (method, pattern, sparsity) comes from the
command's flags, which are also the rule for any weight no rule matches. The first matching rule wins.
``--ignore NAMES`` puts a rule keeping those names or globs dense before all others.

Everything is checked against the model's structure (names, families, shapes) before weights load:
a rule that matches nothing, a pattern that does not fit a weight it matches, or a method that cannot
select the pattern is an error naming the rule.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sparseheal.errors import ConfigError
from sparseheal.layout import FAMILIES
from sparseheal.sparsity.patterns import Pattern, parse

__all__ = ["Module", "Rule", "Assignment", "read_plan", "ignore_rule", "assign"]

_FLAG = "--plan"
_MATCH_KEYS = ("family", "names", "layers")
_ACTION_KEYS = ("skip", "method", "pattern", "sparsity")


@dataclass(frozen=True)
class Module:
    """What a rule can match a weight by: its family, decoder layer and (out, in) shape."""

    family: str
    layer: int
    out_features: int
    in_features: int


@dataclass
class Rule:
    """One rule of a plan (``index`` counts from 1; 0 is ``--ignore``)."""

    index: int
    families: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    layers: tuple[int, int] | None = None
    skip: bool = False
    method: str | None = None
    pattern: Pattern | None = None
    sparsity: float | None = None
    raw: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        said = ", ".join(f"{k} {v}" for k, v in self.raw.items() if k in _MATCH_KEYS) or "every weight"
        return "--ignore" if self.index == 0 else f"rule {self.index} ({said})"

    def matches(self, key: str, module: Module) -> bool:
        if self.families and module.family not in self.families:
            return False
        if self.names and not any(fnmatch.fnmatchcase(key, glob) for glob in self.names):
            return False
        return self.layers is None or self.layers[0] <= module.layer <= self.layers[1]


@dataclass(frozen=True)
class Assignment:
    """What a weight gets: method, pattern and sparsity, and the rule that said so."""

    method: str
    pattern: Pattern
    sparsity: float
    rule: str


def _strings(value, what: str, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, (str, int)) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(_FLAG, f"{where}: {what} must be a name or a list of names")
    return tuple(items)


def _layers(value, where: str) -> tuple[int, int]:
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        return value, value
    if isinstance(value, str) and "-" in value and all(p.strip().isdigit() for p in value.split("-", 1)):
        lo, hi = (int(p) for p in value.split("-", 1))
        if lo <= hi:
            return lo, hi
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        if 0 <= value[0] <= value[1]:
            return value[0], value[1]
    raise ConfigError(_FLAG, f"{where}: layers must be an index, 'a-b' or [a, b] with a <= b, got {value!r}")


def _rule(index: int, raw) -> Rule:
    where = f"rule {index}"
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(_FLAG, f"{where} must be a mapping of {', '.join(_MATCH_KEYS + _ACTION_KEYS)}")
    unknown = [k for k in raw if k not in _MATCH_KEYS + _ACTION_KEYS]
    if unknown:
        raise ConfigError(_FLAG, f"{where}: unknown key {unknown[0]!r}; allowed: "
                                 f"{', '.join(_MATCH_KEYS + _ACTION_KEYS)}")
    rule = Rule(index, raw=dict(raw))
    if "family" in raw:
        rule.families = _strings(raw["family"], "family", where)
        bad = [f for f in rule.families if f not in FAMILIES[:3]]
        if bad:
            raise ConfigError(_FLAG, f"{where}: unknown family {bad[0]!r}; choose from "
                                     f"{', '.join(FAMILIES[:3])}")
    if "names" in raw:
        rule.names = _strings(raw["names"], "names", where)
    if "layers" in raw:
        rule.layers = _layers(raw["layers"], where)
    return _actions(rule, raw, where)


def _actions(rule: Rule, raw: dict, where: str) -> Rule:
    rule.skip = raw.get("skip", False)
    if not isinstance(rule.skip, bool):
        raise ConfigError(_FLAG, f"{where}: skip must be true or false")
    if rule.skip and any(k in raw for k in ("method", "pattern", "sparsity")):
        raise ConfigError(_FLAG, f"{where}: a rule that skips gives no method, pattern or sparsity")
    if "method" in raw:
        rule.method = str(raw["method"])
    if "pattern" in raw:
        try:
            rule.pattern = parse(str(raw["pattern"]))
        except ValueError as err:
            raise ConfigError(_FLAG, f"{where}: {err}") from None
    if "sparsity" in raw:
        value = raw["sparsity"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(_FLAG, f"{where}: sparsity must be in [0, 1), got {value!r}")
        rule.sparsity = float(value)
    return rule


def read_plan(path: str | Path) -> tuple[list[Rule], bool]:
    """The rules of a plan file and its ``all_must_match`` (ConfigError naming ``--plan`` or the rule)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(_FLAG, f"{path} is not a file")
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(_FLAG, f"{path} is not YAML ({type(err).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list) or not data["rules"]:
        raise ConfigError(_FLAG, f"{path} must be a mapping with a non-empty list 'rules'")
    extra = [k for k in data if k not in ("rules", "all_must_match")]
    if extra:
        raise ConfigError(_FLAG, f"{path}: unknown key {extra[0]!r}; allowed: rules, all_must_match")
    strict = data.get("all_must_match", False)
    if not isinstance(strict, bool):
        raise ConfigError(_FLAG, f"{path}: all_must_match must be true or false")
    return [_rule(i, raw) for i, raw in enumerate(data["rules"], start=1)], strict


def ignore_rule(ignore: str) -> Rule:
    """``--ignore``: names or globs (comma-separated) kept dense."""
    globs = tuple(g.strip() for g in ignore.split(",") if g.strip())
    if not globs:
        raise ConfigError("--ignore", "give weight names or shell globs, comma-separated (such as "
                                      "'*.o_proj')")
    return Rule(0, names=globs, skip=True, raw={"names": ",".join(globs)})


def assign(rules: list[Rule], modules: dict[str, Module], default: Assignment, strict: bool,
           check: Callable[[str, Pattern, str], None]) -> dict[str, Assignment | None]:
    """Each weight's assignment (None: dense), the first matching rule winning.

    Args:
        rules: the plan's rules (``--ignore`` first).
        modules: every prunable weight by key.
        default: what the command's flags say (the rule for weights no rule matches).
        strict: a weight no rule matches is an error.
        check: ``check(method, pattern, where)`` refuses a method that cannot select a pattern.
    """
    out: dict[str, Assignment | None] = {}
    used = set()
    for key, module in modules.items():
        rule = next((r for r in rules if r.matches(key, module)), None)
        if rule is None and strict:
            raise ConfigError(_FLAG, f"no rule matches {key} and all_must_match is true")
        used.add(None if rule is None else rule.index)
        if rule is None and (why := default.pattern.misfit(module.out_features, module.in_features)):
            raise ConfigError("--pattern", f"{key} (no rule matches it) is {module.out_features}x"
                                           f"{module.in_features}: {why}")
        out[key] = default if rule is None else _assignment(rule, key, module, default, check)
    for rule in rules:
        if rule.index not in used:
            flag = "--ignore" if rule.index == 0 else _FLAG
            raise ConfigError(flag, f"{rule.label} matches no prunable weight of the model (or an earlier "
                                    "rule took every weight it matches)")
    return out


def _assignment(rule: Rule, key: str, module: Module, default: Assignment,
                check: Callable[[str, Pattern, str], None]) -> Assignment | None:
    if rule.skip:
        return None
    pattern = rule.pattern or default.pattern
    sparsity = pattern.implied if pattern.implied is not None else (
        rule.sparsity if rule.sparsity is not None else default.sparsity)
    implied = pattern.implied
    if rule.sparsity is not None and implied is not None and abs(rule.sparsity - implied) > 1e-9:
        raise ConfigError(_FLAG, f"{rule.label}: pattern {pattern.text} implies sparsity {pattern.implied:g}")
    if (why := pattern.misfit(module.out_features, module.in_features)) is not None:
        raise ConfigError(_FLAG, f"{rule.label}: {key} is {module.out_features}x{module.in_features}: {why}")
    method = rule.method or default.method
    check(method, pattern, rule.label)
    return Assignment(method, pattern, sparsity, rule.label)
