"""The shard plan (tasks/shards.py): fixed row ranges from the input files and shard_rows alone,
batches that depend on the shard only, the resume check, and the runtime's fan-out settings."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.config import RuntimeConfig
from tasks.shards import (
    InProcess,
    ShardNeeds,
    attached_fanout,
    fan_out,
    iter_shard_batches,
    plan_shards,
    shard_done,
)


def write_ids(path, start: int, count: int, row_group_size: int) -> None:
    pq.write_table(pa.table({"id": pa.array(range(start, start + count), pa.int64())}), path,
                   row_group_size=row_group_size)


@pytest.fixture
def files(tmp_path):
    """Three input files of 23, 0 and 10 rows, in row groups of 5 and 3 rows."""
    paths = [tmp_path / f"in-{i}.parquet" for i in range(3)]
    write_ids(paths[0], 0, 23, 5)
    write_ids(paths[1], 23, 0, 5)
    write_ids(paths[2], 23, 10, 3)
    return paths


def test_shards_are_fixed_row_ranges_of_each_file(files):
    shards = plan_shards(files, 10)
    assert [(s.name, s.start, s.stop) for s in shards] == [
        ("part-00000-0000", 0, 10), ("part-00000-0001", 10, 20), ("part-00000-0002", 20, 23),
        ("part-00001-0000", 0, 0),  # an empty file still has its (empty) part
        ("part-00002-0000", 0, 10),
    ]
    assert plan_shards(files, 10) == shards  # nothing but the files and shard_rows decides them
    with pytest.raises(ValueError, match="shard_rows must be >= 1"):
        plan_shards(files, 0)


@pytest.mark.parametrize("shard_rows", [1, 4, 7, 10, 100])
def test_shard_batches_cover_each_row_once_in_full_batches(files, shard_rows):
    seen = []
    for shard in plan_shards(files, shard_rows):
        batches = list(iter_shard_batches(shard, 4, ["id"]))
        ids = [i for b in batches for i in b.column("id").to_pylist()]
        assert len(ids) == shard.rows, shard
        # Row-group ends do not cut batches: only a shard's last batch may be short.
        assert all(b.num_rows == 4 for b in batches[:-1]), [b.num_rows for b in batches]
        seen += ids
    assert seen == list(range(33))


def test_a_shard_is_done_only_when_its_file_reads_with_the_schema(tmp_path):
    schema = pa.schema([("id", pa.int64())])
    path = tmp_path / "part-00000-0000.parquet"
    assert not shard_done(path, schema)
    write_ids(path, 0, 3, 5)
    assert shard_done(path, schema)
    assert not shard_done(path, pa.schema([("id", pa.string())]))
    path.write_bytes(b"not parquet")
    assert not shard_done(path, schema)


def test_fan_out_runs_in_order_in_process_unless_another_is_attached(files):
    shards = plan_shards(files, 10)
    runtime = RuntimeConfig()
    assert list(fan_out("test", lambda s: s.name, shards, runtime)) == [s.name for s in shards]

    class Reversed(InProcess):
        def map(self, stage, fn, shards, runtime, needs):
            asked.append(needs)
            return (fn(s) for s in reversed(shards))

    asked = []
    with attached_fanout(Reversed()):
        assert list(fan_out("test", lambda s: s.stop, shards, runtime)) == [10, 0, 23, 20, 10]
        list(fan_out("test", lambda s: s.stop, shards, runtime, ShardNeeds(cpus=2, device=False)))
    assert asked == [ShardNeeds(cpus=1, device=True), ShardNeeds(cpus=2, device=False)]  # the stage's needs reach it
    assert list(fan_out("test", lambda s: s.stop, shards, runtime)) == [10, 20, 23, 0, 10]


def test_fan_out_settings_are_checked():
    assert RuntimeConfig(task_runner="ray", ray_workers=2, ray_address="ray://head:10001").ray_workers == 2
    with pytest.raises(ValueError, match="runtime.ray_workers must be >= 1"):
        RuntimeConfig(task_runner="ray", ray_workers=0)
    with pytest.raises(ValueError, match="need runtime.task_runner=ray"):
        RuntimeConfig(ray_address="127.0.0.1:6379")
    with pytest.raises(ValueError, match="task_runner"):
        RuntimeConfig(task_runner="dask")
    assert RuntimeConfig(task_runner="ray", ray_gpus_per_shard=0.5).ray_gpus_per_shard == 0.5
    with pytest.raises(ValueError, match="runtime.ray_gpus_per_shard must be > 0"):
        RuntimeConfig(task_runner="ray", ray_gpus_per_shard=0)
    with pytest.raises(ValueError, match="at least one CPU"):
        ShardNeeds(cpus=0)
