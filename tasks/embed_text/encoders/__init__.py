"""Text encoders, one module per `embed_text.backend`, and the table that names them."""

from __future__ import annotations

from pathlib import Path

from tasks.embed_text.encoders.base import EncodedBatch, TextEncoder
from tasks.embed_text.encoders.model_source import PACKAGED_MINILM, ModelSource, resolve_model
from tasks.embed_text.encoders.sentence_transformer import SentenceTransformerEncoder
from tasks.embed_text.encoders.t5 import T5TextEncoder

# `embed_text.backend` names one of these (checked when the config loads).
# None: no text conditioning; the stage embeds nothing and writes an empty table.
ENCODERS: dict[str, type[TextEncoder] | None] = {
    "none": None,
    "sentence-transformers": SentenceTransformerEncoder,
    "t5": T5TextEncoder,
}


def encoder_class(backend: str) -> type[TextEncoder] | None:
    """The encoder `embed_text.backend` names; None for a backend that embeds nothing."""
    if backend not in ENCODERS:
        raise ValueError(f"embed_text.backend: unknown backend {backend!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[backend]


def check_backend(config) -> None:
    """A clear error for an `embed_text.backend` that is not in the table (config: EmbedTextConfig)."""
    encoder_class(config.backend)


def load_encoder(backend: str, path: Path, max_tokens: int, device: str) -> TextEncoder:
    """The named encoder with its model loaded from `path` (a folder that `resolve_model` found)."""
    cls = encoder_class(backend)
    if cls is None:
        raise ValueError(f"embed_text.backend {backend!r} has no encoder to load")
    return cls(path, max_tokens, device)


__all__ = [
    "ENCODERS",
    "PACKAGED_MINILM",
    "EncodedBatch",
    "ModelSource",
    "SentenceTransformerEncoder",
    "T5TextEncoder",
    "TextEncoder",
    "encoder_class",
    "load_encoder",
    "resolve_model",
]
