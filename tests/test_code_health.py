"""Code-health rules that a reader would otherwise have to re-check by hand."""

from __future__ import annotations

import ast
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 80


def test_no_function_in_the_core_or_the_daemon_is_longer_than_80_lines():
    """A function longer than a screenful is read in pieces anyway: it should be written in them."""
    long = []
    for package in (ROOT / "nufilt_core", ROOT / "daemon" / "nufilt_daemon"):
        for path in sorted(package.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert long == []


def test_tests_import_helpers_from_modules_not_from_conftest():
    """conftest.py holds fixtures, which pytest injects; helpers live in modules (models.py, cli_runner.py, ...)."""
    importers = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.ImportFrom) and node.module == "conftest") or (
                    isinstance(node, ast.Import) and any(a.name == "conftest" for a in node.names)):
                importers.append(f"{path.name}:{node.lineno}")
    assert importers == []


# The first-party packages, by the name they are imported under. bench/speed's scripts run with their own
# folder on sys.path, so they import each other by bare name ("from measure import run_child").
FIRST_PARTY = {"nufilt_core": ROOT / "nufilt_core", "nufilt_daemon": ROOT / "daemon" / "nufilt_daemon",
               "bench.quality": ROOT / "bench" / "quality", "bench.speed": ROOT / "bench" / "speed"}
SCRIPT_FOLDERS = ("bench.speed",)


def first_party_modules() -> dict[str, Path]:
    modules = {}
    for prefix, folder in FIRST_PARTY.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((prefix, *parts))] = path
    return modules


def imported_modules(module: str, path: Path, source: str, known: set[str]) -> set[str]:
    """The first-party modules `module` imports anywhere in its file: at module level, in functions and under
    TYPE_CHECKING alike (each one is an edge a reader follows). `from a import b` imports a.b when that is a
    module, else a."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    script_folder = next((f for f in SCRIPT_FOLDERS if package == f), None)
    found = set()
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        for name in names:
            if script_folder and f"{script_folder}.{name}" in known:
                name = f"{script_folder}.{name}"
            if name in known and name != module:
                found.add(name)
    return found


def import_graph(read: Callable[[Path], str] = Path.read_text) -> dict[str, set[str]]:
    modules = first_party_modules()
    return {m: imported_modules(m, p, read(p), set(modules)) for m, p in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (its modules in import order, the first repeated at the end) per strongly connected group of
    modules, found with Tarjan's algorithm and then the shortest way round from the group's first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in sorted(graph[m]):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:  # m is the first of its group: the group is the stack down to m
            group = set(stack[stack.index(m):])
            del stack[stack.index(m):]
            if len(group) > 1:
                groups.append(group)

    for m in sorted(graph):
        if m not in index:
            visit(m)
    cycles = []
    for group in groups:
        start = min(group)
        paths = {start: [start]}
        queue = [start]
        while queue:  # breadth first: the first way back to `start` is a shortest one
            m = queue.pop(0)
            if start in graph[m]:
                cycles.append([*paths[m], start])
                break
            for n in sorted(graph[m] & group):
                if n not in paths:
                    paths[n] = [*paths[m], n]
                    queue.append(n)
    return sorted(cycles)


def test_the_first_party_modules_import_each_other_without_a_cycle():
    """A cycle makes what a module sees depend on which side was imported first, and keeps a module from being
    read (or moved) on its own: what both sides need belongs in a module below them."""
    cycles = [" -> ".join(c) for c in import_cycles(import_graph())]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# Wording about how the work was organised instead of about the product: tracker issue numbers, pointers to
# files outside the repository, and the sittings it was spread over. bench/results/ holds data.
PROCESS_WORDING = {
    "an issue number": re.compile(r"\bissue [0-9]+", re.IGNORECASE),
    "a pointer outside the repository": re.compile(r"\.\./shared|shared/reference"),
    # not start_new_session, requests.Session and the like
    "a work session": re.compile(r"(?<![_.])\bsessions?\b", re.IGNORECASE),
}
# Lines where the word is a library's own (file, text of the line): keep this short.
PROCESS_WORDING_ALLOWED = {
    ("daemon/nufilt_daemon/mlflow_connection.py", "(one per thread: they hold"),  # MLflow's HTTP client
}


def tracked_text_files() -> list[str]:
    """The files git tracks, as paths from the root, outside bench/results/ and present in the working tree."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [name for name in sorted(listed.decode().split("\0"))
            if name and not name.startswith("bench/results/") and (ROOT / name).is_file()]


def test_the_tracked_files_speak_of_the_product_alone():
    """A reader has neither the tracker nor files outside the repository: a sentence says its reason itself."""
    this_file = Path(__file__).resolve().relative_to(ROOT).as_posix()
    hits = []
    for name in tracked_text_files():
        data = (ROOT / name).read_bytes()
        if b"\0" in data:
            continue  # binary
        for number, line in enumerate(data.decode(errors="replace").splitlines(), 1):
            if name == this_file and "re.compile(" in line:
                continue  # the patterns themselves
            if any(name == f and text in line for f, text in PROCESS_WORDING_ALLOWED):
                continue
            hits += [f"{name}:{number} ({what}): {line.strip()[:100]}"
                     for what, pattern in PROCESS_WORDING.items() if pattern.search(line)]
    assert not hits, "process wording:\n" + "\n".join(hits)
