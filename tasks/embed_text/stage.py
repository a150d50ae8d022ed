"""The `embed-text` stage: every caption (per image and per-class pool) -> text-encoder embeddings.

Embeddings come from the store-wide cache (`tasks/embed_text/cache.py`); only captions that
cache lacks are encoded, in shards written as they are done, so a second run over the same
captions, in any preset, encodes nothing and does not even load the encoder.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pyarrow as pa

from tasks.caption.read import load_caption_pool, load_captions
from tasks.config import EmbedTextConfig
from tasks.embed_text.cache import (
    CACHE_DIR,
    EmbeddingCache,
    embeddings_schema,
    embeddings_table,
    encoder_key,
    files_fingerprint,
    rows_per_shard,
)
from tasks.embed_text.encoders import check_backend, encoder_class, load_encoder, resolve_model
from tasks.stage import Stage, StageContext, StageOutput, fixed_inputs
from tasks.store import Manifest, Store, TableRecord
from tasks.tables import write_parquet_atomic

log = logging.getLogger("tok1d")

TABLE = "embeddings"


def captions_to_embed(manifest: Manifest, store: Store) -> dict[str, str]:
    """caption_id -> caption for every per-image caption and every pool caption, first seen first."""
    texts: dict[str, str] = {}
    captions = load_captions(manifest, store, columns=["caption_id", "caption"])
    for cid, caption in zip(captions["caption_id"].to_pylist(), captions["caption"].to_pylist()):
        texts.setdefault(cid, caption)
    for entries in load_caption_pool(manifest, store).values():
        for cid, caption in entries:
            texts.setdefault(cid, caption)
    return texts


class ShardWriter:
    """Writes tables as `<folder>/part-NNNNN.parquet`, coalescing small ones up to `rows` rows."""

    def __init__(self, folder: Path, rows: int):
        shutil.rmtree(folder, ignore_errors=True)  # an earlier, interrupted attempt
        folder.mkdir(parents=True)
        self.folder, self.rows = folder, rows
        self.pending: list[pa.Table] = []
        self.written = 0
        self.shards = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        if sum(t.num_rows for t in self.pending) >= self.rows:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        self.pending = []
        path = self.folder / f"part-{self.shards:05d}.parquet"
        write_parquet_atomic(table, path)
        self.written += table.num_rows
        self.shards += 1


def run_embed_text(ctx: StageContext) -> StageOutput:
    config: EmbedTextConfig = ctx.config
    folder = ctx.output_dir / TABLE
    if encoder_class(config.backend) is None:  # no text conditioning: nothing to embed
        schema = _write_empty(folder, config)
        summary = {"captions": 0, "embedded_new": 0, "reused": 0, "encoder": config.backend, "dim": 0, "max_tokens": config.max_tokens}
        return StageOutput(tables={TABLE: _record(schema, 0)}, summary=summary)

    texts = captions_to_embed(ctx.inputs["caption"], ctx.store)
    source = resolve_model(config.model)
    caches = ctx.store.root / CACHE_DIR
    revision = source.revision or files_fingerprint(source.path, caches / "file-hashes.json")
    key = encoder_key(config.backend, config.model, revision, config.max_tokens, config.dtype)
    encoder_id = f"{config.backend}:{config.model}@{revision.removeprefix('sha256:')[:12]}"
    cache = EmbeddingCache(
        caches / key,
        {"backend": config.backend, "model": config.model, "revision": revision, "max_tokens": config.max_tokens, "dtype": config.dtype},
    )
    present = cache.caption_ids()
    missing = [cid for cid in texts if cid not in present]
    log.info("embed-text: %d of %d captions already in the embedding cache %s", len(texts) - len(missing), len(texts), key)

    if missing:
        encoder = load_encoder(config.backend, source.path, config.max_tokens, ctx.device)
        pending: list[pa.Table] = []
        shard_rows = None
        with ctx.progress(len(missing), "text embeddings", unit="caption") as progress:
            for start in range(0, len(missing), config.batch_size):
                ids = missing[start : start + config.batch_size]
                batch = encoder.encode([texts[cid] for cid in ids])
                pending.append(embeddings_table(ids, [texts[cid] for cid in ids], batch, config.dtype, encoder_id))
                if shard_rows is None:
                    shard_rows = rows_per_shard(config.max_tokens, batch.tokens.shape[2], config.dtype, config.batch_size)
                if sum(t.num_rows for t in pending) >= shard_rows:
                    cache.append(pa.concat_tables(pending))  # a kill loses at most this shard's work
                    pending = []
                progress.update(len(ids))
        if pending:
            cache.append(pa.concat_tables(pending))

    writer: ShardWriter | None = None
    schema = None
    for table in cache.select(set(texts)):
        if writer is None:
            schema = table.schema
            dim = schema.field("tokens").type.value_type.list_size
            writer = ShardWriter(folder, rows_per_shard(config.max_tokens, dim, config.dtype, config.batch_size))
        writer.add(table)
    if writer is None:  # no captions at all
        schema = _write_empty(folder, config)
        written = 0
    else:
        writer.flush()
        written = writer.written
    if written != len(texts):
        raise RuntimeError(
            f"embed-text: the cache {cache.directory} yielded {written} of {len(texts)} captions; "
            f"it was changed during the run — run the stage again"
        )
    dim = schema.field("tokens").type.value_type.list_size
    summary = {
        "captions": len(texts),
        "embedded_new": len(missing),
        "reused": len(texts) - len(missing),
        "encoder": encoder_id,
        "encoder_key": key,
        "dim": dim,
        "max_tokens": config.max_tokens,
        "dtype": config.dtype,
    }
    return StageOutput(tables={TABLE: _record(schema, written)}, summary=summary)


def _write_empty(folder: Path, config: EmbedTextConfig) -> pa.Schema:
    """A table with no rows (and, knowing no encoder, width 0) that readers still accept."""
    schema = embeddings_schema(config.max_tokens, 0, 0, config.dtype)
    writer = ShardWriter(folder, 1)
    writer.add(schema.empty_table())
    writer.flush()
    return schema


def _record(schema: pa.Schema, rows: int) -> TableRecord:
    return TableRecord(glob=f"{TABLE}/*.parquet", rows=rows, columns={field.name: str(field.type) for field in schema})


STAGE = Stage(
    name="embed-text",
    description="Per-token and pooled text-encoder embeddings of every caption (store-wide cache)",
    config=EmbedTextConfig,
    inputs=fixed_inputs("caption"),
    check=check_backend,
    run=run_embed_text,
)
