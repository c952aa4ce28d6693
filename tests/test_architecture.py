"""The package's shape: the engine stands alone, imports point one way (no cycles), no pickle loads."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "lisatune"
# what every layer may import: errors, the option base types, and every section's declared options (pydantic only)
FOUNDATION = {"lisatune", "lisatune.errors", "lisatune.schema", "lisatune.options"}


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


def hook_slots(source: str) -> list[str]:
    """Class-level hook containers, and hooks registered when a module is imported."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for st in node.body:
                targets = st.targets if isinstance(st, ast.Assign) else [st.target] if isinstance(st, ast.AnnAssign) else []
                found += [f"{node.name}.{t.id}" for t in targets if isinstance(t, ast.Name) and "hook" in t.id.lower()]
    module = ast.parse(source)
    for st in module.body:  # module level only: a function may register hooks on the objects it is given
        for call in (n for n in ast.walk(st) if isinstance(n, ast.Call)):
            name = ast.unparse(call.func)
            if not isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                    re.search(r"register\w*hook", name):
                found.append(name)
    return found


def test_no_class_level_hook_lists_and_no_hooks_installed_on_import():
    offenders = {str(p.relative_to(PKG)): hook_slots(p.read_text()) for p in PKG.rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_hook_check_can_fail():
    planted = ("class Opt:\n    _global_switch_hooks = {}\n\n"
               "HANDLE = Opt.register_global_switch_hook(print)\n")
    assert hook_slots(planted) == ["Opt._global_switch_hooks", "Opt.register_global_switch_hook"]


ABOVE_ENGINE = re.compile(r"lisatune\.(?!engine\b|errors\b|schema\b|options\b)\w+")


def test_no_engine_module_names_a_package_above_it():
    """Not even in a docstring or an error message: the engine does not know what is built on it."""
    named = {str(p.relative_to(PKG)): ABOVE_ENGINE.findall(p.read_text()) for p in (PKG / "engine").rglob("*.py")}
    assert {k: v for k, v in named.items() if v} == {}
    assert ABOVE_ENGINE.findall("implemented by lisatune.quant; see lisatune.engine.optim") == ["lisatune.quant"]


def test_lisatune_help_answers_without_importing_torch():
    """The front door is light: `lisatune --help` imports no torch (each subcommand's module is imported when it
    runs; the whole library takes about 6 s to import here, --help 0.2 s: a timing for the notes, not a test)."""
    code = ("import sys, contextlib, io\nfrom lisatune.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules, 'train' in out.getvalue())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False", "True"]


@pytest.mark.parametrize("command", ["train", "eval", "config"])
def test_the_run_commands_answer_help_without_importing_torch(command):
    """#25: `lisatune train --help` (eval's, config's) imports no torch/transformers: their arguments are declared
    in a light module and what runs is imported when it runs (the timing is for the notes, not a test)."""
    code = ("import sys, contextlib, io\nfrom lisatune.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    try:\n        main([{command!r}, '--help'])\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules, 'usage: lisatune' in out.getvalue())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False", "True"]


def test_first_line_is_one_line_even_of_an_empty_message():
    from lisatune.errors import first_line
    wrapped = ValueError("An error occurred while generating the dataset\nmore")
    wrapped.__cause__ = KeyError()
    assert (first_line(RuntimeError("a\nb")), first_line(RuntimeError("")), first_line(wrapped)) == \
        ("a", "RuntimeError", "An error occurred while generating the dataset")
    assert first_line(wrapped, cause=True) == "KeyError"


def package_pairs(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Pairs of lisatune's packages (lisatune.X) each of which imports the other somewhere."""
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    edges = {(top(m), top(d)) for m, ds in g.items() for d in ds if top(m) != top(d)}
    return sorted((a, b) for a, b in edges if a < b and (b, a) in edges and "lisatune" not in (a, b))


def test_no_two_packages_import_each_other():
    assert package_pairs(graph()) == []


def test_the_package_pair_check_can_fail():
    g = {"lisatune.recipe.loop": {"lisatune.analysis.meter"}, "lisatune.analysis.plan": {"lisatune.recipe.loss"}}
    assert package_pairs(g) == [("lisatune.analysis", "lisatune.recipe")]


def test_tests_share_helpers_not_conftest():
    """pytest's conftest.py is for fixtures and hooks; what tests import lives in tests/helpers.py."""
    tests = Path(__file__).resolve().parent
    bench = tests.parent / "benchmarks"
    importers = [str(p.relative_to(tests.parent)) for p in [*tests.rglob("*.py"), *bench.glob("*.py")]
                 if re.search(r"^\s*(from conftest import|import conftest)", p.read_text(), re.M)]
    assert importers == []

