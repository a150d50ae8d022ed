"""The store-wide caption cache, for backends whose captions cost money or time to make:

    <store>/caches/captions/<key>/part-<time>-<uuid>.parquet   (image_id, caption, origin, truncated)

One folder per backend configuration (the backend chooses the key). Shards are written
atomically as captions arrive, so a kill loses at most the shard in flight, and any later run,
of this or another preset, needs only the images the cache does not hold yet.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.caption.backends.base import CaptionResult
from tasks.store import write_json
from tasks.tables import write_parquet_atomic

log = logging.getLogger("tok1d")

CACHE_DIR = Path("caches") / "captions"
CACHE_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("caption", pa.string()), ("origin", pa.string()), ("truncated", pa.bool_())]
)


class CaptionCache:
    """Captions of one backend configuration, shared by every run on the store.

    Appends are whole Parquet shards under unique names (so concurrent runs never collide);
    reading deduplicates by image_id, keeping the first row in file (= time) order.
    """

    def __init__(self, directory: Path, shard_rows: int, description: dict | None = None):
        self.directory = directory
        self.shard_rows = max(1, shard_rows)
        self._buffer: list[CaptionResult] = []
        directory.mkdir(parents=True, exist_ok=True)
        if description is not None and not (directory / "key.json").exists():
            write_json(directory / "key.json", description)

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("part-*.parquet"))

    def load(self) -> dict[str, tuple[str, str]]:
        """image_id -> (caption, origin)."""
        captions: dict[str, tuple[str, str]] = {}
        for path in self.files():
            try:
                table = pq.read_table(path, columns=["image_id", "caption", "origin"])
            except (OSError, pa.ArrowInvalid) as error:
                # Shards are renamed into place whole, so this is outside damage; recaption them.
                log.warning("caption cache: skipping unreadable shard %s (%s)", path, error)
                continue
            for image_id, caption, origin in zip(*(table[name].to_pylist() for name in table.column_names)):
                captions.setdefault(image_id, (caption, origin))
        return captions

    def add(self, result: CaptionResult) -> None:
        self._buffer.append(result)
        if len(self._buffer) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        rows, self._buffer = self._buffer, []
        table = pa.table(
            {
                "image_id": [r.image_id for r in rows],
                "caption": [r.caption for r in rows],
                "origin": [r.origin for r in rows],
                "truncated": [r.truncated for r in rows],
            },
            schema=CACHE_SCHEMA,
        )
        # Time first, so that file order is write order; the uuid keeps concurrent writers apart.
        path = self.directory / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        write_parquet_atomic(table, path)
