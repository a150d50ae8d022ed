"""What every image source hands the ingest stage: a fixed-order, sliceable list of items."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Literal


class SourceError(RuntimeError):
    """A source that cannot be read at all (missing folder, corrupt dataset file, no network)."""


@dataclass(frozen=True)
class Item:
    """One input image, cheap to pickle: the pixels are read by whoever processes it.

    kind:
      "file"   `path` is an image file (or .svg), or with `span` (offset, length) a byte range
               of it (a tar member, named by `source`); its id is the sha256 of those bytes.
      "pixels" `data` is a raw uint8 buffer of `shape`: (H, W) grey (idx files) or (H, W, 3)
               RGB (procedural shapes); id = sha256 of it.
      "hf"     `data` holds encoded image bytes (or `path` a file) from a Hugging Face
               dataset; id = sha256 of the decoded pixel buffer, so Hugging Face's copy of
               Fashion-MNIST gets the same ids as the idx files.
    """

    source: str
    label_id: int | None
    caption: str | None
    kind: Literal["file", "pixels", "hf"]
    path: str | None = None
    data: bytes | None = None
    shape: tuple[int, ...] | None = None
    span: tuple[int, int] | None = None
    # Set when the item is known to be unusable before reading it: (reason, detail).
    reject: tuple[str, str] | None = None


class Source(ABC):
    """An image source in a deterministic order; `items(a, b)` yields items a..b-1 of it."""

    #: class names, index = label_id
    classes: list[str]
    #: human-readable origin for the stage summary (e.g. the folder path)
    description: str

    def __init__(self, total: int, max_images: int | None):
        if max_images is not None and max_images < 0:
            raise ValueError(f"ingest.source.max_images must be >= 0, got {max_images}")
        self._length = total if max_images is None else min(total, max_images)

    def __len__(self) -> int:
        return self._length

    def items(self, start: int, stop: int) -> Iterator[Item]:
        stop = min(stop, len(self))
        if start >= stop:
            return iter(())
        return self._items(start, stop)

    @abstractmethod
    def _items(self, start: int, stop: int) -> Iterator[Item]: ...
