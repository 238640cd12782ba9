"""The package's import graph has no circles, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import weakclip

PACKAGE = Path(weakclip.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["weakclip", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file. ``from pkg import sub`` counts as
    importing ``sub`` only (the package's ``__init__`` is imported by any of its modules anyway)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
            if subs:
                found |= subs
            elif base in modules:
                found.add(base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names} & modules.keys()
    found.discard(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_the_package():
    modules = _modules()
    assert "weakclip.inference.sliding" in modules and len(modules) > 50
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "weakclip.inference.batching" in graph["weakclip.inference.sliding"]
    assert _cycles(graph) == []


#: Packages and modules that the lower layers must not import (top of the house: entry points and the API).
_UPPER = ("weakclip.cli", "weakclip.commands", "weakclip.pipeline", "weakclip.api", "weakclip.demo",
          "weakclip.report")
#: lower layer -> what it must not reach up to, besides the entry points
_LAYERS = {
    "weakclip.engine": ("weakclip.inference", "weakclip.retrain", "weakclip.seeds"),
    "weakclip.data": ("weakclip.engine", "weakclip.inference", "weakclip.retrain", "weakclip.seeds",
                      "weakclip.models"),
    "weakclip.models": ("weakclip.engine", "weakclip.inference", "weakclip.retrain", "weakclip.seeds"),
    "weakclip.crf": ("weakclip.engine", "weakclip.inference", "weakclip.retrain", "weakclip.seeds",
                     "weakclip.models"),
}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for lower, forbidden in _LAYERS.items():
        for name, deps in graph.items():
            if _within(name, lower):
                banned = (*forbidden, *_UPPER)
                bad += [f"{name} -> {d}" for d in sorted(deps) if any(_within(d, f) for f in banned)]
    return sorted(bad)


def test_the_layer_rule_finds_a_reach_up():
    graph = {"weakclip.engine.x": {"weakclip.inference.sliding", "weakclip.config"},
             "weakclip.data.y": {"weakclip.models.clip"}, "weakclip.commands.z": {"weakclip.engine.x"}}
    assert _violations(graph) == ["weakclip.data.y -> weakclip.models.clip",
                                  "weakclip.engine.x -> weakclip.inference.sliding"]


def test_lower_layers_never_reach_up():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _violations(graph) == []
