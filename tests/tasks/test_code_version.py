"""A stage's code version is the hash of its import closure, not a hand-kept list of modules."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.code_version import REPO_ROOT, code_version, import_closure, package_modules


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the project's packages, to edit without touching the checkout."""
    for package in ("tasks", "models"):
        shutil.copytree(REPO_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def version(package: str, root: Path) -> str:
    return code_version.__wrapped__(package, (), root)


def touch(root: Path, relative: str) -> None:
    path = root / relative
    path.write_text(path.read_text() + "\n# edited\n")


def test_evaluate_depends_on_what_it_imports_indirectly(tree):
    closure = import_closure(package_modules("tasks.evaluate", tree), tree)
    # The modules the hand-kept list of evaluate had left out.
    assert {"tasks.ingest.read", "tasks.training.loop", "tasks.pretokenize.read"} <= closure
    before = version("tasks.evaluate", tree)
    # evaluate -> the tokenizer's reader -> models.tokenizer -> models.quantizers
    assert "models.quantizers" in closure
    touch(tree, "models/quantizers.py")
    assert version("tasks.evaluate", tree) != before


def test_an_unrelated_stages_private_module_does_not_change_it(tree):
    before = version("tasks.evaluate", tree)
    touch(tree, "tasks/caption/stage.py")
    touch(tree, "tasks/ingest/stage.py")
    assert version("tasks.evaluate", tree) == before


def test_a_stage_depends_on_every_file_of_its_own_package(tree):
    before = version("tasks.caption", tree)
    touch(tree, "tasks/caption/stage.py")
    assert version("tasks.caption", tree) != before


def test_the_config_module_is_not_followed(tree):
    # A section's values are in the cache key; following tasks.config would tie ingest to the
    # tokenizer model whose dataclass the config validates.
    closure = import_closure(package_modules("tasks.ingest", tree), tree)
    assert not {"models.tokenizer", "models.tokenizer_config", "models.tokenizer_loss_config"} & closure
    before = version("tasks.ingest", tree)
    touch(tree, "models/tokenizer.py")
    touch(tree, "models/tokenizer_config.py")
    assert version("tasks.ingest", tree) == before


@pytest.mark.parametrize("stage", ["tasks.train_tokenizer", "tasks.pretokenize", "tasks.evaluate"])
def test_stages_that_build_a_tokenizer_follow_its_config_dataclass(tree, stage):
    # The dataclass lives apart from the network (so the config loads without torch), but its
    # validation is code a tokenizer stage runs: the stage reaches it through models.tokenizer.
    assert "models.tokenizer_config" in import_closure(package_modules(stage, tree), tree)
    before = version(stage, tree)
    touch(tree, "models/tokenizer_config.py")
    assert version(stage, tree) != before


def test_the_tokenizer_trainer_follows_its_loss_config(tree):
    assert "models.tokenizer_loss_config" in import_closure(package_modules("tasks.train_tokenizer", tree), tree)


def test_function_level_and_relative_imports_count(tmp_path):
    package = tmp_path / "tasks" / "toy"
    package.mkdir(parents=True)
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "stage.py").write_text("def run():\n    from .helper import value\n    return value\n")
    (package / "helper.py").write_text("from tasks import other\nvalue = 1\n")
    (tmp_path / "tasks" / "other.py").write_text("x = 2\n")
    assert import_closure(["tasks.toy.stage"], tmp_path) >= {"tasks.toy.helper", "tasks.other"}
    before = version("tasks.toy", tmp_path)
    touch(tmp_path, "tasks/other.py")
    assert version("tasks.toy", tmp_path) != before


def test_missing_extra_file_is_a_clear_error():
    with pytest.raises(ValueError, match="no-such-file.txt"):
        code_version.__wrapped__("tasks.caption", ("no-such-file.txt",), REPO_ROOT)
