"""The code keeps the shape its design claims: no import cycle inside slimtune, no private name imported from
another module, short functions, and method folders that read alike (CONTRIBUTING.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "slimtune"
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported slimtune module, names taken from it, line) for every import in the file, lazy ones included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                if f"{base}.{a.name}" in modules:  # `from slimtune import config`: the submodule itself
                    out.append((f"{base}.{a.name}", [], node.lineno))
                elif base in modules:
                    out.append((base, [a.name], node.lineno))
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for t, _, _ in _imports(m, p, modules)} - {m} for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_inside_slimtune():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    """The check itself can fail: the loop config.py and the method configs had (via the registry) is found."""
    graph = import_graph()
    graph["slimtune.core.schema"] = graph["slimtune.core.schema"] | {"slimtune.training.config"}
    found = cycles(graph)
    assert found and "slimtune.core.schema" in found[0] and "slimtune.training.config" in found[0]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_is_imported_from_another_module():
    modules = _modules()
    bad = [
        f"{path.relative_to(SRC)}:{line}: {name} from {target}"
        for module, path in modules.items()
        for target, names, line in _imports(module, path, modules)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert bad == []


def _long_functions(path: Path, root: Path = SRC) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_in_src_is_longer_than_the_limit():
    assert [f for p in sorted(PKG.rglob("*.py")) for f in _long_functions(p)] == []


def test_the_length_check_catches_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def short():\n    return 1\n\n\ndef f():\n{body}\n")
    assert _long_functions(tmp_path / "long.py", tmp_path) == [
        f"long.py:5 f ({MAX_FUNCTION_LINES + 1} lines)"
    ]


METHOD_DIRS = sorted(p for p in (PKG / "methods").iterdir() if p.is_dir() and p.name != "__pycache__")
STANDARD = {"__init__.py", "config.py", "layer.py", "apply.py"}


@pytest.mark.parametrize("folder", METHOD_DIRS, ids=lambda p: p.name)
def test_method_folders_read_alike(folder):
    """config.py and apply.py or layer.py, at most one more file; __init__ exports the config, the apply
    function and the Adapted subclass (a workflow: the config) and nothing else."""
    from slimtune.methods import METHODS, TRAINER

    files = {p.name for p in folder.glob("*.py")}
    assert {"__init__.py", "config.py"} <= files and files & {"apply.py", "layer.py"}
    assert len(files - STANDARD) <= 1, sorted(files - STANDARD)
    package = __import__(f"slimtune.methods.{folder.name}", fromlist=["__all__"])
    exported = set(package.__all__)
    specs = [s for s in METHODS.values() if s.config_cls.__module__.startswith(package.__name__ + ".")]
    assert specs, f"no registry entry comes from {folder.name}"
    expected = set()
    for spec in specs:
        expected.add(spec.config_cls.__name__)
        if spec.kind == TRAINER:
            expected.add(spec.apply.__name__)
            expected.add(spec.apply.__annotations__.get("return", "").strip("'\""))
    assert exported == expected


# ---- the layout (CONTRIBUTING.md, "How the parts fit"): layers import downward only
LAYERS = {
    "core": 0,
    "models": 1,
    "modules": 1,
    "data": 1,
    "methods": 2,
    "engines": 2,
    "training": 2,
    "recipes": 3,
    "plan": 3,
    "bench": 4,
    "capabilities": 4,
    "cli": 5,
    "": 5,  # the package itself: its public names, imported on first use
}
MAX_ROOT_ENTRIES = 12
MAX_FILE_LINES = 400
MAX_TRAINER_LINES = 250


def layer_of(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} -> {t}"
        for m, targets in sorted(graph.items())
        for t in sorted(targets)
        if LAYERS[layer_of(t)] > LAYERS[layer_of(m)]
    ]


def test_every_part_of_the_package_has_a_layer():
    assert {layer_of(m) for m in _modules()} == set(LAYERS)


def test_no_import_runs_up_a_layer():
    assert upward_imports(import_graph()) == []


def test_the_layer_check_finds_an_upward_import():
    graph = import_graph()
    graph["slimtune.plan"] = graph["slimtune.plan"] | {"slimtune.bench.run"}
    assert upward_imports(graph) == ["slimtune.plan -> slimtune.bench.run"]


def test_the_package_root_holds_at_most_twelve_modules_and_folders():
    entries = [p.name for p in PKG.iterdir() if p.name not in ("__init__.py", "__pycache__")]
    assert all(p.endswith(".py") or (PKG / p).is_dir() for p in entries), entries
    assert len(entries) <= MAX_ROOT_ENTRIES, sorted(entries)


TESTS = Path(__file__).resolve().parent


def unmirrored(pkg: Path, tests: Path) -> list[str]:
    """The package's root entries (folders and modules besides ``__init__``) with no test folder of their name
    holding a test file, and the test folders named for no part of the package."""
    parts = {p.stem for p in pkg.iterdir() if p.name not in ("__init__.py", "__pycache__")}
    folders = {p.name for p in tests.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    missing = [
        f"tests/{n}/ (for slimtune/{n})" for n in sorted(parts) if not list((tests / n).glob("test_*.py"))
    ]
    return missing + [f"tests/{n}/ (no slimtune/{n})" for n in sorted(folders - parts)]


def test_test_folders_mirror_the_package():
    assert unmirrored(PKG, TESTS) == []


def test_the_mirror_check_finds_a_part_without_tests(tmp_path):
    (tmp_path / "pkg" / "newpart").mkdir(parents=True)
    (tmp_path / "tests" / "stale").mkdir(parents=True)
    (tmp_path / "tests" / "stale" / "__init__.py").write_text("")
    assert unmirrored(tmp_path / "pkg", tmp_path / "tests") == [
        "tests/newpart/ (for slimtune/newpart)",
        "tests/stale/ (no slimtune/stale)",
    ]


def test_no_file_in_src_is_longer_than_the_limit():
    long = {
        str(p.relative_to(SRC)): n
        for p in sorted(PKG.rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES
    }
    assert long == {}
    trainer = PKG / "training" / "trainer.py"
    assert len(trainer.read_text(encoding="utf-8").splitlines()) <= MAX_TRAINER_LINES


def test_no_fmt_skip_in_src():
    """The length limits are met by the code, not by keeping the formatter off it."""
    assert [str(p.relative_to(SRC)) for p in PKG.rglob("*.py") if "fmt: skip" in p.read_text()] == []


# ---- nothing outside methods/ names a method: it reads the registry
def method_literals(path: Path, names: set[str]) -> list[str]:
    """Every string constant in ``path`` equal to a method's name (docstrings are prose and not counted)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    return [
        f"{path.name}:{n.lineno} {n.value!r}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and n.value in names
        and id(n) not in docstrings
    ]


def _method_names() -> set[str]:
    from slimtune.methods import METHODS

    return set(METHODS)


def test_no_method_name_outside_methods():
    names = _method_names()
    outside = [p for p in sorted(PKG.rglob("*.py")) if "methods" not in p.relative_to(PKG).parts]
    assert [hit for p in outside for hit in method_literals(p, names)] == []


def test_the_method_name_check_finds_a_name(tmp_path):
    """Adding a method's name to a file outside methods/ fails the check above."""
    names = _method_names()
    source = (PKG / "engines" / "support.py").read_text(encoding="utf-8")
    assert method_literals(PKG / "engines" / "support.py", names) == []
    bad = tmp_path / "support.py"
    bad.write_text(source + '\n\nSHARDED = ("lora", "qst")\n', encoding="utf-8")
    n = len(source.splitlines()) + 3
    assert method_literals(bad, names) == [f"support.py:{n} 'lora'", f"support.py:{n} 'qst'"]


# ---- no private name of one module used from another, attribute access included
def private_names(tree: ast.AST) -> set[str]:
    """``_names`` a module defines: functions, classes, module globals and ``self._attr`` assignments."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            if isinstance(n.value, ast.Name) and n.value.id == "self":  # (not another library's attributes)
                out.add(n.attr)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
    return {x for x in out if x.startswith("_") and not x.startswith("__")}


def foreign_private_access(files: dict[str, ast.AST]) -> list[str]:
    own = {name: private_names(tree) for name, tree in files.items()}
    found = []
    for name, tree in files.items():
        others = set().union(*(v for k, v in own.items() if k != name)) - own[name]
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and n.attr in others:
                if not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls")):
                    found.append(f"{name}:{n.lineno} .{n.attr}")
    return found


def test_no_private_attribute_of_another_module_is_used():
    files = {str(p.relative_to(SRC)): ast.parse(p.read_text(encoding="utf-8")) for p in PKG.rglob("*.py")}
    assert foreign_private_access(files) == []


def test_the_private_access_check_finds_one():
    files = {
        "a.py": ast.parse("class T:\n    def _per_rank(self):\n        return 1\n"),
        "b.py": ast.parse("def f(trainer):\n    return trainer._per_rank()\n"),
    }
    assert foreign_private_access(files) == ["b.py:2 ._per_rank"]


MAX_ADAPTED_METHODS = 23  # the trainer's surface; state I/O lives in methods/state.py, logging in trackers


def test_adapted_stays_focused():
    tree = ast.parse((PKG / "methods" / "base.py").read_text(encoding="utf-8"))
    adapted = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Adapted")
    defs = [f.name for f in adapted.body if isinstance(f, ast.FunctionDef)]
    assert len(defs) <= MAX_ADAPTED_METHODS, defs
