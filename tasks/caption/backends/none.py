"""`caption.backend: none`: no captions at all, for tokenizers and generators without text."""

from __future__ import annotations

import pyarrow as pa

from tasks.caption.backends.base import CaptionBackend, CaptionRun
from tasks.caption.images import IngestImages
from tasks.stage import StageContext


class NoCaptions(CaptionBackend):
    """Captions nothing and pools nothing; its empty tables are a complete output, not a pending one."""

    captions_images = False

    def caption(self, ctx: StageContext, images: IngestImages) -> CaptionRun:
        return CaptionRun()

    def pool(self, images: IngestImages, captions: pa.Table) -> list[dict]:
        return []
