"""The tests' own layout: test modules import builders, helpers and fake servers, never another
test module, and never edit sys.path themselves (tests/conftest.py and tests/tasks/conftest.py do,
once)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
    return modules


def test_no_test_module_imports_another():
    modules = sorted(TESTS.rglob("test_*.py"))
    assert modules
    found = {
        str(path.relative_to(TESTS)): sorted(m for m in imported_modules(path) if m.split(".")[-1].startswith("test_"))
        for path in modules
    }
    assert {name: imports for name, imports in found.items() if imports} == {}


def touches_sys_path(path: Path) -> bool:
    return any(isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
               and node.value.id == "sys" for node in ast.walk(ast.parse(path.read_text())))


def test_no_test_module_edits_sys_path():
    assert [str(path.relative_to(TESTS)) for path in sorted(TESTS.rglob("test_*.py")) if touches_sys_path(path)] == []


def test_no_project_module_shadows_the_standard_library():
    # Prefect puts an entrypoint's folder (flows/) on sys.path when it loads a flow, and spawned
    # worker processes inherit that path: a flows/secrets.py then replaced the stdlib `secrets`
    # for pydantic in ingest's workers, which died importing it. (Entrypoints live only in flows/.)
    root = TESTS.parent
    clashes = [str(path.relative_to(root)) for path in (root / "flows").glob("*.py")
               if path.stem in sys.stdlib_module_names and path.stem not in sys.builtin_module_names]
    assert clashes == []
