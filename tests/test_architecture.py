"""The layering rules of docs/ARCHITECTURE.md, read from the source: imports run one way, no import circle, settings
objects below the entry layer (never the whole argument object), short functions, no test scaffolding in the package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "open_instruct"

# The layers, top to bottom; a module imports only from its own layer or below.
ENTRY_SCRIPTS = {"dpo_tune_cache", "dpo", "finetune", "pretrain", "evaluate"}
ENTRIES = {*ENTRY_SCRIPTS, "api", "__init__"}
BASE = {"settings", "errors", "files", "integrity", "ranges", "disk_space"}
COMPONENTS = {"plan", "training", "objectives", "model", "data", "engine", "report"}
# Where the whole parsed-flags object may still be handled: it is read there and handed down as settings.
MAY_TAKE_ARGS = {*ENTRY_SCRIPTS, "api", "training.recipe"}
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, ast.Module]:
    """Every module of the package by its dotted name below ``open_instruct`` (a package by its folder's name)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return found


def imported(tree: ast.Module, known: set[str]) -> list[tuple[str, ast.AST, bool]]:
    """(module imported, node, inside a function) for each import of the package's own modules."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("open_instruct"):
                base = child.module.removeprefix("open_instruct").lstrip(".")
                for alias in child.names:
                    target = f"{base}.{alias.name}".lstrip(".")
                    found.append((target if target in known else base or "__init__", child, in_function))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("open_instruct."):
                        found.append((alias.name.removeprefix("open_instruct."), child, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def layer(name: str) -> int:
    """0: entry scripts and the API; 1: the recipe skeleton; 2: config; 3: components; 4: settings, errors, files."""
    top = name.split(".")[0]
    if top in ENTRIES:
        return 0
    if name == "training.recipe":
        return 1
    if top == "config":
        return 2
    if top in COMPONENTS:
        return 3
    assert top in BASE, f"open_instruct/{name}: not placed in a layer (tests/test_architecture.py)"
    return 4


def test_imports_run_down_the_layers() -> None:
    """A module never imports from a layer above its own (components never read config, the recipe or an entry)."""
    found = modules()
    upward = [
        f"{name} -> {target} (line {node.lineno})"
        for name, tree in found.items()
        for target, node, _ in imported(tree, set(found))
        if target in found and layer(target) < layer(name)
    ]
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_entry_script_imports_another() -> None:
    """An entry script is a recipe of its own: it never imports another entry script or the Python API (the API calls
    the entries' ``run``)."""
    found = modules()
    crossing = [
        f"{name} -> {target} (line {node.lineno})"
        for name in sorted(ENTRY_SCRIPTS)
        for target, node, _ in imported(found[name], set(found))
        if target.split(".")[0] in ENTRIES - {"__init__"} and target != name
    ]
    assert not crossing, "entry scripts importing the entry layer:\n" + "\n".join(crossing)


def test_no_import_circle() -> None:
    """No chain of imports (at module level or in a function) leads from a module back to itself."""
    found = modules()
    graph = {
        name: {t for t, _, _ in imported(tree, set(found)) if t in found and t != name} for name, tree in found.items()
    }
    # A package's __init__ importing its own submodules is how a package exports them, not a circle.
    graph = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_own_modules_imported_at_the_top() -> None:
    """Imports of the package's own modules sit at the top of a module (a function body may defer only a heavy or
    optional third-party package)."""
    found = modules()
    nested = [
        f"{name}:{node.lineno} imports {target}"
        for name, tree in found.items()
        for target, node, in_function in imported(tree, set(found))
        if in_function
    ]
    assert not nested, "imports of the package's own modules inside functions:\n" + "\n".join(nested)


def test_a_deferred_import_says_why() -> None:
    """An import inside a function defers a heavy or optional package; a comment on it (or just above) says which."""
    silent = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().split("\n")
        for fn in _functions(ast.parse("\n".join(lines))):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                    if not said:
                        silent.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not silent, "imports inside functions without a reason:\n" + "\n".join(silent)


def _functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def test_only_the_entry_layer_takes_the_argument_object() -> None:
    """Below the entries, the API and the recipe skeleton, a function takes settings objects or plain values."""
    offenders = []
    for name, tree in modules().items():
        if name in MAY_TAKE_ARGS or name.split(".")[0] in ("config", "api"):
            continue
        for fn in _functions(tree):
            for a in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]:
                annotation = ast.unparse(a.annotation) if a.annotation else ""
                if a.arg == "args" or "Arguments" in annotation:
                    offenders.append(f"{name}.{fn.name}({a.arg}: {annotation or '?'}) line {fn.lineno}")
    assert not offenders, "functions that take the whole argument object:\n" + "\n".join(offenders)


def test_functions_are_short() -> None:
    """No function is longer than a screen (80 lines)."""
    long = [
        f"{name}.{fn.name}: {fn.end_lineno - fn.lineno + 1} lines"
        for name, tree in modules().items()
        for fn in _functions(tree)
        if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_no_test_scaffolding_in_the_package() -> None:
    """Oracles and tables that only tests read live in tests/."""
    assert not (PACKAGE / "config" / "flag_effects.py").exists()
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    for name in ("def prepare_in_memory", "def build_train_eval_mix"):
        assert name not in source, f"{name} is test scaffolding: it belongs in tests/"


def test_layer_check_sees_a_violation(tmp_path) -> None:
    """The checks above read real imports: an upward import and a circle in a made-up module are found."""
    tree = ast.parse(
        "from open_instruct.config import TrainArguments\ndef f():\n    from open_instruct.data import x\n"
    )
    found = imported(tree, {"config", "data", "data.x"})
    assert [(t, inner) for t, _, inner in found] == [("config", False), ("data.x", True)]
    assert layer("config") < layer("data.mixer") and layer("settings") > layer("data.mixer")
