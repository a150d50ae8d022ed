"""What every text encoder is: captions -> per-token embeddings [T, D] with a mask, and a pooled embedding.

TexTok conditions its tokenizer on the per-token embeddings of a frozen text encoder (T5-XL,
128 tokens, in the paper); the pooled embedding serves class/caption-level uses. Every encoder
pads or truncates to exactly `max_tokens` positions, with zeros at padded positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class EncodedBatch:
    """Float32 arrays: tokens [B, T, D] (zero where masked), mask [B, T], pooled [B, P]."""

    tokens: np.ndarray
    mask: np.ndarray
    pooled: np.ndarray


class TextEncoder(ABC):
    """One `embed_text.backend`: loads a model from a local folder, then encodes batches of captions.

    The constructor gets the model folder (already resolved, see `model_source.py`), the number
    of token positions and the torch device; it must read nothing from the network.
    """

    @abstractmethod
    def __init__(self, path: Path, max_tokens: int, device: str): ...

    @abstractmethod
    def encode(self, texts: list[str]) -> EncodedBatch:
        """Embeddings of `texts`, real tokens first in each row, `max_tokens` positions wide."""
