"""The package's layout: no import cycle (imports inside functions included), the ground floor imports
nothing above it, orchestration stays above the stage API, and no module tests a healer's name."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import sparseheal
from sparseheal import api
from sparseheal.registry import HEALERS, PRUNERS

SRC = Path(sparseheal.__file__).parent
GROUND = ("sparseheal.errors", "sparseheal.checks", "sparseheal.settings")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the sparseheal modules it imports, at any depth of its code (functions too).

    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``. Importing a
    module also runs the ``__init__`` of every package above it, except the top-level ``sparseheal``
    (whose ``__init__`` only gathers the public API) and the packages the importing module itself lies
    in (they are already being imported: a package's ``__init__`` importing its own modules to register
    them is no cycle).
    """
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
        edges = set()
        for target in (t for t in targets if t.startswith("sparseheal")):
            parts = target.split(".")
            edges |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        own = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))}
        graph[name] = {t for t in edges if t in modules and t != name and t not in own}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_find_cycle_names_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_ground_floor_imports_nothing_above_it():
    graph = import_graph()
    for module in GROUND:
        assert graph[module] <= set(GROUND), (module, graph[module] - set(GROUND))


def test_orchestration_is_above_the_stages():
    graph = import_graph()
    for module, targets in graph.items():
        if not module.startswith(("sparseheal.run", "sparseheal.cli", "sparseheal.__main__")) \
                and module != "sparseheal":
            assert not {t for t in targets if t.startswith("sparseheal.run")}, module


def test_no_module_tests_a_healer_or_method_name():
    """A registered name appears as a string only in its own file (and in help or messages)."""
    names = {n: impl for n, impl in [*HEALERS.items(), *PRUNERS.items()]}
    for module, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    if isinstance(side, ast.Constant) and side.value in names:
                        owner = inspect.getsourcefile(names[side.value])
                        assert Path(owner) == path, f"{module} compares with {side.value!r}"


def test_each_stage_signature_comes_from_its_settings():
    for stage_function in (api.prune, api.heal, api.merge, api.evaluate, api.inspect, sparseheal.run,
                           sparseheal.report):
        params = inspect.signature(stage_function).parameters
        fields = stage_function.stage.fields()
        required = [f.name for f in fields if f.required]
        assert list(params) == required + [f.name for f in fields if not f.required]
        documented = inspect.getdoc(stage_function)
        assert all(f"    {name}: " in documented for name in params), stage_function.__name__


def test_every_default_is_written_once():
    """No stage declares a setting twice, and a default is the declaration's (the API shows it as is)."""
    for stage_function in (api.prune, api.heal, api.merge, api.evaluate, api.inspect):
        fields = stage_function.stage.fields()
        assert len({f.name for f in fields}) == len(fields)
        params = inspect.signature(stage_function).parameters
        assert all(params[f.name].default is f.default for f in fields)


def test_files_stay_small():
    for path in SRC.rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path


def test_stage_subpackages_import_and_the_stage_functions_still_call():
    import inspect as pyinspect

    import sparseheal.heal.lora
    from sparseheal.evaluate import perplexity

    assert sparseheal.heal.lora.LoraHealer.name == "lora" and perplexity.PerplexitySettings
    for name in ("heal", "evaluate"):
        stage = getattr(sparseheal, name)
        assert callable(stage) and stage.__name__ == f"sparseheal.{name}"  # the package itself
        assert pyinspect.signature(stage) == pyinspect.signature(getattr(api, name))
        assert stage.preflight is not None  # the stage function's attributes are reachable
    assert all(callable(getattr(sparseheal, n)) for n in sparseheal.__all__)
