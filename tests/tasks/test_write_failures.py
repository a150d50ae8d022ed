"""A full disk or an unwritable store in the middle of a stage: the stage ends with the path and
the cause, no file that looks whole is left, and the rerun once the space is back completes with
the artifact an undisturbed run makes."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks import lineage
from tasks.config import IngestConfig, SourceConfig
from tasks.runner import execute_stage
from tasks.store import Store


def _folder(root: Path, images: int = 90) -> Path:
    rng = np.random.default_rng(0)
    for index in range(images):
        directory = root / f"class-{index % 3}"
        directory.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(directory / f"{index:03d}.png")
    return root


def _config(root: Path) -> IngestConfig:
    return IngestConfig(source=SourceConfig(kind="folder", path=str(root)), resolution=8, shard_rows=16)


FAILING_RUN = """
import errno, sys
from pathlib import Path
import pyarrow.parquet as pq
from tasks.config import IngestConfig, SourceConfig
from tasks.runner import execute_stage
from tasks.store import Store

code, source, store = int(sys.argv[1]), sys.argv[2], Store(sys.argv[3])
real_write, calls = pq.write_table, [0]

def failing_write(table, where, **options):
    calls[0] += 1
    if calls[0] > 3:  # the disk fills up after three files; half of the fourth lands
        Path(where).write_bytes(b"PAR1" + b"\\0" * 100)
        raise OSError(code, "No space left on device" if code == errno.ENOSPC else "Permission denied", str(where))
    return real_write(table, where, **options)

pq.write_table = failing_write
config = IngestConfig(source=SourceConfig(kind="folder", path=source), resolution=8, shard_rows=16)
try:
    execute_stage("ingest", config, {}, store)
except OSError as error:
    print(f"{error.errno} {error.filename}")
    sys.exit(1)
"""


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_write_failure_mid_stage_names_the_path_and_the_rerun_completes(tmp_path, code):
    source = _folder(tmp_path / "images")
    clean = execute_stage("ingest", _config(source), {}, Store(tmp_path / "clean")).manifest

    store = Store(tmp_path / "store")
    failed = subprocess.run([sys.executable, "-c", FAILING_RUN, str(code), str(source), str(store.root)],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert failed.returncode == 1, failed.stderr
    number, path = failed.stdout.split()
    assert int(number) == code and path.startswith(str(store.root))
    # No file that looks whole: every Parquet file a reader would pick up is a complete one.
    for table_file in store.root.rglob("*.parquet"):
        pq.read_metadata(table_file)
    assert not list(store.root.glob("artifacts/ingest/*"))

    # The space is back. The failed stage run ends in lineage: as failed if its record could be
    # written, else as killed once a later process finds its lease.
    lineage.reconcile_store(store, found_by="the rerun")
    rerun = execute_stage("ingest", _config(source), {}, store)
    assert not rerun.cache_hit and rerun.manifest.artifact_id == clean.artifact_id
    connection = lineage.connect(store)
    statuses = connection.execute("select status from stages order by event_time").fetchall()
    connection.close()
    assert statuses[0][0] in ("failed", "killed") and statuses[-1] == ("completed",)
