"""Caption backends, one module per `caption.backend`, and the table that names them."""

from __future__ import annotations

from tasks.caption.backends.base import CaptionBackend, CaptionResult, CaptionRun, caption_id, clean_caption
from tasks.caption.backends.dataset import DatasetCaptions
from tasks.caption.backends.gemini import GeminiCaptions
from tasks.caption.backends.label import LabelCaptions
from tasks.caption.backends.none import NoCaptions
from tasks.config import CaptionConfig

# `caption.backend` names one of these (checked when the config loads).
BACKENDS: dict[str, type[CaptionBackend]] = {
    "none": NoCaptions,
    "dataset": DatasetCaptions,
    "label": LabelCaptions,
    "gemini": GeminiCaptions,
}


def check_backend(config: CaptionConfig) -> None:
    """A clear error for a `caption.backend` that is not in the table."""
    if config.backend not in BACKENDS:
        raise ValueError(f"caption.backend: unknown backend {config.backend!r}; known: {sorted(BACKENDS)}")


def open_backend(config: CaptionConfig) -> CaptionBackend:
    """The backend `config.backend` names, set up with the caption config."""
    check_backend(config)
    return BACKENDS[config.backend](config)


__all__ = ["BACKENDS", "check_backend", "CaptionBackend", "CaptionResult", "CaptionRun", "caption_id", "clean_caption", "open_backend"]
