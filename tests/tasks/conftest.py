"""Fixtures shared by the stage tests, and this folder as an import root for its support modules
(helpers.py, fake_gemini.py): with pytest's importlib mode a conftest module cannot be imported by
the test files, and tests are not a package. Artifacts a test starts from come from `builders`
(tests/builders/, put on sys.path by tests/conftest.py)."""

import sys
from pathlib import Path

import pytest

from tasks.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def store(tmp_path):
    """An empty store in the test's temporary folder."""
    return Store(tmp_path / "store")
