"""The ingest artifact's tables: schemas, shard names and atomic shard writes."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.store import temporary_path
from tasks.tables import write_parquet_atomic

IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # sha256 hex of the source item's bytes
        ("split", pa.string()),  # "train" | "val"
        ("label_id", pa.int32()),
        ("label_name", pa.string()),
        ("source_caption", pa.string()),  # caption shipped with the source, null if none
        ("source", pa.string()),  # where the item came from (relative path, file#index)
        ("orig_width", pa.int32()),
        ("orig_height", pa.int32()),
        ("image", pa.binary()),  # RGB, resolution x resolution, encoded as image_format says
        ("image_format", pa.string()),  # "png" | "jpeg" | "webp" (tasks/ingest/storage.py)
        ("kept_source", pa.bool_()),  # the bytes are the source file's own (ingest.storage.policy)
    ]
)
REJECTS_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
CLASSES_SCHEMA = pa.schema(
    [
        ("label_id", pa.int32()),
        ("label_name", pa.string()),
        ("images", pa.int64()),
        ("train", pa.int64()),
        ("val", pa.int64()),
    ]
)
TABLE_SCHEMAS = {"images": IMAGES_SCHEMA, "rejects": REJECTS_SCHEMA, "classes": CLASSES_SCHEMA}
# Rows per Parquet row group: the unit later stages stream in.
ROW_GROUP_ROWS = 512


def column_types(schema: pa.Schema) -> dict[str, str]:
    return {field.name: str(field.type) for field in schema}


def table_glob(table: str) -> str:
    return f"{table}/*.parquet"


def part_path(output_dir: Path, table: str, index: int) -> Path:
    return output_dir / table / f"part-{index:05d}.parquet"


def shard_done(output_dir: Path, index: int) -> bool:
    return part_path(output_dir, "images", index).is_file() and part_path(output_dir, "rejects", index).is_file()


def _options(schema: pa.Schema) -> dict:
    small = [name for name in schema.names if name != "image"]
    # Encoded image bytes neither compress, dictionary-encode, nor make useful min/max statistics.
    return dict(compression="zstd", use_dictionary=small, write_statistics=small)


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write one ingest table file atomically, laid out for the stages that stream it."""
    write_parquet_atomic(table, path, row_group_size=ROW_GROUP_ROWS, **_options(table.schema))


class ImagesShardWriter:
    """Shard `index` of the images table written one row group at a time, so a shard's image
    bytes are never all in memory; `finish` writes the rejects part and then moves the images
    part into place (a shard counts as done once both files exist), `abort` leaves nothing."""

    def __init__(self, output_dir: Path, index: int):
        self.output_dir, self.index = output_dir, index
        self.path = part_path(output_dir, "images", index)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_path(self.path)
        self.writer = pq.ParquetWriter(self.tmp, IMAGES_SCHEMA, **_options(IMAGES_SCHEMA))
        self.rows = 0

    def write(self, rows: pa.Table) -> None:
        """Rows in ROW_GROUP_ROWS-row groups (the caller hands over full groups, the last may be short)."""
        self.writer.write_table(rows, row_group_size=ROW_GROUP_ROWS)
        self.rows += rows.num_rows

    def finish(self, rejects: pa.Table) -> None:
        self.writer.close()
        write_parquet(rejects, part_path(self.output_dir, "rejects", self.index))
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def write_images_without(source: Path, target: Path, drop: set[int]) -> None:
    """The images part `source` without its rows `drop`, written atomically to `target` in full
    row groups (so its layout depends on the rows it keeps alone)."""
    tmp = temporary_path(target)
    try:
        with pq.ParquetWriter(tmp, IMAGES_SCHEMA, **_options(IMAGES_SCHEMA)) as writer:
            row, pending = 0, None
            for batch in pq.ParquetFile(source).iter_batches(batch_size=ROW_GROUP_ROWS):
                keep = pa.array([row + offset not in drop for offset in range(batch.num_rows)])
                row += batch.num_rows
                piece = pa.Table.from_batches([batch]).filter(keep)
                pending = piece if pending is None else pa.concat_tables([pending, piece])
                while pending.num_rows >= ROW_GROUP_ROWS:
                    writer.write_table(pending.slice(0, ROW_GROUP_ROWS), row_group_size=ROW_GROUP_ROWS)
                    pending = pending.slice(ROW_GROUP_ROWS)
            if pending is not None and pending.num_rows:
                writer.write_table(pending, row_group_size=ROW_GROUP_ROWS)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_shard(output_dir: Path, index: int, images: pa.Table, rejects: pa.Table) -> None:
    """Shard `index` of both tables from whole tables (test builders); it counts as done once both files exist."""
    write_parquet(rejects, part_path(output_dir, "rejects", index))
    write_parquet(images, part_path(output_dir, "images", index))
