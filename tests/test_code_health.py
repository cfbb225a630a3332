"""Code-health rules of issue 13 that a reader would otherwise have to re-check by hand."""

from __future__ import annotations

import ast
from pathlib import Path

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
