"""The package's structure: imports run one way and form no circle, modules stay small.

The import graph is read from the source with `ast`, every import statement included (at
module level and inside functions alike), so a function-level import that hides a circle is
found. `import-linter` (`lint-imports`, the contract in pyproject.toml) checks the direction of
the layers in the lint env and CI; this test checks the absence of circles at module
granularity and the module sizes, with no dependency beyond the standard library.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tfp_seg"
MAX_LINES = 500  # "library modules under ~500 lines"; a larger module must be split by concept


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str):
    """The module a dotted name refers to: itself if it is a module, else its parent."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _walk_executed(tree: ast.AST):
    """Every node but the bodies of `if TYPE_CHECKING:` blocks (never executed)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                todo.extend(child.orelse)
            else:
                todo.append(child)


def _imports(module: str, path: pathlib.Path) -> set:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _walk_executed(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import name`: pkg.name if that is a module, else pkg itself
            targets = [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "tfp_seg" or target.startswith("tfp_seg."):
                resolved = _resolve(target)
                if resolved and resolved != module:
                    found.add(resolved)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _is_ancestor(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def _graph_without_package_reexports(graph: dict) -> dict:
    # A package's __init__ importing its own submodules (to re-export their names) is how a
    # public namespace is assembled, not a dependency of the concept: a submodule that imports
    # a sibling through the package (`from tfp_seg.metrics import _common`) resolves to the
    # sibling itself. Edges from a package to its descendants are therefore left out.
    return {
        module: {t for t in targets if not _is_ancestor(module, t)}
        for module, targets in graph.items()
    }


def test_the_graph_sees_function_level_imports():
    # the reader must find imports inside functions too, or a hidden circle would pass
    source = "def f():\n    from tfp_seg import losses\n    import tfp_seg.layers.base\n"
    source += "if TYPE_CHECKING:\n    import tfp_seg.cli\n"
    tree = ast.parse(source)
    names = {
        n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
        for n in _walk_executed(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    assert names == {"tfp_seg", "tfp_seg.layers.base"}  # annotation-only imports left out


def test_imports_resolve_to_modules(tmp_path):
    # `from pkg import name` is an edge to pkg.name when that is a module, else to pkg
    path = tmp_path / "probe.py"
    path.write_text(
        "from tfp_seg import losses, __version__\n"
        "from tfp_seg.layers.base import DistributionHead\n"
        "def f():\n    from tfp_seg.metrics import streaming\n"
    )
    assert _imports("tfp_seg.probe", path) == {
        "tfp_seg.losses",
        "tfp_seg",
        "tfp_seg.layers.base",
        "tfp_seg.metrics.streaming",
    }


def test_no_import_circles():
    cycles = _cycles(_graph_without_package_reexports(GRAPH))
    assert not cycles, "import circles (module granularity, function-level imports included):\n" + (
        "\n".join(" <-> ".join(c) for c in cycles)
    )


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_library_does_not_import_the_application():
    application = ("tfp_seg.runs", "tfp_seg.cli", "tfp_seg.experiment", "tfp_seg.reporting")
    offenders = {
        module: sorted(t for t in targets if t.startswith(application))
        for module, targets in GRAPH.items()
        if not module.startswith(application) and module != "tfp_seg"
    }
    offenders = {m: t for m, t in offenders.items() if t}
    assert not offenders, offenders


@pytest.mark.parametrize("module", sorted(MODULES))
def test_library_modules_stay_small(module):
    lines = MODULES[module].read_text().count("\n")
    assert lines <= MAX_LINES, f"{module} has {lines} lines: split it by concept"


# --- the test tree mirrors the source tree ------------------------------------------------------
TESTS = ROOT / "tests"
# Top-level test modules that test the project as a whole rather than one library module.
CROSS_CUTTING = {
    "test_architecture",  # this file
    "test_benchmarks",  # benchmarks/
    "test_docs",  # docs/: the site's reference coverage, figures, screenshots
    "test_docstring_examples",  # the `# ==>` results of every docstring example
    "test_examples",  # examples/
    "test_registered",  # every registered class through one harness
    "test_reliability",  # numerical extremes, properties, unsafe files, interrupts
    "test_repo",  # README, .ci/run, packaging
    "test_saved_files",  # `.keras` files of earlier versions
}


def test_tests_mirror_the_source_tree():
    """Tests of `tfp_seg/<pkg>/...` live in `tests/<pkg>/` (a top-level module with several
    test files may have its folder too); a top-level `tests/test_<name>.py` tests the
    top-level module `tfp_seg/<name>.py` (or is one of `CROSS_CUTTING`); every
    subpackage has its folder of tests, and test basenames are unique (pytest imports them by
    basename: the folders have no `__init__.py`)."""
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    top_modules = {p.stem for p in PACKAGE.glob("*.py")}
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    unknown = folders - packages - top_modules
    assert not unknown, f"test folders that mirror no tfp_seg package or module: {unknown}"
    assert packages <= folders, f"subpackages without tests/<name>/: {packages - folders}"
    stray = {
        p.stem
        for p in TESTS.glob("test_*.py")
        if p.stem.removeprefix("test_") not in top_modules and p.stem not in CROSS_CUTTING
    }
    assert not stray, f"top-level test modules that mirror no top-level module: {stray}"
    names = [p.name for p in TESTS.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
