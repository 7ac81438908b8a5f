"""Settings declared once: each a dataclass field with its type, default, help, allowed values, check.

A settings group is a dataclass subclassing :class:`Settings`, owned by the module that uses it
(``LoraSettings`` in heal/lora.py, ``CalibrationSettings`` in sparsity/calibrate.py, ...)::

    @dataclass
    class LoraSettings(Settings):
        rank: int = setting(8, "LoRA rank r.", check=positive)

A group checks its own values exactly once, when it is built (each field's ``check`` and ``choices``,
then the group's :meth:`Settings.validate`). A :class:`Stage` strings groups together into one
stage's settings; the Python API signature, the command line (``cli.py``), recipe keys and records are
all derived from it. Nothing here touches the file system or a model: a stage's preflight does that.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import yaml

from sparseheal.checks import Check, finite, one_of
from sparseheal.errors import ConfigError

__all__ = ["REQUIRED", "setting", "Settings", "Field", "Stage", "flag_of", "parse_yaml", "flag_keys",
           "refuse_unused"]

REQUIRED: Any = inspect.Parameter.empty  # the default of a setting that must be given
S = TypeVar("S", bound="Settings")


def setting(default: Any, help: str | Callable[[], str], *, check: Check | None = None,
            choices: Sequence[str] | None = None,
            resumable: bool = False, positional: bool = False) -> Any:
    """Declares one setting as a dataclass field.

    Args:
        default: its default (``REQUIRED`` when it must be given).
        help: one line for ``--help`` and the API docstring (or a function returning it, for help that
            lists what is registered).
        check: ``check(flag, value)`` raising ConfigError for a bad value.
        choices: the allowed values (checked, and listed in the error).
        resumable: may change when an interrupted heal is resumed (it does not change what is trained).
        positional: the command line takes it as an argument instead of a flag.
    """
    meta = {"help": help, "check": check, "choices": tuple(choices) if choices else None,
            "resumable": resumable, "positional": positional}
    return dataclasses.field(default=default, metadata=meta)


def flag_of(name: str) -> str:
    """The command-line flag of a setting: ``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Field:
    """One declared setting, as the API, the CLI and recipes see it."""

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple[str, ...] | None
    resumable: bool
    positional: bool
    group: type[Settings]

    @property
    def flag(self) -> str:
        return self.name.upper() if self.positional else flag_of(self.name)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


class Settings:
    """Base of a settings group (subclasses are dataclasses whose fields come from :func:`setting`)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is REQUIRED:
                raise ConfigError(flag_of(f.name), "is required")
            flag = f.name.upper() if f.metadata.get("positional") else flag_of(f.name)
            finite(flag, value)
            if f.metadata.get("choices"):
                one_of(f.metadata["choices"])(flag, value)
            if f.metadata.get("check"):
                f.metadata["check"](flag, value)
        self.validate()

    def validate(self) -> None:
        """Checks that involve several fields of the group (and normalises values); none by default."""

    @classmethod
    def fields(cls) -> list[Field]:
        """The group's declared settings, in declaration order."""
        hints = typing.get_type_hints(cls)
        helps = {f.name: f.metadata["help"]() if callable(f.metadata["help"]) else f.metadata["help"]
                 for f in dataclasses.fields(cls)}
        return [Field(f.name, hints[f.name], f.default, helps[f.name], f.metadata["choices"],
                      f.metadata["resumable"], f.metadata["positional"], cls)
                for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def values(self) -> dict[str, Any]:
        """The group's values by setting name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class Stage:
    """A stage's settings: its groups in order, from which its API function and command are derived.

    Args:
        name: the command name (``prune``).
        groups: the settings groups, in the order the signature lists them (a name may appear once).
    """

    def __init__(self, name: str, groups: Sequence[type[Settings]]) -> None:
        self.name = name
        self.groups = tuple(groups)
        seen: dict[str, type[Settings]] = {}
        for group in self.groups:
            for f in group.fields():
                if f.name in seen:
                    raise TypeError(f"{name}: {f.name} is declared by {seen[f.name].__name__} and "
                                    f"{group.__name__}")
                seen[f.name] = group

    def fields(self) -> list[Field]:
        return [f for group in self.groups for f in group.fields()]

    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in self.fields()}

    def signature(self, returns: Any = inspect.Signature.empty) -> inspect.Signature:
        params = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default,
                                    annotation=f.type) for f in self.fields()]
        ordered = sorted(params, key=lambda p: p.default is not REQUIRED)  # required ones first
        return inspect.Signature(ordered, return_annotation=returns)

    def build(self, values: dict[str, Any]) -> dict[type[Settings], Settings]:
        """Every group built (and so checked) from ``values`` (a name not declared is a TypeError)."""
        unknown = set(values) - {f.name for f in self.fields()}
        if unknown:
            raise TypeError(f"{self.name}() got unexpected settings: {', '.join(sorted(unknown))}")
        return {group: group(**{n: values[n] for n in group.defaults() if n in values})
                for group in self.groups}

    def api(self, preflight: Callable[[dict], Any] | None = None) -> Callable[[Callable], Callable]:
        """Decorator: turns ``func(built)`` (``built``: every group of the stage, built and so checked, by
        class) into the stage's public function, with a signature listing every setting and an ``Args:``
        section generated from the declarations. ``preflight(built)``, the stage's checks of files and
        model configs, becomes the function's ``preflight`` attribute (same arguments, no work done)."""

        def decorate(func: Callable) -> Callable:
            signature = self.signature(inspect.signature(func).return_annotation)

            def built_from(args: tuple, kwargs: dict) -> dict[type[Settings], Settings]:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                return self.build(dict(bound.arguments))

            @functools.wraps(func)
            def stage_function(*args: Any, **kwargs: Any) -> Any:
                return func(built_from(args, kwargs))

            stage_function.__signature__ = signature  # type: ignore[attr-defined]
            stage_function.__doc__ = _document(inspect.getdoc(func) or "", self.fields())
            stage_function.stage = self  # type: ignore[attr-defined]
            if preflight is not None:
                stage_function.preflight = lambda *a, **k: preflight(built_from(a, k))  # type: ignore
            return stage_function

        return decorate


def _document(doc: str, fields: list[Field]) -> str:
    """``doc`` with an ``Args:`` section listing ``fields`` inserted after its first paragraph."""
    head, _, rest = doc.partition("\n\n")
    args = "\n".join(f"    {f.name}: {f.help}" for f in fields)
    return f"{head}\n\nArgs:\n{args}" + (f"\n\n{rest}" if rest else "")


# --- YAML with YAML 1.2 number rules (``2:4`` stays a string, ``1e-4`` is a float) ------------------

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"


class _DuplicateKey(Exception):
    def __init__(self, key: Any) -> None:
        super().__init__(key)
        self.key = key


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 numbers: no sexagesimal ``2:4`` ints, and ``1e-4`` is a float; a mapping
    that repeats a key is refused (YAML says keys are unique; PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(key)
            seen.add(key if isinstance(key, (str, int, float, bool)) else id(key_node))
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$"
               r"|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


MAX_YAML_VALUES = 10_000  # values a settings file may expand to, aliases counted each time they are used
MAX_YAML_DEPTH = 20


def _check_size(data: Any, flag: str, what: str) -> None:
    """Refuses YAML whose aliases expand it beyond ``MAX_YAML_VALUES`` values or ``MAX_YAML_DEPTH`` levels
    (an alias bomb parses in microseconds and takes forever to use)."""
    count, stack = 0, [(data, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_YAML_VALUES or depth > MAX_YAML_DEPTH:
            limit = f"{MAX_YAML_VALUES} values" if count > MAX_YAML_VALUES else f"{MAX_YAML_DEPTH} levels"
            raise ConfigError(flag, f"{what} expands to more than {limit} (repeated YAML aliases?); "
                                    "write the values out")
        if isinstance(node, dict):
            stack += [(v, depth + 1) for kv in node.items() for v in kv]
        elif isinstance(node, list):
            stack += [(v, depth + 1) for v in node]


def parse_yaml(text: str, flag: str, what: str = "the text") -> Any:
    """Parses YAML text with the recipe number rules; a syntax error names ``flag`` and ``what``, and
    so does YAML that expands to more than a settings file can hold."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(flag, f"{what} is not valid YAML ({err.__class__.__name__})") from err
    except _DuplicateKey as err:
        raise ConfigError(flag, f"{what} gives the key {err.key!r} twice; keep one") from None
    _check_size(data, flag, what)
    return data


def refuse_unused(group: Settings, used: Collection[str], explain: Callable[[str], str]) -> None:
    """Refuses a value other than its default for a setting of ``group`` that is not in ``used`` (it would be
    ignored silently); ``explain(name)`` says to whom the setting applies. The one rule for settings the
    chosen method or healer does not read (another method's options, a shared setting a healer skips)."""
    for name, default in type(group).defaults().items():
        if name not in used and getattr(group, name) != default:
            raise ConfigError(flag_of(name), explain(name))


def flag_keys(data: dict, flag: str) -> dict[str, Any]:
    """A mapping's keys as setting names (``max-steps`` -> ``max_steps``); the two spellings of one setting
    given together are refused, whatever their values."""
    out: dict[str, Any] = {}
    spelled: dict[str, Any] = {}
    for raw, value in data.items():
        name = str(raw).replace("-", "_")
        if name in out:
            raise ConfigError(flag, f"{spelled[name]!r} and {raw!r} name one setting; keep one")
        out[name], spelled[name] = value, raw
    return out
