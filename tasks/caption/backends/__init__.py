"""Caption backends, one module per `caption.backend`, and the table that names them."""

from __future__ import annotations

from tasks.caption.backends.base import CaptionBackend, CaptionResult, CaptionRun, caption_id, clean_caption
from tasks.caption.backends.dataset import DatasetCaptions
from tasks.caption.backends.gemini import GeminiCaptions
from tasks.caption.backends.label import LabelCaptions
from tasks.caption.backends.none import NoCaptions
from tasks.config import CaptionConfig

# The names are the values of CaptionConfig.backend (tasks/config.py), which must list the same.
BACKENDS: dict[str, type[CaptionBackend]] = {
    "none": NoCaptions,
    "dataset": DatasetCaptions,
    "label": LabelCaptions,
    "gemini": GeminiCaptions,
}


def open_backend(config: CaptionConfig) -> CaptionBackend:
    """The backend `config.backend` names, set up with the caption config."""
    if config.backend not in BACKENDS:
        raise ValueError(f"unknown caption.backend {config.backend!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[config.backend](config)


__all__ = ["BACKENDS", "CaptionBackend", "CaptionResult", "CaptionRun", "caption_id", "clean_caption", "open_backend"]
