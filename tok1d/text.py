"""Captions -> the text tokens a TexTok tokenizer (or a text-conditioned generator) was trained on:
embedded by the same encoder as the run's embed-text stage (tasks/embed_text/encoders), padded
to the same number of tokens and rounded to the stored precision (embed_text.dtype)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tasks.embed_text.cache import files_fingerprint
from tasks.embed_text.encoders import TextEncoder, load_encoder, resolve_model
from tasks.export.spec import TextSpec


class CaptionEmbedder:
    """The text encoder of a `TextSpec`, loaded on first use and checked to be the model the
    tokenizer was trained with (same revision or, for a local folder, the same file hashes)."""

    def __init__(self, spec: TextSpec, device: str | torch.device = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self._encoder: TextEncoder | None = None

    def _load(self) -> TextEncoder:
        spec = self.spec
        if spec.backend is None or spec.model is None:
            raise ValueError(f"this tokenizer's captions were embedded by {spec.encoder!r}, which names no "
                             "embed_text backend and model: captions cannot be embedded for it")
        source = resolve_model(spec.model)
        if source.revision is not None:
            revision = source.revision
        else:
            # A local folder: the embed-text stage names it by the hash of its files.
            with tempfile.TemporaryDirectory() as memo:
                revision = files_fingerprint(source.path, Path(memo) / "file-hashes.json")
        recorded = spec.encoder.rsplit("@", 1)[-1]
        if not revision.removeprefix("sha256:").startswith(recorded):
            raise ValueError(f"embed_text.model {spec.model!r} resolves to {source.path} at revision "
                             f"{revision.removeprefix('sha256:')[:12]}, but the tokenizer was trained on embeddings of "
                             f"{spec.encoder}; give it that model's files")
        return load_encoder(spec.backend, source.path, spec.max_tokens, str(self.device))

    def embed(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens float32 [B, T, D], mask bool [B, T]) on the embedder's device."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("captions: expected a list of strings, one per image")
        if self._encoder is None:
            self._encoder = self._load()
        batch = self._encoder.encode(list(captions))
        if batch.tokens.shape[2] != self.spec.dim:
            raise ValueError(f"the text encoder gives {batch.tokens.shape[2]}-d tokens; the tokenizer expects {self.spec.dim}")
        # The embed-text table stores `dtype`; the trainer read the rounded values back as float32.
        tokens = batch.tokens.astype(self.spec.dtype).astype(np.float32)
        return torch.from_numpy(tokens).to(self.device), torch.from_numpy(batch.mask).to(self.device)
