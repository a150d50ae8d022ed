"""The ingest artifact's tables: schemas, shard names and atomic shard writes."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

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
        ("image", pa.binary()),  # PNG, RGB, resolution x resolution
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


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write one ingest shard atomically, laid out for the stages that stream it."""
    small = [name for name in table.column_names if name != "image"]
    write_parquet_atomic(
        table,
        path,
        compression="zstd",
        row_group_size=ROW_GROUP_ROWS,
        # PNG bytes neither compress, dictionary-encode, nor make useful min/max statistics.
        use_dictionary=small,
        write_statistics=small,
    )


def write_shard(output_dir: Path, index: int, images: pa.Table, rejects: pa.Table) -> None:
    """Shard `index` of both tables; it counts as done once both files exist."""
    write_parquet(rejects, part_path(output_dir, "rejects", index))
    write_parquet(images, part_path(output_dir, "images", index))
