"""`caption.backend: dataset`: the caption that ships with each image (ingest's `source_caption`).

A pure function of the ingest rows, so it is recomputed on every run (instantly) rather than
cached: a cache could only go stale when a source's captions change.
"""

from __future__ import annotations

import pyarrow as pa

from tasks.caption.backends.base import CaptionBackend, CaptionResult, CaptionRun, clean_caption
from tasks.caption.images import IngestImages
from tasks.stage import StageContext


def dataset_captions(images: pa.Table) -> list[CaptionResult]:
    """Each image's cleaned source caption; an image without one (or a blank one) is a failure."""
    results = []
    for image_id, source in zip(images["image_id"].to_pylist(), images["source_caption"].to_pylist()):
        caption = clean_caption(source)
        if caption:
            results.append(CaptionResult(image_id, caption, "dataset"))
        else:
            results.append(
                CaptionResult(image_id, None, "dataset", "no-source-caption", "the source has no caption for this image")
            )
    return results


class DatasetCaptions(CaptionBackend):
    """Source captions; the pool holds those of some validation images per class (the default pool)."""

    def caption(self, ctx: StageContext, images: IngestImages) -> CaptionRun:
        return CaptionRun(dataset_captions(images.meta))
