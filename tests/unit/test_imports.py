"""The import rules of docs/architecture.md, read from the source: no circles in janus_core or server,
server reaches janus_core through its top-level names only, the plain-Python layers import no torch,
and the engine and every janus_core module stay small enough to read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("janus_core", "server")
TORCH_FREE = [  # the scheduling layer, the request/result types and what the API layer reads
    "janus_core", "janus_core.sched.sequence", "janus_core.sched.scheduler",
    "janus_core.sched.kv_manager", "janus_core.sched.block_pool", "janus_core.requests", "janus_core.limits",
    "janus_core.engine.config", "janus_core.engine.memory", "janus_core.sampling.params", "janus_core.images",
    "janus_core.text.conversation", "janus_core.text.stops",
]
HEAVY = ("torch", "transformers", "diffusers")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if "gen" not in p.relative_to(ROOT).parts}


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every import that runs: those under `if TYPE_CHECKING:` are left out."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from pkg import mod` counts as importing pkg.mod)."""
    mods = sources()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for target, names, _ in imports(path):
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in mods and candidate != mod:
                    edges[mod].add(candidate)
                    break
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    edges = graph()
    # A package's __init__ that re-exports its modules is not a circle of the modules themselves.
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}
    assert circles(edges) == []


def test_the_finder_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_server_uses_janus_core_through_its_top_level_names():
    deep = [f"{module_name(p)}:{line} imports {target}" for p in (ROOT / "server").rglob("*.py")
            for target, _, line in imports(p) if target.startswith("janus_core.")]
    assert deep == []


def test_janus_core_exports_every_name_it_lists():
    import janus_core

    assert sorted(n for n in janus_core.__all__ if not hasattr(janus_core, n)) == []


@pytest.mark.parametrize("module", TORCH_FREE)
def test_plain_python_layers_import_no_torch(module):
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"


def test_the_api_process_modules_import_no_torch():
    code = ("import sys, server.cli, server.runtime, server.http.app, server.rpc.service, server.service, "
            "server.queue.redis.queue, server.metrics, server.supervisor, server.jobs; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""


def test_the_engine_and_every_janus_core_module_stay_readable():
    lengths = {module_name(p): len(p.read_text().splitlines()) for p in (ROOT / "janus_core").rglob("*.py")}
    assert lengths["janus_core.engine.engine"] < 300
    assert {m: n for m, n in lengths.items() if n > 400} == {}
    long = [f"{module_name(p)}:{i}" for p in (ROOT / "janus_core").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 120]
    assert long == []
