"""`tok1d gc` removes a killed writer's temporary file at once, not 10 minutes later: the file's
name says which process on which host writes it (tasks/store.py `writer_tag`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tasks import gc
from tasks.store import Store, host_tag, temporary_path

WRITER = """
import sys, time
from pathlib import Path
from tasks.store import temporary_path
tmp = temporary_path(Path(sys.argv[1]) / "run_events" / "part.parquet")
tmp.parent.mkdir(parents=True, exist_ok=True)
tmp.write_bytes(b"half a file")
print(tmp, flush=True)
time.sleep(600)
"""


def test_a_killed_writers_young_temporary_file_is_removed_a_live_or_foreign_ones_kept(tmp_path):
    store = Store(tmp_path / "store")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(store.root / "lineage")], stdout=subprocess.PIPE,
                              text=True)
    try:
        written = store.root / "lineage" / "run_events" / writer.stdout.readline().strip().rsplit("/", 1)[1]
        assert written.name.startswith(f".part.parquet.{writer.pid}-{host_tag()}-")
        # Another host's writer cannot be checked from here: its young file waits until it is stale.
        foreign = written.with_name(f".part.parquet.{writer.pid}-{host_tag('another-node')}-0a1b2c3d.tmp")
        foreign.write_bytes(b"another node writing")
        assert gc.plan_gc(store) == []  # the writer lives
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    assert [(r.path, r.reason) for r in gc.plan_gc(store)] == [
        (written, f"temporary file of an interrupted write (its writer, process {writer.pid}, is gone)")]
    gc.remove(gc.plan_gc(store))
    assert not written.exists() and foreign.exists()
    # This process's own files are written by a living process.
    mine = temporary_path(store.root / "cache" / "record.json")
    mine.write_text("{}")
    assert gc.plan_gc(store) == []
