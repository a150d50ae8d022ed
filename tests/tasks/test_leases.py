"""Leases: a run or stage run whose process died is found and recorded `killed`, once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

import duckdb

from tasks import lineage
from tasks.leases import Lease, dead_leases, process_start
from tasks.store import Store

STARTED = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)


def stage_fields(stage_run_id: str) -> dict:
    return dict(stage_run_id=stage_run_id, run_id="r1", flow_run_id=None, stage="ingest", cache_hit=False,
                cache_key="k.0", config_hash="c", code_version="v", git_revision=None, started_at=STARTED)


HOLDER = """
import sys, time
from tasks import lineage
from tasks.leases import Lease
from tasks.store import Store
store = Store(sys.argv[1])
fields = dict(stage_run_id="s1", run_id="r1", flow_run_id=None, stage="ingest", cache_hit=False,
              cache_key="k.0", config_hash="c", code_version="v", git_revision=None, started_at=lineage.now())
lineage.record_stage_event(store, status="running", **fields)
with Lease(store, "stage", "s1", fields):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_killed_holder_is_recorded_killed_once(tmp_path):
    store = Store(tmp_path / "store")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.root)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    assert dead_leases(store) == []  # alive: nothing to reconcile
    holder.send_signal(signal.SIGKILL)
    holder.wait()

    [found] = lineage.reconcile_store(store, found_by="a test")
    assert found.kind == "stage" and found.record_id == "s1" and f"process {holder.pid}" in found.reason
    assert lineage.reconcile_store(store, found_by="a test") == []  # recorded once
    assert not list((store.root / "leases").iterdir())
    lineage.ensure_database(store)
    with duckdb.connect(str(store.duckdb_path), read_only=True) as connection:
        status, error, pid, ended = connection.execute("select status, error, pid, ended_at from stages").fetchone()
    assert status == "killed" and pid == holder.pid and ended is not None
    assert error.startswith(f"killed: process {holder.pid} on {socket.gethostname()} is gone (found by a test at ")


def _write_lease(store: Store, name: str, host: str, pid: int, start: str | None) -> None:
    path = store.root / "leases" / f"stage-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = {**stage_fields(name), "started_at": {"__datetime__": STARTED.isoformat()}}
    path.write_text(json.dumps({"kind": "stage", "id": name, "host": host, "pid": pid, "process_start": start,
                                "fields": fields}))


def test_another_hosts_lease_is_dead_once_its_heartbeat_expires(tmp_path):
    store = Store(tmp_path / "store")
    _write_lease(store, "remote", "a-worker-node", 4242, None)
    assert dead_leases(store, expiry_s=60) == []
    old = time.time() - 120
    os.utime(store.root / "leases" / "stage-remote.json", (old, old))
    [dead] = dead_leases(store, expiry_s=60)
    assert dead.reason.startswith("no heartbeat from a-worker-node (pid 4242) for 12")
    assert dead.fields["started_at"] == STARTED


def test_a_reused_pid_is_not_the_holder(tmp_path):
    store = Store(tmp_path / "store")
    here = socket.gethostname()
    _write_lease(store, "mine", here, os.getpid(), process_start(os.getpid()))
    _write_lease(store, "reused", here, os.getpid(), "another-boot:1")  # same pid, another process
    assert [lease.record_id for lease in dead_leases(store)] == (["reused"] if process_start(os.getpid()) else [])


def test_the_heartbeat_refreshes_the_lease_and_leaving_removes_it(tmp_path):
    store = Store(tmp_path / "store")
    with Lease(store, "run", "r9", {"run_id": "r9"}, heartbeat_s=0.05) as lease:
        first = lease.path.stat().st_mtime_ns
        os.utime(lease.path, ns=(first - 10**9, first - 10**9))
        time.sleep(0.3)
        assert lease.path.stat().st_mtime_ns > first - 10**9
    assert not lease.path.exists()


def test_a_holder_that_wrote_its_end_before_dying_is_not_relabelled(tmp_path):
    store = Store(tmp_path / "store")
    fields = stage_fields("done1")
    lineage.record_stage_event(store, status="running", **fields)
    lineage.record_stage_event(store, status="completed", ended_at=STARTED, **fields)
    _write_lease(store, "done1", "a-worker-node", 7, None)  # died after its end event, lease left
    old = time.time() - 3600
    os.utime(store.root / "leases" / "stage-done1.json", (old, old))
    assert lineage.reconcile_store(store, found_by="a test") == []
    assert not list((store.root / "leases").glob("*.json"))
    connection = lineage.connect(store)
    assert connection.execute("select status from stages").fetchall() == [("completed",)]
    connection.close()
