"""Ingest artifacts from images in memory, written with the ingest stage's schemas and shard writer."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from builders.store import commit_folder, work_folder
from tasks.ingest.tables import (
    CLASSES_SCHEMA,
    IMAGES_SCHEMA,
    REJECTS_SCHEMA,
    column_types,
    part_path,
    table_glob,
    write_parquet,
    write_shard,
)
from tasks.store import Manifest, Store, TableRecord


def png(array: np.ndarray) -> bytes:
    """An [H, W, 3] uint8 array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def colour_png(index: int, size: int = 8) -> bytes:
    """A small PNG of a colour unique to `index`."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (index % 256, (index // 256) % 256, 77)).save(buffer, format="PNG")
    return buffer.getvalue()


def ingest_from_images(
    store: Store,
    images: Sequence[np.ndarray | bytes],
    labels: Sequence[int],
    class_names: Sequence[str],
    splits: Sequence[str],
    *,
    image_ids: Sequence[str] | None = None,
    source_captions: dict[int, str] | None = None,
    shards: int = 1,
) -> Manifest:
    """An ingest artifact: image i (an RGB array or PNG bytes) with label_id labels[i] and split
    splits[i], id image_ids[i] (default `img-iiii`), source caption source_captions.get(i); the
    `classes` table counts the images per class and split; `shards` images shards of equal size."""
    count = len(images)
    pngs = [image if isinstance(image, bytes) else png(image) for image in images]
    sizes = [Image.open(io.BytesIO(data)).size for data in pngs]
    source_captions = source_captions or {}
    labels = [int(label) for label in labels]
    table = pa.table(
        {
            "image_id": list(image_ids) if image_ids is not None else [f"img-{i:04d}" for i in range(count)],
            "split": list(splits),
            "label_id": labels,
            "label_name": [class_names[label] for label in labels],
            "source_caption": [source_captions.get(i) for i in range(count)],
            "source": [f"test#{i}" for i in range(count)],
            "orig_width": [width for width, _ in sizes],
            "orig_height": [height for _, height in sizes],
            "image": pngs,
            "image_format": ["png"] * count,
            "kept_source": [False] * count,
        },
        schema=IMAGES_SCHEMA,
    )
    per_split = {split: np.bincount([l for l, s in zip(labels, splits) if s == split], minlength=len(class_names))
                 for split in ("train", "val")}
    classes = pa.table(
        {
            "label_id": range(len(class_names)),
            "label_name": list(class_names),
            "images": per_split["train"] + per_split["val"],
            "train": per_split["train"],
            "val": per_split["val"],
        },
        schema=CLASSES_SCHEMA,
    )
    folder = work_folder(store)
    step = max(1, -(-count // shards))
    for shard, start in enumerate(range(0, max(count, 1), step)):
        write_shard(folder, shard, table.slice(start, step), REJECTS_SCHEMA.empty_table())
    write_parquet(classes, part_path(folder, "classes", 0))
    rows = {"images": count, "rejects": 0, "classes": len(class_names)}
    tables = {
        name: TableRecord(glob=table_glob(name), rows=rows[name], columns=column_types(schema))
        for name, schema in (("images", IMAGES_SCHEMA), ("rejects", REJECTS_SCHEMA), ("classes", CLASSES_SCHEMA))
    }
    return commit_folder(store, "ingest", folder, tables, {"images": count, "classes": len(class_names)})


def ingest_artifact(store: Store, count: int, class_names=("t-shirt", "sneaker", "bag"), source_captions=None,
                    shards: int = 2) -> Manifest:
    """Colour squares: image i has id `img-iiii`, class i % len(class_names), split `val` when
    i % 4 == 0, an 8x8 PNG of a colour unique to i (colour_png(i)); `source_captions` maps
    i -> caption (others get none)."""
    return ingest_from_images(
        store,
        [colour_png(i) for i in range(count)],
        [i % len(class_names) for i in range(count)],
        class_names,
        ["val" if i % 4 == 0 else "train" for i in range(count)],
        source_captions=source_captions,
        shards=shards,
    )
