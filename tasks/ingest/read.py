"""Readers of the ingest artifact for later stages: tables, streamed batches, image decoding
(PNG, JPEG or WebP, as the images table's `image_format` records: tasks/ingest/storage.py)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from PIL import Image

from tasks.ingest.tables import CLASSES_SCHEMA, IMAGES_SCHEMA
from tasks.store import Manifest, Store

SPLITS = ("train", "val")


def _check_request(columns: list[str] | None, split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    unknown = [c for c in columns or () if c not in IMAGES_SCHEMA.names]
    if unknown:
        raise KeyError(f"the images table has no column(s) {unknown}; it has {IMAGES_SCHEMA.names}")


def _files(manifest: Manifest, store: Store, table: str) -> list[str]:
    if manifest.stage != "ingest":
        raise ValueError(f"expected the manifest of the ingest stage, got one of {manifest.stage!r}")
    manifest.table_glob(store, table)  # raises a clear KeyError if the table is absent
    return [str(path) for path in manifest.table_files(store, table)]


def image_table(
    manifest: Manifest, store: Store, columns: list[str] | None = None, split: str | None = None
) -> pa.Table:
    """The images table (only `columns` if given; pass small ones to leave the images on disk)."""
    _check_request(columns, split)
    dataset = pads.dataset(_files(manifest, store, "images"), schema=IMAGES_SCHEMA, format="parquet")
    condition = pc.field("split") == split if split is not None else None
    return dataset.to_table(columns=columns, filter=condition)


def iter_image_batches(
    manifest: Manifest,
    store: Store,
    batch_size: int,
    split: str | None = None,
    columns: list[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Rows of the images table in stored order, `batch_size` per batch (the last may be short).

    Reads one Parquet row group at a time, so memory stays flat however large the table is.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_request(columns, split)
    wanted = list(columns) if columns else list(IMAGES_SCHEMA.names)
    read = wanted if split is None or "split" in wanted else [*wanted, "split"]
    pending: list[pa.RecordBatch] = []
    count = 0
    for path in _files(manifest, store, "images"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=read):
            if split is not None:
                batch = batch.filter(pc.equal(batch.column("split"), split)).select(wanted)
            if batch.num_rows == 0:
                continue
            pending.append(batch)
            count += batch.num_rows
            while count >= batch_size:
                merged = pa.concat_batches(pending)
                yield merged.slice(0, batch_size)
                rest = merged.slice(batch_size)
                pending, count = ([rest] if rest.num_rows else []), rest.num_rows
    if count:
        yield pa.concat_batches(pending)


# Leading bytes of the stored formats (tasks/ingest/storage.py FORMATS) -> Pillow's plugin name.
_STORED_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))
_PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def _stored_format(data: bytes) -> str:
    for magic, name in _STORED_SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    raise ValueError(f"stored image bytes are not PNG, JPEG or WebP (they start {data[:12]!r})")


def decode_stored(data: bytes, image_format: str | None = None) -> np.ndarray:
    """A stored image -> [H, W, 3] uint8 RGB array.

    `image_format` is the row's `image_format` ("png", "jpeg", "webp"); None reads it from the
    bytes' signature, which is what the ingest stage recorded for them. Opening with the one
    format's plugin skips Pillow's probing of every other (about 25% of a small PNG's decode).
    """
    if image_format is None:
        pillow = _stored_format(data)
    elif image_format in _PILLOW_FORMATS:
        pillow = _PILLOW_FORMATS[image_format]
    else:
        raise ValueError(f"unknown stored image format {image_format!r}; expected one of {sorted(_PILLOW_FORMATS)}")
    with Image.open(io.BytesIO(data), formats=[pillow]) as image:
        image.load()
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def decode_images(images: list[bytes], map_fn=map) -> torch.Tensor:
    """Stored images (any stored format) -> float tensor [B, 3, H, W] in [0, 1] (`map_fn`: e.g. a
    thread pool's map)."""
    return float_images(np.stack(list(map_fn(decode_stored, images))))


def float_images(arrays: np.ndarray) -> torch.Tensor:
    """Decoded uint8 images [B, H, W, 3] -> float tensor [B, 3, H, W] in [0, 1]."""
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255.0)


def image_resolution(manifest: Manifest, store: Store) -> int:
    """Side of the (square) ingested images, read from the first stored image."""
    for path in _files(manifest, store, "images"):
        parquet = pq.ParquetFile(path)
        if parquet.metadata.num_rows:
            first = next(parquet.iter_batches(batch_size=1, columns=["image"]))
            height, width, _ = decode_stored(first.column("image")[0].as_py()).shape
            if height != width:
                raise ValueError(f"ingest/{manifest.artifact_id} holds {width}x{height} images; tokenizers need square ones")
            return height
    raise ValueError(f"ingest/{manifest.artifact_id} has no images; ingest a non-empty source first")


@dataclass
class ImageBatch:
    """Decoded images [B, 3, H, W] in [0, 1] with their image ids and label ids."""

    image_ids: list[str]
    images: torch.Tensor
    label_ids: np.ndarray  # int64 [B]


def iter_decoded_images(
    manifest: Manifest,
    store: Store,
    batch_size: int,
    limit: int = 0,
    split: str | None = None,
    keep: Callable[[list[str]], np.ndarray] | None = None,
) -> Iterator[ImageBatch]:
    """The first `limit` images of a split (0 = all) in stored order, decoded; with `keep` (image
    ids -> bool mask), only the images it keeps, e.g. those that have a caption."""
    seen = 0
    for record in iter_image_batches(manifest, store, batch_size, split=split, columns=["image_id", "label_id", "image"]):
        image_ids = record.column("image_id").to_pylist()
        wanted = keep(image_ids) if keep is not None else np.ones(len(image_ids), bool)
        if limit:
            wanted &= np.cumsum(wanted) <= limit - seen
        if not wanted.any():
            if limit and seen >= limit:
                return
            continue
        indices = np.flatnonzero(wanted)
        pngs = record.column("image").to_pylist()
        yield ImageBatch(
            image_ids=[image_ids[i] for i in indices],
            images=decode_images([pngs[i] for i in indices]),
            label_ids=record.column("label_id").to_numpy().astype(np.int64)[indices],
        )
        seen += len(indices)
        if limit and seen >= limit:
            return


def class_names(manifest: Manifest, store: Store) -> list[str]:
    """Class names, index = label_id."""
    table = pads.dataset(_files(manifest, store, "classes"), schema=CLASSES_SCHEMA, format="parquet").to_table(
        columns=["label_id", "label_name"]
    )
    ids = table.column("label_id").to_pylist()
    names = table.column("label_name").to_pylist()
    if sorted(ids) != list(range(len(ids))):
        raise ValueError(f"classes table of ingest/{manifest.artifact_id} has label ids {sorted(ids)}, not 0..K-1")
    by_id = dict(zip(ids, names))
    return [by_id[index] for index in range(len(ids))]
