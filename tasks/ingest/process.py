"""One source item -> its id and a square PNG, or the reason it cannot be used.

A plain module-level function of picklable arguments, so a process pool can run it.
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
    encode_png,
    open_image,
    rasterize_svg,
    resize_square,
    to_rgb,
)
from tasks.ingest.sources.base import Item


@dataclass(frozen=True)
class Accepted:
    image_id: str
    png: bytes
    width: int
    height: int


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


def _read(path: str, max_bytes: int) -> bytes:
    """The file's bytes; a named pipe, socket or device (reading could block forever) and a file
    over `max_bytes` (reading it whole could exhaust memory) are rejected without being opened."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected("not-a-file", "a named pipe, socket or device, not a regular file")
        if info.st_size > max_bytes:
            raise ImageRejected("file-too-large", f"{info.st_size} bytes > ingest.max_file_bytes={max_bytes}")
        return Path(path).read_bytes()
    except OSError as error:
        raise ImageRejected("unreadable", f"{type(error).__name__}: {error}") from error


def _decode(item: Item, config: IngestConfig) -> tuple[str, np.ndarray, tuple[int, int]]:
    """(image_id, RGB pixels, original (width, height)) of an item."""
    if item.kind == "pixels":
        assert item.data is not None and item.shape is not None
        pixels = np.frombuffer(item.data, dtype=np.uint8).reshape(item.shape)
        rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)
        return hashlib.sha256(item.data).hexdigest(), rgb, (item.shape[1], item.shape[0])
    if item.kind == "hf":
        data = item.data if item.data is not None else _read(item.path or "", config.max_file_bytes)
        image = open_image(data, config.max_image_pixels)
        image_id = hashlib.sha256(np.asarray(image).tobytes()).hexdigest()
        return image_id, to_rgb(image), image.size
    if item.kind == "file":
        assert item.path is not None
        data = _read(item.path, config.max_file_bytes)
        image_id = hashlib.sha256(data).hexdigest()
        if item.path.lower().endswith(".svg"):
            if not config.source.rasterize_svg:
                raise ImageRejected("svg-not-rasterised", "SVG input (set ingest.source.rasterize_svg=true to use it)")
            # Render with twice the target resolution on the shorter side; LANCZOS does the rest.
            png, size = rasterize_svg(data, 2 * config.resolution, config.max_image_pixels)
            return image_id, decode_image(png, config.max_image_pixels), size
        rgb = decode_image(data, config.max_image_pixels)
        return image_id, rgb, (rgb.shape[1], rgb.shape[0])
    raise ValueError(f"unknown item kind {item.kind!r}")


def process_item(item: Item, config: IngestConfig) -> tuple[Item, Accepted | Rejected]:
    """The item (handed back so pool results stay paired with it) and its outcome."""
    # Pool results travel back pickled: drop the raw payload, the stage only needs metadata.
    slim = Item(item.source, item.label_id, item.caption, item.kind)
    if item.reject is not None:
        return slim, Rejected(*item.reject)
    try:
        image_id, rgb, (width, height) = _decode(item, config)
        png = encode_png(resize_square(rgb, config.resolution, config.fit))
    except ImageRejected as rejected:
        return slim, Rejected(rejected.reason, rejected.detail)
    except Exception as error:  # noqa: BLE001 - one odd file must never end a long ingest run
        return slim, Rejected("decode-error", f"{type(error).__name__}: {error}")
    return slim, Accepted(image_id, png, int(width), int(height))
