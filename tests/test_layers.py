"""The package's layering: no import cycle among ray_pinet's modules (counting imports inside
functions too), no function-local import of the project's own modules except the CLI's one
deferred import of its commands, and a ``ray-pinet --help`` that loads neither torch, Ray nor
MLflow."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

PKG = REPO / "ray_pinet"
# The CLI defers the command modules (torch, Ray, MLflow) until a command runs.
LAZY_ALLOWED = {("ray_pinet.cli", "ray_pinet"), ("ray_pinet.cli", "ray_pinet.commands"), ("ray_pinet.cli", "ray_pinet.recommend")}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = ast.parse(p.read_text())
    return out


def _edges(mods: dict[str, ast.Module]) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """(module -> project modules it imports anywhere, [(module, target)] of function-local ones)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    local: list[tuple[str, str]] = []

    def visit(mod: str, node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = ([a.name for a in child.names] if isinstance(child, ast.Import) else
                         [child.module] + [f"{child.module}.{a.name}" for a in child.names] if child.module else [])
                for target in {n for n in names if n in mods and n != mod}:
                    graph[mod].add(target)
                    if in_function:
                        local.append((mod, target))
            visit(mod, child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    for mod, tree in mods.items():
        visit(mod, tree, False)
    return graph, local


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycle():
    graph, _ = _edges(_modules())
    assert _cycles(graph) == []


def test_the_project_is_imported_at_module_top():
    _, local = _edges(_modules())
    assert sorted(set(local) - LAZY_ALLOWED) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_help_loads_neither_torch_ray_nor_mlflow():
    code = ("import sys; import ray_pinet.cli as c; c.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
