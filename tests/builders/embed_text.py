"""Embed-text artifacts from embeddings in memory, written with the stage's table builder and shard writer."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from builders.store import commit_folder, work_folder
from tasks.embed_text.cache import embeddings_table
from tasks.embed_text.encoders import EncodedBatch
from tasks.embed_text.stage import TABLE, ShardWriter
from tasks.store import Manifest, Store, TableRecord


def random_batch(count: int, max_tokens: int, dim: int, seed: int, min_tokens: int = 1) -> EncodedBatch:
    """Random float32 encoder output: caption i has between min_tokens and max_tokens real tokens
    (real ones first, zero padding), random token and pooled values."""
    rng = np.random.default_rng(seed)
    mask = np.arange(max_tokens)[None] < rng.integers(min_tokens, max_tokens + 1, (count, 1))
    tokens = rng.normal(size=(count, max_tokens, dim)).astype(np.float32) * mask[..., None]
    return EncodedBatch(tokens, mask, rng.normal(size=(count, dim)).astype(np.float32))


def embed_artifact(store: Store, caption_ids: Sequence[str], captions: Sequence[str], batch: EncodedBatch,
                   dtype: str = "float32", encoder: str = "test") -> Manifest:
    """An embed-text artifact holding row i of `batch` for caption caption_ids[i] (text captions[i])."""
    table = embeddings_table(list(caption_ids), list(captions), batch, dtype, encoder)
    folder = work_folder(store)
    writer = ShardWriter(folder / TABLE, max(1, table.num_rows))
    writer.add(table)
    writer.flush()
    record = TableRecord(glob=f"{TABLE}/*.parquet", rows=table.num_rows,
                         columns={field.name: str(field.type) for field in table.schema})
    _, max_tokens, dim = batch.tokens.shape
    return commit_folder(store, "embed-text", folder, {TABLE: record},
                         {"captions": table.num_rows, "encoder": encoder, "dim": dim, "max_tokens": max_tokens})
