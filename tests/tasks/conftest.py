"""Fixtures shared by the stage tests (plain helpers live in helpers.py: with pytest's importlib
mode a conftest module cannot be imported by the test files)."""

import pytest

from tasks.store import Store


@pytest.fixture
def store(tmp_path):
    """An empty store in the test's temporary folder."""
    return Store(tmp_path / "store")
