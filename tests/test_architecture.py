"""The package's shape: the engine stands alone, imports point one way (no cycles), no pickle loads."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "lisatune"
FOUNDATION = {"lisatune", "lisatune.errors", "lisatune.schema"}  # what every layer may import


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The lisatune modules `name` imports anywhere in its source (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [root] + [f"{root}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            # the deepest lisatune module the name resolves to
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def test_importing_the_engine_loads_nothing_else_of_lisatune():
    code = "import sys, lisatune.engine; print(sorted(m for m in sys.modules if m.startswith('lisatune')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    loaded = set(ast.literal_eval(out.strip()))
    assert "lisatune.engine.optim" in loaded
    assert {m for m in loaded if not m.startswith("lisatune.engine")} <= FOUNDATION


def test_the_engine_imports_no_layer_above_it():
    for name, deps in graph().items():
        if name.startswith("lisatune.engine"):
            above = {d for d in deps if not d.startswith("lisatune.engine") and d not in FOUNDATION}
            assert not above, f"{name} imports {sorted(above)}"
            assert not any(d.split(".")[1:2][0] in ("distributed", "recipe", "methods", "analysis", "study")
                           for d in deps if d.count(".") >= 1), name


def test_the_package_has_no_import_cycle():
    g = graph()
    for m in g:  # package __init__ files re-export their children: an edge parent -> child is not a cycle
        g[m] = {d for d in g[m] if not d.startswith(m + ".")}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in sorted(g.get(n, ())):
            if d in FOUNDATION - {"lisatune"} or d == "lisatune":
                continue
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]) if d in path else d)
            if d not in state:
                visit(d, path + [d])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    """The walker resolves relative imports: a planted cycle between two modules is found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from .b import x\n")
    b.write_text("from . import a\n")
    known = {"lisatune.recipe.a", "lisatune.recipe.b", "lisatune.recipe"}
    assert imports_of("lisatune.recipe.a", a, known) == {"lisatune.recipe.b"}
    assert "lisatune.recipe.a" in imports_of("lisatune.recipe.b", b, known)


def test_no_torch_load_runs_pickles():
    """Every torch.load in the package passes weights_only=True (no pickled code can run); no eval/exec."""
    offenders = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                offenders.append(f"{path.relative_to(PKG)}:{node.lineno}: {node.func.id}")
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if kw.get("weights_only") != "True":
                    offenders.append(f"{path.relative_to(PKG)}:{node.lineno}")
    assert not offenders, offenders  # and no eval/exec of strings


def test_helpers_exist_once():
    """The helpers that used to be repeated are defined in one place each."""
    src = {p: p.read_text() for p in PKG.rglob("*.py")}
    for pattern in (r"^IGNORE = ", r"^def _?flat(ten)?\(", r"^def tiny_(llama|model)\(", r"/proc/self/status",
                    r"yaml\.safe_load\(|yaml\.load\("):
        where = [str(p.relative_to(PKG)) for p, s in src.items() if re.search(pattern, s, re.M)]
        assert len(where) <= 1, (pattern, where)
    assert not [p for p, s in src.items() if 'getattr(model, "module", model)' in s]
