"""Reading a `caption` artifact: the per-image captions and the per-class caption pools."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.store import Manifest, Store


def _read(manifest: Manifest, store: Store, table: str, columns: list[str] | None = None) -> pa.Table:
    if manifest.stage != "caption":
        raise ValueError(f"expected a caption artifact, got one of stage {manifest.stage!r} ({manifest.artifact_id})")
    files = manifest.table_files(store, table)
    if not files:
        raise FileNotFoundError(
            f"caption artifact {manifest.artifact_id} has no files for table {table!r} under "
            f"{manifest.directory(store)}; rerun the caption stage"
        )
    return pa.concat_tables([pq.read_table(path, columns=columns) for path in files])


def load_captions(manifest: Manifest, store: Store, columns: list[str] | None = None) -> pa.Table:
    """image_id, split, label_id, caption_id, caption, origin: one row per captioned image."""
    return _read(manifest, store, "captions", columns)


def load_failures(manifest: Manifest, store: Store) -> pa.Table:
    """image_id, reason, detail, attempts: the images the last run could not caption."""
    return _read(manifest, store, "failures")


def load_caption_pool(manifest: Manifest, store: Store) -> dict[int, list[tuple[str, str]]]:
    """label_id -> [(caption_id, caption), ...]: the captions class-conditional generation draws from."""
    table = _read(manifest, store, "caption_pool", ["label_id", "caption_id", "caption"])
    pool: dict[int, list[tuple[str, str]]] = {}
    for label_id, cid, caption in zip(*(table[name].to_pylist() for name in ("label_id", "caption_id", "caption"))):
        pool.setdefault(int(label_id), []).append((cid, caption))
    return pool
