"""What every caption backend is: the `CaptionBackend` interface, and the results it hands the stage.

A backend turns the ingest images into one `CaptionResult` per image it captioned or failed,
and says which captions form the per-class pool. The stage does the rest (output tables,
summary, completeness) the same way for every backend.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import pyarrow as pa

from tasks.caption.images import VAL_SPLIT, IngestImages
from tasks.config import CaptionConfig
from tasks.stage import StageContext


@dataclass(frozen=True)
class CaptionResult:
    """The outcome of captioning one image: a caption, or the reason there is none."""

    image_id: str
    caption: str | None
    origin: str
    reason: str | None = None
    detail: str = ""
    # Requests sent for this image (0 for backends that send none).
    attempts: int = 0
    # The caption was cut to the configured word limit.
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.caption is not None


@dataclass
class CaptionRun:
    """What one run of a backend produced: results, and the request counts the summary reports."""

    results: list[CaptionResult] = field(default_factory=list)
    requests: int = 0
    retries: int = 0
    truncated: int = 0
    # Further counts for the summary, by name (the Gemini batch path: jobs submitted, resumed...).
    details: dict[str, int] = field(default_factory=dict)


def caption_id(caption: str) -> str:
    """Captions are identified by the sha256 of their text, so equal captions share embeddings."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def clean_caption(text: str | None) -> str:
    """One line, single spaces, without surrounding quotes."""
    if text is None:
        return ""
    return " ".join(text.split()).strip("\"'` ")


def pool_from_captions(captions: pa.Table, images: pa.Table, per_class: int) -> list[dict]:
    """Captions of up to `per_class` validation images per class, in ingest order."""
    names = dict(zip(images["label_id"].to_pylist(), images["label_name"].to_pylist()))
    pool: dict[int, dict[str, dict]] = {}
    for row in captions.to_pylist():
        label_id = row["label_id"]
        if row["split"] != VAL_SPLIT or label_id is None:
            continue
        entries = pool.setdefault(label_id, {})
        if len(entries) < per_class and row["caption_id"] not in entries:
            entries[row["caption_id"]] = {
                "label_id": label_id,
                "label_name": names.get(label_id),
                "caption_id": row["caption_id"],
                "caption": row["caption"],
                "origin": row["origin"],
            }
    return [entry for label_id in sorted(pool) for entry in pool[label_id].values()]


class CaptionBackend(ABC):
    """One `caption.backend`: captions for the ingest images, and the per-class caption pool."""

    #: False for a backend that captions nothing on purpose: its uncaptioned images are then
    #: not pending (the output is complete) and an empty pool is no cause for a warning.
    captions_images: ClassVar[bool] = True

    def __init__(self, config: CaptionConfig):
        self.config = config

    @abstractmethod
    def caption(self, ctx: StageContext, images: IngestImages) -> CaptionRun:
        """A result for every image the backend captioned or failed to; images it leaves out are pending."""

    def pool(self, images: IngestImages, captions: pa.Table) -> list[dict]:
        """Rows of the `caption_pool` table; by default the captions of some validation images per class."""
        return pool_from_captions(captions, images.meta, self.config.pool_per_class)
