"""Static checks of the source layout: layers, import cycles, sizes, packaging.

Every module of :mod:`embedseg_service` is parsed with :mod:`ast` (nothing is imported), and
every ``import`` counts, also those inside functions. Imports under ``if TYPE_CHECKING:`` never
run: they count for the layer rules, not for cycles. Each failure names the offending module
or function.
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "embedseg_service"
SOURCE = ROOT / PACKAGE
MAX_FUNCTION_LINES = 100
MAX_CORE_MODULE_LINES = 400
BARE_TOP_LEVEL = ("core", "api", "worker", "records", "migrations")
"""Names that were top-level packages before everything moved under :mod:`embedseg_service`."""
WEB_AND_HEAVY = ("fastapi", "starlette", "celery", "kombu", "uvicorn", "torch")
"""Third-party packages the records layer must not load when it is imported."""


@dataclass(frozen=True)
class Import:
    """One imported module name, where it is imported and how."""

    importer: str
    target: str
    line: int
    in_function: bool
    type_checking: bool


def module_name(path: Path) -> str:
    """Dotted module name of a file under the repository root (``pkg/__init__.py`` -> ``pkg``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def source_files() -> tuple[Path, ...]:
    return tuple(sorted(path for path in SOURCE.rglob("*.py") if "__pycache__" not in path.parts))


@cache
def our_modules() -> frozenset[str]:
    return frozenset(module_name(path) for path in source_files())


@cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    origin = _absolute(node, importer, is_package)
    modules = our_modules()
    return [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]


def imports_of(path: Path) -> list[Import]:
    """Every import of the file, with whether it runs inside a function or only for type checkers."""
    importer = module_name(path)
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _targets(node, importer, is_package):
                found.append(Import(importer, target, node.lineno, in_function, type_checking))
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, in_function, True)
            for child in node.orelse:
                visit(child, in_function, type_checking)
            return
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner, type_checking)

    visit(parse(path), False, False)
    return found


@cache
def all_imports() -> tuple[Import, ...]:
    return tuple(imp for path in source_files() for imp in imports_of(path))


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _where(imp: Import) -> str:
    return f"{imp.importer} (line {imp.line}) imports {imp.target}"


def layer_violations(layer: str, forbidden: tuple[str, ...], *, module_level_only: bool = False) -> list[str]:
    """Imports by modules of ``layer`` of anything within one of the ``forbidden`` packages."""
    return [
        _where(imp)
        for imp in all_imports()
        if _within(imp.importer, layer)
        and any(_within(imp.target, package) for package in forbidden)
        and not (module_level_only and (imp.in_function or imp.type_checking))
    ]


def import_graph() -> dict[str, set[str]]:
    """Our module -> our modules it imports when it runs (``TYPE_CHECKING`` imports left out)."""
    modules = our_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for imp in all_imports():
        if not imp.type_checking and imp.target in modules and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
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
                    components.append(sorted(component))
    return components


def cycle_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One import cycle inside ``component``, as module names (first == last)."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & members):
            if child == start:
                return [*paths[node], start]
            if child not in paths:
                paths[child] = [*paths[node], child]
                queue.append(child)
    return component


def functions_of(path: Path) -> Iterator[tuple[str, int]]:
    """(qualified name, lines from ``def`` to the last line) of every function in the file."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, (child.end_lineno or child.lineno) - child.lineno + 1
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(parse(path), "")


@cache
def pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


# --------------------------------------------------------------------------- layers and cycles


def test_no_import_cycle() -> None:
    graph = import_graph()
    cycles = [" -> ".join(cycle_through(graph, component)) for component in strongly_connected(graph)]
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(cycles)


def test_core_imports_nothing_of_the_service() -> None:
    service = tuple(f"{PACKAGE}.{layer}" for layer in ("records", "api", "worker", "migrations"))
    bad = layer_violations(f"{PACKAGE}.core", service)
    assert not bad, "core must not depend on the service layers:\n" + "\n".join(bad)


def test_records_import_neither_api_nor_worker() -> None:
    bad = layer_violations(f"{PACKAGE}.records", (f"{PACKAGE}.api", f"{PACKAGE}.worker"))
    assert not bad, "records is shared by the API and the workers and imports neither:\n" + "\n".join(bad)


def test_records_load_no_web_queue_or_torch_package_at_import() -> None:
    bad = layer_violations(f"{PACKAGE}.records", WEB_AND_HEAVY, module_level_only=True)
    assert not bad, "records modules import these inside the functions that need them:\n" + "\n".join(bad)


def test_worker_imports_nothing_of_the_api() -> None:
    bad = layer_violations(f"{PACKAGE}.worker", (f"{PACKAGE}.api",))
    assert not bad, "the worker uses the records layer, never the web part:\n" + "\n".join(bad)


def test_client_imports_neither_api_nor_worker() -> None:
    bad = layer_violations(f"{PACKAGE}.client", (f"{PACKAGE}.api", f"{PACKAGE}.worker", *WEB_AND_HEAVY))
    assert not bad, "the client talks HTTP; it uses records.schemas and core.data's TIFF I/O only:\n" + "\n".join(bad)


def _python_files_outside_the_package() -> list[Path]:
    roots = [ROOT / "tests", ROOT / "benchmarks", ROOT / "docker"]
    files = [path for root in roots if root.is_dir() for path in root.rglob("*.py")]
    return sorted(path for path in files if "__pycache__" not in path.parts)


def test_nothing_imports_a_bare_top_level_package() -> None:
    bad = []
    for path in [*source_files(), *_python_files_outside_the_package()]:
        is_package = path.name == "__init__.py"
        importer = str(path.relative_to(ROOT))
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.ImportFrom) and node.level:
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, module_name(path) if path.is_relative_to(SOURCE) else "", is_package):
                    if target.split(".")[0] in BARE_TOP_LEVEL:
                        bad.append(f"{importer} (line {node.lineno}) imports {target}")
    assert not bad, f"import these through {PACKAGE} (e.g. {PACKAGE}.core):\n" + "\n".join(bad)


def test_entry_points_name_modules_of_the_package() -> None:
    project = pyproject()["project"]
    targets = {**project.get("scripts", {})}
    for group in project.get("entry-points", {}).values():
        targets.update(group)
    bad = []
    for name, target in targets.items():
        module = target.split(":")[0]
        if module not in our_modules():
            bad.append(f"{name} = {target!r}: {module} is not a module of {PACKAGE}")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- sizes


def test_no_function_over_the_line_limit() -> None:
    bad = [
        f"{module_name(path)}.{name}: {lines} lines"
        for path in source_files()
        for name, lines in functions_of(path)
        if lines > MAX_FUNCTION_LINES
    ]
    assert not bad, f"functions over {MAX_FUNCTION_LINES} lines (split them by concern):\n" + "\n".join(bad)


def test_no_core_module_over_the_line_limit() -> None:
    bad = []
    for path in source_files():
        if path.is_relative_to(SOURCE / "core"):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > MAX_CORE_MODULE_LINES:
                bad.append(f"{module_name(path)}: {lines} lines")
    assert not bad, f"core modules over {MAX_CORE_MODULE_LINES} lines (split them by concern):\n" + "\n".join(bad)


# --------------------------------------------------------------------------- packaging


def test_every_source_folder_is_a_package() -> None:
    folders = {path.parent for path in source_files()}
    bad = [str(folder.relative_to(ROOT)) for folder in sorted(folders) if not (folder / "__init__.py").is_file()]
    assert not bad, "folders with Python files but no __init__.py (not installed):\n" + "\n".join(bad)


def test_package_discovery_installs_every_module_and_data_file() -> None:
    from setuptools import find_namespace_packages, find_packages

    settings = pyproject()["tool"]["setuptools"]
    find = settings["packages"]["find"]
    finder = find_namespace_packages if find.get("namespaces", True) else find_packages
    packages = set(finder(where=str(ROOT), include=find.get("include", ["*"]), exclude=find.get("exclude", ())))
    missing = [module_name(path) for path in source_files() if module_name(path.parent) not in packages]
    assert not missing, "modules setuptools would leave out of the wheel:\n" + "\n".join(missing)
    package_data = settings.get("package-data", {})
    unshipped = []
    for path in sorted(SOURCE.rglob("*")):
        if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
            continue
        package = module_name(path.parent / "__init__.py")
        patterns = [*package_data.get("*", ()), *package_data.get(package, ())]
        if package not in packages or not any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns):
            unshipped.append(str(path.relative_to(ROOT)))
    assert not unshipped, "files the wheel would leave out (no package-data pattern matches):\n" + "\n".join(unshipped)


def test_test_modules_have_unique_names() -> None:
    # pytest imports test modules by their base name (no packages under tests/): two files of one
    # name in different folders stop the whole run at collection
    names = sorted(path.name for path in (ROOT / "tests").rglob("test_*.py"))
    assert len(names) == len(set(names)), sorted({name for name in names if names.count(name) > 1})


def test_no_test_module_imports_a_conftest() -> None:
    # each folder's conftest.py is imported as the same name ``conftest``: which one an import of it
    # finds depends on the order pytest collected them, so shared code lives in ``helpers``
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if "conftest" in names:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
