"""Caption backends that need no service: captions shipped with the data, and class-name templates.

Both are pure functions of the ingest rows, so they are recomputed on every run (instantly)
rather than cached: a cache could only go stale when a source's captions or class names change.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from string import Formatter

import pyarrow as pa


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


def caption_id(caption: str) -> str:
    """Captions are identified by the sha256 of their text, so equal captions share embeddings."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def clean_caption(text: str | None) -> str:
    """One line, single spaces, without surrounding quotes."""
    if text is None:
        return ""
    return " ".join(text.split()).strip("\"'` ")


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


def dataset_captions(images: pa.Table) -> list[CaptionResult]:
    """The caption that ships with each image (ingest's `source_caption`)."""
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
