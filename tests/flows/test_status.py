"""`tok1d status`: a killed stage told from a running one; the latest run apart from history; open failures only."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from flows.status import print_status, shown_status


def test_running_stage_of_a_dead_process_shows_as_killed():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    here = socket.gethostname()
    assert shown_status("running", here, child.pid) == "killed"
    assert shown_status("running", here, os.getpid()) == "running"
    # Another host's process cannot be checked from here; finished stages keep their status.
    assert shown_status("running", "elsewhere", child.pid) == "running"
    assert shown_status("completed", here, child.pid) == "completed"
    assert shown_status("running", here, None) == "running"


def _event(table: str, store, minute: int, **fields) -> None:
    from datetime import datetime, timezone

    from tasks import lineage

    at = datetime(2026, 12, 1, 12, minute, tzinfo=timezone.utc)
    lineage.append(store, table, [{"started_at": at, "ended_at": at, "event_time": at, **fields}])


def test_status_shows_the_latest_run_apart_from_history_and_only_open_failures(tmp_path, capsys):
    """Stages of the latest run are shown as that run's, stages only earlier runs touched under
    their own heading, and a failure a later attempt (same stage, same cache key) completed is
    counted as fixed, not listed."""
    from tasks.store import Store

    store = Store(tmp_path / "store")
    runs = [("r1", 0, "failed", "c1"), ("r2", 10, "completed", "c1"), ("r3", 20, "failed", "c2"), ("r4", 30, "completed", "c3")]
    for run_id, minute, status, config in runs:
        _event("run_events", store, minute, run_id=run_id, flow="pipeline", preset="smoke", status=status,
               config_hash=config)
    stage_runs = [  # (stage run, run, minute, stage, status, cache key, error)
        ("s1", "r1", 1, "train-tokenizer", "failed", "k-tok", "CUDA out of memory"),
        ("s2", "r2", 11, "train-tokenizer", "completed", "k-tok", None),
        ("s3", "r3", 21, "evaluate", "failed", "k-eval", "reference batch missing"),
        ("s4", "r4", 31, "ingest", "completed", "k-ingest", None),
    ]
    for stage_run, run_id, minute, stage, status, key, error in stage_runs:
        _event("stage_events", store, minute, stage_run_id=stage_run, run_id=run_id, stage=stage, status=status,
               cache_hit=False, cache_key=key, output_artifact=None if error else f"a-{stage}", error=error)

    assert print_status(store.root) == 0
    out = capsys.readouterr().out
    assert "runs: 4 (2 failed, 1 of them rerun to completion)" in out
    assert "latest run: r4 (pipeline, preset smoke) completed" in out
    latest, _, rest = out.partition("stages the latest run did not include")
    assert "ingest " in latest.split("stages of the latest run")[1] and "train-tokenizer " not in latest
    assert "train-tokenizer " in rest and "evaluate " in rest
    open_failures = out.split("failures no later attempt has fixed:")[1]
    assert "evaluate" in open_failures and "reference batch missing" in open_failures
    assert "CUDA out of memory" not in out  # fixed by s2, so only counted
    assert "1 earlier failure(s) fixed since" in out


def test_a_cut_lineage_file_is_skipped_by_status_and_quarantined_by_gc(tmp_path, capsys, caplog):
    import duckdb

    from flows.gc import print_gc
    from tasks import lineage
    from tasks.store import Store

    store = Store(tmp_path / "store")
    for run_id, minute in (("r1", 0), ("r2", 10)):
        _event("run_events", store, minute, run_id=run_id, flow="pipeline", preset="smoke", status="completed")
    lineage.ensure_database(store)
    victim = sorted((store.root / "lineage" / "run_events").glob("1*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:-30])  # the footer is gone, as after a full disk
    with duckdb.connect(str(store.duckdb_path), read_only=True) as connection:
        try:
            connection.execute("select count(*) from runs").fetchone()
            raise AssertionError("a cut Parquet file should break the stored view")
        except duckdb.Error:
            pass

    assert print_status(store.root) == 0
    assert "runs: 1 (0 failed)" in capsys.readouterr().out  # the whole file still counts
    assert f"lineage: {victim} is not a whole Parquet file" in caplog.text

    assert print_gc(store.root, dry_run=True) == 0
    assert "found, 0 removal(s), 0.0 MiB to free (dry run: nothing changed)" in capsys.readouterr().out and victim.exists()
    assert print_gc(store.root) == 0
    out = capsys.readouterr().out
    assert "damaged lineage file lineage/run_events/" in out and "1 damaged lineage file(s) quarantined" in out
    assert not victim.exists() and (store.root / "lineage-quarantine" / "run_events" / victim.name).exists()
    with duckdb.connect(str(store.duckdb_path), read_only=True) as connection:
        assert connection.execute("select count(*) from runs").fetchone() == (1,)
