"""The shared atomic Parquet writer."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.tables import write_parquet_atomic


def test_writes_into_missing_folder_with_options(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "part-00000.parquet"
    table = pa.table({"x": [1, 2, 3]})
    write_parquet_atomic(table, path, compression="zstd")
    assert pq.read_table(path).equals(table)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "part-00000.parquet"
    with pytest.raises(Exception):
        write_parquet_atomic(pa.table({"x": [1]}), path, compression="no-such-codec")
    assert list(tmp_path.iterdir()) == []
