"""Kills at the narrow windows of lease keeping (issue 14 item 3: no `running` row without a live
process). A process SIGKILLed right after it recorded a run or stage run `running` is still
found dead and recorded `killed`: its lease exists before that event. A reconciler killed after
claiming a dead lease but before recording it leaves a claim the next reconcile takes back. The
kill lands exactly there: the child's own writer kills its process at that point."""

from __future__ import annotations

import signal
import subprocess
import sys

import duckdb

from builders.cli import REPO
from tasks import lineage
from tasks.store import Store

CHILD = """
import os, signal, sys
from tasks import lineage
from tasks.presets import load_config
from tasks.store import Store

def dies_after_running(record):
    def write(store, *args, status, **fields):
        record(store, *args, status=status, **fields)
        if status == "running":
            os.kill(os.getpid(), signal.SIGKILL)
    return write

config = load_config("smoke", [])
store = Store(sys.argv[2])
lineage.ensure_database(store)
if sys.argv[1] == "claim":  # reconcile, dying between claiming a dead lease and recording it
    from tasks.leases import reconcile
    reconcile(store, "a reconciler that dies", lambda lease, error: os.kill(os.getpid(), signal.SIGKILL))
elif sys.argv[1] == "stage":
    from tasks.runner import execute_stage
    lineage.record_stage_event = dies_after_running(lineage.record_stage_event)
    execute_stage("ingest", config.section("ingest"), {}, store, config.runtime, run_id="r1")
else:
    from flows.run_plan import record_cached_run
    lineage.record_run = dies_after_running(lineage.record_run)
    record_cached_run(config, store, [], preset="smoke", flow="a test")
"""


def _killed_at(kind: str, store: Store) -> None:
    child = subprocess.run([sys.executable, "-c", CHILD, kind, str(store.root)], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr


def _killed_at_running(kind: str, store: Store) -> int:
    _killed_at(kind, store)
    return len(lineage.reconcile_store(store, "a test"))


def _statuses(store: Store, view: str) -> list[str]:
    connection = duckdb.connect(str(store.duckdb_path), read_only=True)
    try:
        return [row[0] for row in connection.execute(f"select status from {view}").fetchall()]
    finally:
        connection.close()


def test_a_stage_run_killed_right_after_its_running_event_is_recorded_killed(tmp_path):
    store = Store(tmp_path / "store")
    assert _killed_at_running("stage", store) == 1
    assert _statuses(store, "stages") == ["killed"]


def test_a_run_killed_right_after_its_running_event_is_recorded_killed(tmp_path):
    store = Store(tmp_path / "store")
    assert _killed_at_running("run", store) == 1
    assert _statuses(store, "runs") == ["killed"]


def test_a_death_claimed_by_a_reconciler_that_died_is_still_recorded(tmp_path):
    store = Store(tmp_path / "store")
    _killed_at("stage", store)  # a dead stage run's lease
    _killed_at("claim", store)  # its claimer dies holding the claim
    assert [p.name.endswith(".claimed") for p in (store.root / "leases").iterdir()] == [True]
    assert _statuses(store, "stages") == ["running"]
    assert len(lineage.reconcile_store(store, "a test")) == 1
    assert _statuses(store, "stages") == ["killed"]
    assert list((store.root / "leases").iterdir()) == []
