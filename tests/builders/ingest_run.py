"""Running the ingest stage in tests: its context, its output read back, and photo-like pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tasks.config import IngestConfig, RuntimeConfig
from tasks.stage import StageContext
from tasks.store import Store


def make_ctx(tmp_path: Path, config: IngestConfig, work: str = "work", threads: int | None = None) -> StageContext:
    """The ingest stage's context in tmp_path (`threads` > 1: that many worker processes)."""
    return StageContext(
        stage="ingest",
        config=config,
        inputs={},
        store=Store(tmp_path / "store"),
        runtime=RuntimeConfig(threads=threads),
        cache_key="k" * 64,
        work_dir=tmp_path / work,
    )


def read_dir(directory: Path) -> pa.Table:
    """Every Parquet part of one output table, in part order."""
    return pa.concat_tables(pq.read_table(path) for path in sorted(directory.glob("*.parquet")))


def artifact_bytes(output_dir: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under an output folder (to compare two runs)."""
    return {p.relative_to(output_dir).as_posix(): p.read_bytes() for p in sorted(output_dir.rglob("*")) if p.is_file()}


def smooth(seed: int, height: int, width: int) -> np.ndarray:
    """A smooth colour picture [H, W, 3] uint8 (photo-like: JPEG keeps it well)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8))
    return np.asarray(small.resize((width, height), Image.Resampling.BICUBIC))
