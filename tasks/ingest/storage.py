"""The stored encoding of an ingested image (`ingest.storage`): the source's own bytes, or the
square image encoded as PNG, JPEG or WebP. The images table records the format of every row
(`image_format`) and whether the bytes are the source file's (`kept_source`);
`tasks.ingest.read.decode_stored` decodes by it.

Keeping the source bytes needs no transform at all: the file is a PNG, JPEG or WebP that decodes
(one frame, mode RGB, no transparency, no EXIF rotation) to exactly resolution x resolution.
Then the reader's decode gives the very pixels a PNG of the processed image would hold, since
Pillow's resize to the same size is a copy.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from tasks.config import StorageConfig
from tasks.ingest.images import SourceInfo

# Stored formats, as recorded in the images table; the reader decodes exactly these.
FORMATS = ("png", "jpeg", "webp")
_PILLOW_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_KEEPABLE = {pillow: name for name, pillow in _PILLOW_NAMES.items()}


@dataclass(frozen=True)
class Source:
    """The encoded bytes an image was decoded from, and what they were."""

    data: bytes
    info: SourceInfo


@dataclass(frozen=True)
class Stored:
    """An image's stored bytes, their format (one of FORMATS) and whether they are the source's."""

    data: bytes
    format: str
    kept_source: bool


def keepable(source: Source | None, rgb: np.ndarray, resolution: int) -> str | None:
    """The stored format name of the source bytes if they can be stored as they are, else None."""
    if source is None or not source.info.as_is or rgb.shape[:2] != (resolution, resolution):
        return None
    return _KEEPABLE.get(source.info.format or "")


def _lossy(source: Source | None) -> bool:
    """A JPEG, or a WebP whose image chunk is lossy VP8 (not VP8L or an extended container)."""
    if source is None:
        return False
    return source.info.format == "JPEG" or (source.info.format == "WEBP" and source.data[12:16] == b"VP8 ")


def codec_for(config: StorageConfig, source: Source | None) -> str:
    """The codec that encodes an image that needs a transform (or whose bytes cannot be kept)."""
    if config.policy in FORMATS:
        return config.policy
    if config.policy == "auto" and _lossy(source):
        return "jpeg"
    return "png"


def encode(image: Image.Image, codec: str, quality: int) -> bytes:
    """PNG (lossless, zlib level 6), JPEG (4:2:0, baseline) or lossy WebP at `quality`."""
    buffer = io.BytesIO()
    if codec == "png":
        image.save(buffer, format="PNG")
    elif codec == "jpeg":
        image.save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
    elif codec == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown storage codec {codec!r}; expected one of {FORMATS}")
    return buffer.getvalue()


def store(rgb: np.ndarray, square: Callable[[], Image.Image], source: Source | None, config: StorageConfig,
          resolution: int) -> Stored:
    """The stored bytes of an image: the source's where the policy allows and nothing would change
    them, else `square()` (the resized image, only built when needed) encoded."""
    if config.policy in ("auto", "source"):
        kept = keepable(source, rgb, resolution)
        if kept is not None:
            assert source is not None
            return Stored(source.data, kept, True)
    codec = codec_for(config, source)
    return Stored(encode(square(), codec, config.quality), codec, False)
