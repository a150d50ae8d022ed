"""`tok1d gc` removes stale temporary files, finished work dirs and (asked) unreferenced
artifacts, and never a live writer's files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tasks import gc
from tasks.store import Manifest, Store

OLD = time.time() - 3600

WRITER = """
import sys, time
from pathlib import Path
from tasks.store import exclusive_lock
work = Path(sys.argv[1])
with exclusive_lock(work / ".lock"):
    (work / ".shard-3.parquet.1a2b3c4d.tmp").write_bytes(b"half a shard")
    print("writing", flush=True)
    time.sleep(600)
"""


def _old(path: Path) -> Path:
    os.utime(path, (OLD, OLD))
    return path


def _cache_record(store: Store, stage: str, key: str, root: str) -> None:
    manifest = Manifest(stage=stage, artifact_id=root.rsplit("/", 1)[1], root=root, files=[], tables={}, rows=0,
                        config_hash="c", cache_key=f"{key}.0", code_version="v", summary={}, created_at="now")
    store.write_cache_record(stage, key, 0, manifest)


def test_gc_removes_what_no_run_needs_and_nothing_a_live_writer_holds(tmp_path, capsys):
    store = Store(tmp_path / "store")
    finished_key, unfinished_key, live_key = "a" * 64, "b" * 64, "c" * 64
    finished = store.work_dir("ingest", finished_key)
    (finished / "shard-0.parquet").write_bytes(b"x" * 1000)
    _cache_record(store, "ingest", finished_key, "artifacts/ingest/kept")
    (store.root / "artifacts" / "ingest" / "kept").mkdir(parents=True)
    (store.root / "artifacts" / "ingest" / "orphan").mkdir(parents=True)
    (store.root / "artifacts" / "ingest" / "orphan" / "images.parquet").write_bytes(b"y" * 500)
    unfinished = store.work_dir("train-tokenizer", unfinished_key)
    (unfinished / "checkpoints").mkdir()
    (unfinished / "checkpoints" / "step-100.safetensors").write_bytes(b"z" * 200)
    (store.root / "lineage" / "stage_events").mkdir(parents=True, exist_ok=True)
    stale = store.root / "lineage" / "stage_events" / ".123-abc.parquet.9f8e7d6c.tmp"
    stale.write_bytes(b"cut")
    _old(stale)
    young = store.root / "lineage" / "run_events" / ".456-def.parquet.0a1b2c3d.tmp"
    young.parent.mkdir(parents=True, exist_ok=True)
    young.write_bytes(b"being written")

    live = store.work_dir("pretokenize", live_key)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        live_tmp = _old(live / ".shard-3.parquet.1a2b3c4d.tmp")  # old, but its writer holds the lock

        planned = {r.path: r.reason for r in gc.plan_gc(store)}
        assert planned == {finished: "work dir of a stage run that completed since",
                           stale: "temporary file of an interrupted write"}
        everything = {r.path for r in gc.plan_gc(store, resumable=True, artifacts=True)}
        assert everything == {finished, stale, unfinished, store.root / "artifacts" / "ingest" / "orphan"}

        assert gc.remove(gc.plan_gc(store, resumable=True, artifacts=True)) == 1000 + 3 + 200 + 500
        assert not finished.exists() and not stale.exists() and not unfinished.exists()
        assert young.exists() and live_tmp.exists() and (live / ".lock").exists()
        assert (store.root / "artifacts" / "ingest" / "kept").exists()
        assert writer.poll() is None  # still writing, undisturbed
    finally:
        writer.kill()
        writer.wait()
    # Its writer gone, the live dir is an unfinished stage run's: kept unless asked.
    assert {r.path for r in gc.plan_gc(store)} == set()
    assert {r.path for r in gc.plan_gc(store, resumable=True)} == {live}
