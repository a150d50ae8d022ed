"""The quick `tok1d` commands (presets, status, help) and loading any preset's configuration never
import torch, timm, torchvision, transformers or Prefect.

Importing torch costs seconds and about 1 GB; these commands read YAML files or the lineage
tables only. Each command runs in a fresh interpreter that reports, as it exits, which of the
heavy packages it had imported (timings are for bench/cli_latency.py, not for tests). A fully
cached `tok1d run` is checked the same way on the stores that tests/flows/test_cli_pipeline.py
fills (a cold run is too slow to repeat here).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tasks import lineage
from tasks.fingerprints import record_commit, stat_folder
from tasks.store import Store

from builders.cli import REPO, TOK1D, python_imports, tok1d_imports
from builders.store import commit_folder, work_folder


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


def test_every_preset_loads_and_validates_without_torch():
    # Validation imports every stage module and runs its checks; it must stay strict all the same.
    code = """
from tasks.config import ConfigError
from tasks.presets import available_presets, load_config
for name in available_presets():
    load_config(name)
for bad in ("train_tokenizer.model.bottleneck=fsq", "train_generator.kind=gpt", "embed_text.backend=clip"):
    try:
        load_config("smoke", [bad])
    except ConfigError as error:
        print("refused:", error)
print("presets:", len(available_presets()))
"""
    result, heavy = python_imports(code)
    assert result.returncode == 0, result.stderr
    refused = [line for line in result.stdout.splitlines() if line.startswith("refused:")]
    assert len(refused) == 3 and "known: ['kl', 'vq']" in refused[0] and "known: auto, dit, maskgit" in refused[1]
    assert "unknown backend 'clip'" in refused[2]
    assert int(result.stdout.split("presets:")[1]) >= 10
    assert heavy == []



def test_a_closed_pipe_ends_presets_quietly():
    # `tok1d presets | head -1` once head has left: every write meets a closed pipe. The command
    # ends quietly, as Unix tools do, not in a BrokenPipeError traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([*TOK1D, "presets"], cwd=REPO, stdout=write_end, stderr=subprocess.PIPE,
                                text=True, timeout=60)
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_the_cli_leaves_the_calling_process_signals_alone(capsys):
    # main() also runs inside other processes (the tests'): SIGPIPE's default action there would
    # kill them at the next write to a closed pipe or socket (it killed pytest-xdist workers).
    import signal

    from flows.cli import main

    before = signal.getsignal(signal.SIGPIPE)
    assert main(["presets"]) == 0
    assert signal.getsignal(signal.SIGPIPE) == before
    assert "smoke" in capsys.readouterr().out
