"""The quick `tok1d` commands (presets, status, help) never import torch, timm, torchvision or Prefect.

Importing torch costs seconds and about 1 GB; these commands read YAML files or the lineage
tables only. Each command runs in a fresh interpreter that reports, as it exits, which of the
heavy packages it had imported (timings are for bench/cli_latency.py, not for tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import lineage
from tasks.fingerprints import record_commit, stat_folder
from tasks.store import Store

from builders.store import commit_folder, work_folder

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "timm", "torchvision", "prefect")
MARKER = "tok1d-test-imported:"
# `python -c` puts the working directory (the checkout) first on sys.path, as `python -m` does.
WRAPPER = f"""
import atexit, json, runpy, sys
atexit.register(lambda: print({MARKER!r} + json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})),
                              file=sys.stderr))
sys.argv = ["tok1d", *sys.argv[1:]]
runpy.run_module("flows.cli", run_name="__main__")
"""


def tok1d_imports(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `tok1d <args>` in a fresh interpreter: (the process, the heavy packages it imported)."""
    result = subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.startswith(MARKER)]
    assert lines, f"tok1d {' '.join(args)} did not report its imports:\n{result.stdout}\n{result.stderr}"
    return result, json.loads(lines[-1].removeprefix(MARKER))


def _cached_output(store: Store, stage: str, complete: bool = True) -> Path:
    """Commit a one-file output of `stage` with its cache record; the path of its file."""
    folder = work_folder(store)
    (folder / "part.txt").write_text(stage)
    before = stat_folder(folder)  # as the runner does: the fingerprints status checks against
    manifest = commit_folder(store, stage, folder, tables={})
    record_commit(store, manifest, before)
    store.write_cache_record(stage, f"key-{stage}", 0, manifest, complete=complete)
    return manifest.path(store, "part.txt")


@pytest.fixture
def store_with_lineage(tmp_path: Path) -> Path:
    """A store whose lineage has one failed run of ingest, so `status` queries DuckDB, and whose
    cache holds an intact, a damaged and an incomplete output."""
    store = Store(tmp_path / "store")
    started = lineage.now()
    lineage.record_run(store, run_id="r1", flow_run_id=None, flow="full-pipeline", preset="smoke", config_hash="h",
                       status="failed", git_revision=None, started_at=started, ended_at=started)
    lineage.record_stage_event(store, stage_run_id="s1", run_id="r1", flow_run_id=None, stage="ingest",
                               status="failed", cache_hit=False, cache_key="k", config_hash="h", code_version="c",
                               git_revision=None, started_at=started, ended_at=started, error="no images")
    _cached_output(store, "ingest")
    _cached_output(store, "caption").write_text("altered, and longer")  # a size stat alone shows
    _cached_output(store, "embed-text", complete=False)
    return store.root


def test_presets_lists_presets_without_torch():
    result, heavy = tok1d_imports("presets")
    assert result.returncode == 0, result.stderr
    assert "smoke" in result.stdout.split()
    assert heavy == []


def test_status_reads_the_lineage_without_torch(store_with_lineage):
    result, heavy = tok1d_imports("status", "--store", str(store_with_lineage))
    assert result.returncode == 0, result.stderr
    assert "runs: 1 (1 failed)" in result.stdout and "no images" in result.stdout
    assert "cache: 1 intact of 3 recorded outputs" in result.stdout
    cache_section = result.stdout.split("\ncache: ")[1].split("\n\n")[0].splitlines()[1:]
    states = {line.split()[0]: line.split()[1] for line in cache_section}
    assert states == {"ingest": "intact", "caption": "damaged", "embed-text": "incomplete"}
    assert heavy == []


@pytest.mark.parametrize("command", [[], ["run"], ["sweep"]])
def test_help_without_torch(command):
    result, heavy = tok1d_imports(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: tok1d" in result.stdout
    assert heavy == []
