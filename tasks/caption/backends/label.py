"""`caption.backend: label`: class names filled into templates ("a photo of a {label}").

A pure function of the ingest rows and the templates, so it is recomputed on every run
(instantly) rather than cached: a cache could only go stale when class names change.
"""

from __future__ import annotations

import hashlib
from string import Formatter

import pyarrow as pa

from tasks.caption.backends.base import CaptionBackend, CaptionResult, CaptionRun, caption_id, clean_caption
from tasks.caption.images import IngestImages
from tasks.stage import StageContext


def check_templates(templates: list[str]) -> None:
    """Every template must hold exactly the `{label}` placeholder (and no other)."""
    if not templates:
        raise ValueError("caption.templates is empty: give at least one template such as 'a photo of a {label}'")
    for template in templates:
        try:
            fields = {name for _, name, _, _ in Formatter().parse(template) if name is not None}
        except ValueError as error:
            raise ValueError(f"caption.templates: {template!r} is not a valid format string ({error})") from None
        if fields != {"label"}:
            raise ValueError(
                f"caption.templates: {template!r} must contain the placeholder {{label}} and no other "
                f"(found {sorted(fields) or 'none'})"
            )


def template_index(image_id: str, count: int) -> int:
    """The template an image gets: deterministic, spread evenly over the templates."""
    return int(hashlib.sha256(image_id.encode("utf-8")).hexdigest(), 16) % count


def label_captions(images: pa.Table, templates: list[str]) -> list[CaptionResult]:
    """One template-filled class name per image; images without a class name are failures."""
    check_templates(templates)
    results = []
    for image_id, label_name in zip(images["image_id"].to_pylist(), images["label_name"].to_pylist()):
        if label_name is None or not str(label_name).strip():
            results.append(CaptionResult(image_id, None, "label", "no-label", "the image has no class name"))
            continue
        index = template_index(image_id, len(templates))
        caption = clean_caption(templates[index].format(label=label_name))
        results.append(CaptionResult(image_id, caption, f"label:{index}"))
    return results


def label_pool(classes: list[tuple[int, str]], templates: list[str]) -> list[dict]:
    """Every template for every class: the pool class-conditional generation samples from."""
    check_templates(templates)
    rows = []
    for label_id, label_name in classes:
        for index, template in enumerate(templates):
            caption = clean_caption(template.format(label=label_name))
            rows.append(
                {
                    "label_id": label_id,
                    "label_name": label_name,
                    "caption_id": caption_id(caption),
                    "caption": caption,
                    "origin": f"label:{index}",
                }
            )
    return rows


class LabelCaptions(CaptionBackend):
    """Template captions; the pool is every template for every class, also classes without images."""

    def caption(self, ctx: StageContext, images: IngestImages) -> CaptionRun:
        return CaptionRun(label_captions(images.meta, self.config.templates))

    def pool(self, images: IngestImages, captions: pa.Table) -> list[dict]:
        return label_pool(images.classes(), self.config.templates)
