"""Image sources for the ingest stage, one module per `ingest.source.kind`."""

from __future__ import annotations

from tasks.config import SourceConfig
from tasks.ingest.sources.base import Item, Source, SourceError
from tasks.ingest.sources.fashion_mnist import open_fashion_mnist
from tasks.ingest.sources.folder import open_folder
from tasks.ingest.sources.huggingface import open_huggingface
from tasks.ingest.sources.shapes import open_shapes
from tasks.ingest.sources.tuxpaint import open_tuxpaint
from tasks.ingest.sources.webdataset import open_webdataset

_OPENERS = {
    "fashion-mnist": open_fashion_mnist,
    "tuxpaint": open_tuxpaint,
    "folder": open_folder,
    "huggingface": open_huggingface,
    "shapes": open_shapes,
    "webdataset": open_webdataset,
}


def check_source(config: SourceConfig) -> None:
    """A clear error for an `ingest.source.kind` that is not in the table."""
    if config.kind not in _OPENERS:
        raise ValueError(f"ingest.source.kind: unknown source {config.kind!r}; known: {sorted(_OPENERS)}")


def open_source(config: SourceConfig) -> Source:
    """The configured source, its items listed in a fixed order (first `max_images` of them)."""
    if config.kind not in _OPENERS:  # loading the config checks this first (check_source)
        raise SourceError(f"unknown ingest.source.kind {config.kind!r}; known: {sorted(_OPENERS)}")
    return _OPENERS[config.kind](config)


__all__ = ["Item", "Source", "SourceError", "check_source", "open_source"]
