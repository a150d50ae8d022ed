"""One source item -> its id and its stored square image (tasks/ingest/storage.py), or the
reason it cannot be used.

Plain module-level functions of picklable arguments, so a process pool can run them.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.config import IngestConfig
from tasks.ingest.images import (
    ImageRejected,
    decode_image,
    decode_image_info,
    open_image_info,
    rasterize_svg,
    resize_square,
    to_rgb,
)
from tasks.ingest.sources.base import Item
from tasks.ingest.storage import Source, store


@dataclass(frozen=True)
class Accepted:
    """An item's id, stored bytes (format: tasks.ingest.storage.FORMATS) and original size."""

    image_id: str
    data: bytes
    format: str
    kept_source: bool
    width: int
    height: int


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


def _read(path: str, max_bytes: int, span: tuple[int, int] | None = None) -> bytes:
    """The file's bytes (or the `span` (offset, length) of it, e.g. a tar member); a named pipe,
    socket or device (reading could block forever) and more than `max_bytes` (reading it whole
    could exhaust memory) are rejected without being opened."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected("not-a-file", "a named pipe, socket or device, not a regular file")
        size = info.st_size if span is None else span[1]
        if size > max_bytes:
            raise ImageRejected("file-too-large", f"{size} bytes > ingest.max_file_bytes={max_bytes}")
        if span is None:
            return Path(path).read_bytes()
        with open(path, "rb") as file:
            file.seek(span[0])
            data = file.read(span[1])
        if len(data) != span[1]:
            raise ImageRejected("truncated", f"{path} ends {span[1] - len(data)} bytes before the member does")
        return data
    except OSError as error:
        raise ImageRejected("unreadable", f"{type(error).__name__}: {error}") from error


def _decode(item: Item, config: IngestConfig) -> tuple[str, np.ndarray, tuple[int, int], Source | None]:
    """(image_id, RGB pixels, original (width, height), the encoded source if any) of an item."""
    if item.kind == "pixels":
        assert item.data is not None and item.shape is not None
        pixels = np.frombuffer(item.data, dtype=np.uint8).reshape(item.shape)
        rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)
        return hashlib.sha256(item.data).hexdigest(), rgb, (item.shape[1], item.shape[0]), None
    if item.kind == "hf":
        data = item.data if item.data is not None else _read(item.path or "", config.max_file_bytes)
        image, info = open_image_info(data, config.max_image_pixels)
        image_id = hashlib.sha256(np.asarray(image).tobytes()).hexdigest()
        return image_id, to_rgb(image), image.size, Source(data, info)
    if item.kind == "file":
        assert item.path is not None
        data = _read(item.path, config.max_file_bytes, item.span)
        image_id = hashlib.sha256(data).hexdigest()
        # A tar member's name is in `source` (its path is the shard's).
        if (item.source if item.span else item.path).lower().endswith(".svg"):
            if not config.source.rasterize_svg:
                raise ImageRejected("svg-not-rasterised", "SVG input (set ingest.source.rasterize_svg=true to use it)")
            # Render with twice the target resolution on the shorter side; LANCZOS does the rest.
            png, size = rasterize_svg(data, 2 * config.resolution, config.max_image_pixels)
            return image_id, decode_image(png, config.max_image_pixels), size, None
        rgb, info = decode_image_info(data, config.max_image_pixels)
        return image_id, rgb, (rgb.shape[1], rgb.shape[0]), Source(data, info)
    raise ValueError(f"unknown item kind {item.kind!r}")


def process_item(item: Item, config: IngestConfig) -> tuple[Item, Accepted | Rejected]:
    """The item (handed back so pool results stay paired with it) and its outcome."""
    # Pool results travel back pickled: drop the raw payload, the stage only needs metadata.
    slim = Item(item.source, item.label_id, item.caption, item.kind)
    if item.reject is not None:
        return slim, Rejected(*item.reject)
    try:
        image_id, rgb, (width, height), source = _decode(item, config)
        stored = store(rgb, lambda: resize_square(rgb, config.resolution, config.fit), source, config.storage,
                       config.resolution)
    except ImageRejected as rejected:
        return slim, Rejected(rejected.reason, rejected.detail)
    except Exception as error:  # noqa: BLE001 - one odd file must never end a long ingest run
        return slim, Rejected("decode-error", f"{type(error).__name__}: {error}")
    return slim, Accepted(image_id, stored.data, stored.format, stored.kept_source, int(width), int(height))


def process_items(items: list[Item], config: IngestConfig) -> list[tuple[Item, Accepted | Rejected]]:
    """`process_item` over a chunk: the unit a pool worker gets, so one message carries many items."""
    return [process_item(item, config) for item in items]
