"""`embed_text.backend: sentence-transformers`: any sentence-transformers model (all-MiniLM-L6-v2 offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.embed_text.encoders.base import EncodedBatch, TextEncoder


class SentenceTransformerEncoder(TextEncoder):
    """Token embeddings and the model's own sentence embedding from a sentence-transformers model."""

    def __init__(self, path: Path, max_tokens: int, device: str):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        positions = getattr(getattr(getattr(self.model[0], "auto_model", None), "config", None), "max_position_embeddings", None)
        if positions is not None and max_tokens > positions:
            raise ValueError(f"embed_text.max_tokens={max_tokens} exceeds the {positions} positions of the model at {path}")
        # Truncation happens in the tokenizer, so the pooled embedding sees the same tokens.
        self.model.max_seq_length = max_tokens
        self.max_tokens = max_tokens

    def encode(self, texts: list[str]) -> EncodedBatch:
        outputs = self.model.encode(texts, batch_size=len(texts), output_value=None, show_progress_bar=False)
        first = outputs[0]["token_embeddings"]
        tokens = np.zeros((len(texts), self.max_tokens, first.shape[-1]), np.float32)
        mask = np.zeros((len(texts), self.max_tokens), bool)
        pooled = np.stack([out["sentence_embedding"].float().cpu().numpy() for out in outputs])
        for row, out in enumerate(outputs):
            keep = out["attention_mask"][: self.max_tokens].bool()
            real = out["token_embeddings"][: self.max_tokens][keep].float().cpu().numpy()
            # Real tokens first, whichever side the tokenizer padded.
            tokens[row, : len(real)] = real
            mask[row, : len(real)] = True
        return EncodedBatch(tokens, mask, pooled)
