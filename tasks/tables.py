"""Atomic Parquet writes: the one way stages put a table file on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.store import temporary_path


def write_parquet_atomic(table: pa.Table, path: Path, **write_options: Any) -> None:
    """Write `table` to `path` via a hidden sibling and a rename; `write_options` go to `pq.write_table`.

    Readers glob for finished `*.parquet` files, so they never see half a file, and a failed or
    interrupted write leaves nothing they would pick up.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        pq.write_table(table, tmp, **write_options)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
