"""The store-wide text-embedding cache and the Parquet layout of embedding tables.

    <store>/caches/text-embeddings/<encoder-key>/part-<time>-<uuid>.parquet

One folder per (encoder id, model revision or hash of its files, max_tokens, dtype); one row per
caption (keyed by the sha256 of its text). A caption embedded once by an encoder is never
embedded again, by any run of any preset. Rows use the same columns as the stage's output table:

    caption_id, caption, num_tokens, tokens [T][D], mask [T], pooled [P], dtype, dim, encoder

`tokens` and `pooled` are nested fixed-size lists of float16 (or float32), which DuckDB reads as
FLOAT[][] and FLOAT[].
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.embed_text.encoders import EncodedBatch
from tasks.hashing import hash_value, sha256_file
from tasks.store import atomic_write_text, write_json
from tasks.tables import write_parquet_atomic

log = logging.getLogger("tok1d")

CACHE_DIR = Path("caches") / "text-embeddings"
# A cache shard holds about this many bytes of embeddings.
SHARD_BYTES = 64 << 20
ARROW_FLOAT = {"float16": pa.float16(), "float32": pa.float32()}


def encoder_key(backend: str, model: str, revision: str, max_tokens: int, dtype: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", Path(model).name.lower()).strip("-")[:40] or "model"
    digest = hash_value({"backend": backend, "model": model, "revision": revision, "max_tokens": max_tokens, "dtype": dtype})
    return f"{backend}-{slug}-{digest[:16]}"


def files_fingerprint(folder: Path, memo_path: Path) -> str:
    """sha256 over the files of a model folder, remembering each file's hash by (path, size, mtime)."""
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    entries, changed = [], False
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        stat = path.stat()
        memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if memo_key not in memo:
            memo[memo_key] = sha256_file(path)
            changed = True
        entries.append([relative.as_posix(), memo[memo_key]])
    if not entries:
        raise FileNotFoundError(f"embed_text.model: the model folder {folder} holds no files")
    if changed:
        atomic_write_text(memo_path, json.dumps(memo, indent=1, sort_keys=True))
    return "sha256:" + hash_value(entries)


def embeddings_schema(max_tokens: int, dim: int, pooled_dim: int, dtype: str) -> pa.Schema:
    value = ARROW_FLOAT[dtype]
    return pa.schema(
        [
            ("caption_id", pa.string()),
            ("caption", pa.string()),
            ("num_tokens", pa.int32()),
            ("tokens", pa.list_(pa.list_(value, dim), max_tokens)),
            ("mask", pa.list_(pa.bool_(), max_tokens)),
            ("pooled", pa.list_(value, pooled_dim)),
            ("dtype", pa.string()),
            ("dim", pa.int32()),
            ("encoder", pa.string()),
        ]
    )


def embeddings_table(
    caption_ids: list[str], captions: list[str], batch: EncodedBatch, dtype: str, encoder: str
) -> pa.Table:
    """Rows of an embedding table; raises when `dtype` cannot hold the values."""
    rows, max_tokens, dim = batch.tokens.shape
    with np.errstate(over="ignore"):  # overflow is checked right below, with a better message
        tokens = batch.tokens.astype(dtype)
        pooled = batch.pooled.astype(dtype)
    if not (np.isfinite(tokens).all() and np.isfinite(pooled).all()):
        peak = float(np.abs(batch.tokens).max())
        raise ValueError(
            f"embed_text.dtype={dtype} cannot hold the embeddings of {encoder} (largest |value| {peak:.3g}); "
            f"set embed_text.dtype=float32"
        )
    schema = embeddings_schema(max_tokens, dim, pooled.shape[1], dtype)
    flat_tokens = pa.array(tokens.reshape(-1), ARROW_FLOAT[dtype])
    columns = [
        pa.array(caption_ids, pa.string()),
        pa.array(captions, pa.string()),
        pa.array(batch.mask.sum(1).astype(np.int32)),
        pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat_tokens, dim), max_tokens),
        pa.FixedSizeListArray.from_arrays(pa.array(batch.mask.reshape(-1)), max_tokens),
        pa.FixedSizeListArray.from_arrays(pa.array(pooled.reshape(-1), ARROW_FLOAT[dtype]), pooled.shape[1]),
        pa.array([dtype] * rows, pa.string()),
        pa.array(np.full(rows, dim, np.int32)),
        pa.array([encoder] * rows, pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def table_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [N, T, D], mask [N, T] bool, pooled [N, P]) of an embedding table, in its stored dtype."""
    tokens_type = table.schema.field("tokens").type
    max_tokens, dim = tokens_type.list_size, tokens_type.value_type.list_size
    pooled_dim = table.schema.field("pooled").type.list_size
    rows = table.num_rows

    def values(name: str, depth: int) -> np.ndarray:
        column = table[name].combine_chunks() if rows else pa.array([], table.schema.field(name).type)
        for _ in range(depth):
            column = column.flatten()
        array = column.to_numpy(zero_copy_only=False)
        # Arrow-owned memory is read-only; torch.from_numpy wants arrays it may write.
        return array if array.flags.writeable else array.copy()

    tokens = values("tokens", 2).reshape(rows, max_tokens, dim)
    mask = values("mask", 1).astype(bool).reshape(rows, max_tokens)
    pooled = values("pooled", 1).reshape(rows, pooled_dim)
    return tokens, mask, pooled


def rows_per_shard(max_tokens: int, dim: int, dtype: str, minimum: int) -> int:
    itemsize = np.dtype(dtype).itemsize
    return max(minimum, SHARD_BYTES // max(1, max_tokens * dim * itemsize))


class EmbeddingCache:
    """The embeddings of one encoder configuration, shared by every run on the store."""

    def __init__(self, directory: Path, description: dict):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / "key.json").exists():
            write_json(directory / "key.json", description)

    def files(self) -> list[Path]:
        # Time-prefixed names: sorted order is write order, so the first copy of a caption wins.
        return sorted(self.directory.glob("part-*.parquet"))

    def _readable(self) -> Iterator[tuple[Path, pq.ParquetFile]]:
        for path in self.files():
            try:
                yield path, pq.ParquetFile(path)
            except (OSError, pa.ArrowInvalid) as error:
                # Shards are renamed into place whole, so this is outside damage; re-embed them.
                log.warning("text-embedding cache: skipping unreadable shard %s (%s)", path, error)

    def caption_ids(self) -> set[str]:
        found: set[str] = set()
        for _, parquet in self._readable():
            found.update(parquet.read(columns=["caption_id"])["caption_id"].to_pylist())
        return found

    def append(self, table: pa.Table) -> None:
        path = self.directory / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        write_parquet_atomic(table, path)

    def select(self, wanted: set[str]) -> Iterator[pa.Table]:
        """The rows of the wanted captions, each caption once (its first row in file order)."""
        seen: set[str] = set()
        for _, parquet in self._readable():
            table = parquet.read()
            keep = []
            for cid in table["caption_id"].to_pylist():
                take = cid in wanted and cid not in seen
                keep.append(take)
                if take:
                    seen.add(cid)
            if any(keep):
                yield table.filter(pa.array(keep))
