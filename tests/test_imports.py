"""The shape of the house, read from the source with ``ast`` (nothing is imported): no import circle among the
modules of rpg_core and flows, counting imports inside functions; only rpg_core/runs.py (reading) and
rpg_core/tracking.py (writing) build an MlflowClient."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rpg_core", "flows", "dashboards")

pytestmark = pytest.mark.unit


def _modules() -> dict[str, Path]:
    """module name -> file, for every module of the packages (a package is its __init__.py)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` imports anywhere in its file (top level, functions, classes):
    ``import a.b`` -> a.b; ``from a import b`` -> a, and a.b when that is a module; relative imports resolved."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, set(c)) for c in comps]


def _one_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first search inside the component)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def test_the_scan_sees_function_level_and_relative_imports():
    graph = _graph()
    assert "rpg_core.objectives.config" in graph["rpg_core.objectives.losses"]  # from .config import ...
    assert "rpg_core.data" in graph["rpg_core.evaluation"]  # from rpg_core import data as data_mod
    assert "rpg_core.trainer" in graph["rpg_core.cli"]  # inside cmd_train
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(toy) == [["a", "b", "c", "a"]] and _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_rpg_core_flows_and_dashboards():
    cycles = _cycles(_graph())
    report = "\n".join(" -> ".join(c) for c in cycles)
    assert cycles == [], f"import cycles:\n{report}"


def test_the_benchmark_registry_is_a_leaf():
    """rpg_core.config validates benchmark names at import time: the registry must not import back into config or
    evaluation (nor anything of rpg_core but data and rewards, which import nothing of it)."""
    graph = _graph()
    assert graph["rpg_core.benchmarks"] == {"rpg_core.data", "rpg_core.rewards"}
    assert graph["rpg_core.data"] == set() and graph["rpg_core.rewards"] == set()
    assert "rpg_core.evaluation" not in graph["rpg_core.config"]


def test_only_the_read_api_and_the_writer_build_an_mlflow_client():
    """Reading goes through rpg_core/runs.py, writing through rpg_core/tracking.py: no other module of rpg_core or
    flows constructs an MlflowClient (calls of MlflowClient, also under an alias or as mlflow.tracking.MlflowClient)."""
    offenders = []
    for name, path in _modules().items():
        if name in ("rpg_core.runs", "rpg_core.tracking"):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        names = {"MlflowClient"} | {a.asname for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                                    for a in n.names if a.name == "MlflowClient" and a.asname}  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if called in names:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], f"MlflowClient built outside runs.py/tracking.py: {offenders}"


# Who may import whom (docs/architecture.md, "Seams"): data flows one way, so a room never imports a room downstream
# of it. Each entry: a module prefix -> the module prefixes it must not import (anywhere in its file).
FORBIDDEN = {
    # pure tensor math: no model, engine, loop, tracker or orchestration
    "rpg_core.objectives": ("rpg_core.models", "rpg_core.rollout", "rpg_core.trainer", "rpg_core.update",
                            "rpg_core.tracking", "rpg_core.runs", "rpg_core.evaluation", "flows"),
    # engines know models and sampling, nothing of the loss, the loop or the tracker
    "rpg_core.rollout": ("rpg_core.objectives", "rpg_core.trainer", "rpg_core.update", "rpg_core.tracking",
                         "rpg_core.runs", "rpg_core.evaluation", "flows"),
    "rpg_core.rewards": ("rpg_core.",),  # answer rules are a leaf
    "rpg_core.data": ("rpg_core.",),
    "rpg_core.metrics": ("rpg_core.",),  # the schema is a leaf every room may read
    "rpg_core.update": ("rpg_core.trainer", "rpg_core.tracking", "rpg_core.runs", "rpg_core.evaluation", "flows"),
    # the read API and the writer know MLflow, never the trainer or an engine
    "rpg_core.runs": ("rpg_core.trainer", "rpg_core.rollout", "rpg_core.objectives", "rpg_core.evaluation", "flows"),
    "rpg_core.tracking": ("rpg_core.",),
    # the trainer is a process of its own: only the CLI starts it, nothing of the library imports it
    "rpg_core.evaluation": ("rpg_core.trainer", "rpg_core.update", "flows"),
    "rpg_core.config": ("rpg_core.trainer", "rpg_core.evaluation", "rpg_core.rollout", "flows"),
    "rpg_core.sweeps": ("rpg_core.trainer", "flows"),
    # flows schedule processes: they never import the trainer's internals
    "flows": ("rpg_core.trainer", "rpg_core.update", "rpg_core.rollout", "rpg_core.objectives.losses"),
    # dashboards read results (rpg_core.runs) and log a report (rpg_core.tracking): no loop, engine, loss or flow
    "dashboards": ("rpg_core.trainer", "rpg_core.update", "rpg_core.rollout", "rpg_core.objectives", "rpg_core.models",
                   "rpg_core.evaluation", "flows"),
}


def _violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        for prefix, forbidden in FORBIDDEN.items():
            if mod == prefix or mod.startswith(prefix + "."):
                bad += [f"{mod} -> {d}" for d in deps if any(d == f or d.startswith(f) for f in forbidden)
                        and not d.startswith(prefix)]  # fmt: skip
        if "rpg_core.trainer" in deps and mod != "rpg_core.cli":
            bad.append(f"{mod} -> rpg_core.trainer (only rpg_core.cli starts a training run)")
        if mod.startswith("rpg_core") and mod != "rpg_core.cli":  # the library never reaches into the dashboards
            bad += [f"{mod} -> {d} (only rpg_core.cli, for rpg report)" for d in deps if d.startswith("dashboards")]
    return sorted(set(bad))


def test_rooms_import_only_upstream():
    """Each room imports only what lies upstream of it on the one path (config -> model -> rollout -> rewards ->
    advantages -> loss -> update -> log), and only the CLI imports the trainer."""
    graph = _graph()
    assert _violations(graph) == [], "imports against the one-way path:\n" + "\n".join(_violations(graph))
    # the check sees a violation when one is planted: the loss reaching for a model, flows for the trainer
    planted = {**graph, "rpg_core.objectives.losses": graph["rpg_core.objectives.losses"] | {"rpg_core.models"},
               "flows.core": graph["flows.core"] | {"rpg_core.trainer"}}  # fmt: skip
    assert _violations(planted) == [
        "flows.core -> rpg_core.trainer",
        "flows.core -> rpg_core.trainer (only rpg_core.cli starts a training run)",
        "rpg_core.objectives.losses -> rpg_core.models",
    ]
