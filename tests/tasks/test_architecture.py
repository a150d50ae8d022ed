"""The shape of the house: no import cycles, no Prefect under tasks/, one list of stages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.code_version import REPO_ROOT, imported_modules, package_modules
from tasks.registry import STAGE_ORDER, stages

PACKAGES = ("models", "tasks", "flows")


def _graph() -> dict[str, set[str]]:
    modules = [module for package in PACKAGES for module in package_modules(package)]
    return {module: imported_modules(module, packages=PACKAGES) - {module} for module in modules}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (as a path), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_even_through_function_level_imports():
    # Imports inside functions count too: moving an import into a function must not hide a cycle.
    assert _cycle(_graph()) is None


def test_the_stage_contract_is_a_leaf():
    assert imported_modules("tasks.stage") <= {"tasks.progress", "tasks.store"}


def test_models_import_nothing_of_the_pipeline():
    for module in package_modules("models"):
        assert not {m for m in imported_modules(module, packages=PACKAGES) if not m.startswith("models")}, module


def test_importing_tasks_does_not_import_prefect():
    # One fresh interpreter per module would be exact but costs ~10 s each on 2 cores; each module
    # is checked right after its own import instead, in one process.
    modules = ["tasks.stage", *[stages()[name].run.__module__ for name in STAGE_ORDER], "tasks.registry",
               "tasks.runner", "tasks.presets", "tasks.pipeline_config"]
    code = (
        "import importlib, sys\n"
        f"for module in {modules!r}:\n"
        "    importlib.import_module(module)\n"
        "    bad = [m for m in sys.modules if m.split('.')[0] == 'prefect']\n"
        "    assert not bad, (module, bad[:3])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_tasks_never_import_prefect():
    for module in package_modules("tasks"):
        source = Path(REPO_ROOT, *module.split(".")).with_suffix(".py")
        if not source.exists():
            source = source.with_suffix("") / "__init__.py"
        imports = [line.strip() for line in source.read_text().splitlines()
                   if line.strip().startswith(("import prefect", "from prefect"))]
        assert not imports, f"{module}: {imports}"


def test_deployments_cover_every_stage_of_the_registry():
    spec = yaml.safe_load((REPO_ROOT / "deployments" / "prefect.yaml").read_text())
    entrypoints = {deployment["entrypoint"] for deployment in spec["deployments"]}
    stage_flows = {e.split(":")[1] for e in entrypoints if e.endswith("_flow")}
    assert stage_flows == {f"{name.replace('-', '_')}_flow" for name in STAGE_ORDER}


def test_every_stage_flow_comes_from_the_registry():
    from flows import full_pipeline

    assert list(full_pipeline.STAGE_FLOWS) == list(STAGE_ORDER)
    for name in STAGE_ORDER:
        flow = getattr(full_pipeline, f"{name.replace('-', '_')}_flow")
        assert flow.name == f"stage-{name}"


def test_stages_in_a_preset_are_checked_against_the_registry():
    from tasks.config import ConfigError
    from tasks.presets import load_config

    with pytest.raises(ConfigError, match="unknown stage.*'tokenise'"):
        load_config("smoke", ["stages=[ingest,tokenise]"])
