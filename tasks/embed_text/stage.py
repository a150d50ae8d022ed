"""The `embed-text` stage: every caption (per image and per-class pool) -> text-encoder embeddings.

Embeddings come from the store-wide cache (`tasks/embed_text/cache.py`); only captions that
cache lacks are encoded, so a second run over the same captions, in any preset, encodes nothing
and does not even load the encoder.

The captions (in caption-artifact order) are cut into fixed shards of `embed_text.shard_rows`;
each shard is one task of the fan-out (tasks/shards.py: in this process, or on Ray with
`runtime.task_runner: ray`) that encodes what the cache lacks, adds it to the cache and writes
`embeddings/part-NNNNN.parquet`: its captions' rows in caption order, so the artifact does not
depend on where or in which order the shards ran. A killed run resumes with the missing parts.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.caption.read import load_caption_pool, load_captions
from tasks.config import EmbedTextConfig
from tasks.embed_text.cache import (
    CACHE_DIR,
    EmbeddingCache,
    embeddings_schema,
    embeddings_table,
    encoder_key,
    files_fingerprint,
)
from tasks.embed_text.encoders import TextEncoder, check_backend, encoder_class, load_encoder, resolve_model
from tasks.shards import ShardResult, fan_out, shard_done
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


@dataclass(frozen=True)
class CaptionShard:
    """Captions [start, start + len) of the stage's caption list, and the cache files holding
    those of them the cache already has (file -> their ids): fixed by the caption artifact,
    `embed_text.shard_rows` and the cache's contents when the run starts."""

    index: int
    caption_ids: tuple[str, ...]
    captions: tuple[str, ...]
    cached: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"


# One loaded encoder per process: a Ray worker loads it once for all the shards it is given.
_ENCODERS: dict[tuple, TextEncoder] = {}


def _encoder(backend: str, path: Path, max_tokens: int, device: str) -> TextEncoder:
    key = (backend, str(path), max_tokens, device)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = load_encoder(backend, path, max_tokens, device)
    return _ENCODERS[key]


@dataclass(frozen=True)
class EmbedShard:
    """Embed one shard's captions (cached rows + newly encoded ones) into its output part; the
    new rows go to the store-wide cache first. Picklable, so it runs on a Ray worker too."""

    config: EmbedTextConfig
    model_path: str
    cache_dir: str
    cache_description: dict
    encoder_id: str
    out_dir: str
    device: str

    def __call__(self, shard: CaptionShard) -> ShardResult:
        path = Path(self.out_dir) / f"{shard.name}.parquet"
        if shard_done(path):
            return ShardResult(shard.name, len(shard.caption_ids), 0, False)
        config = self.config
        rows = [_cached_rows(Path(file), set(ids)) for file, ids in shard.cached]
        have = {cid for table in rows for cid in table["caption_id"].to_pylist()}
        missing = [(cid, text) for cid, text in zip(shard.caption_ids, shard.captions) if cid not in have]
        if missing:
            encoder = _encoder(config.backend, Path(self.model_path), config.max_tokens, self.device)
            new = []
            for start in range(0, len(missing), config.batch_size):
                ids, texts = zip(*missing[start : start + config.batch_size])
                new.append(embeddings_table(list(ids), list(texts), encoder.encode(list(texts)), config.dtype,
                                            self.encoder_id))
            # Into the store-wide cache before the part: a kill after this loses no encoding.
            EmbeddingCache(Path(self.cache_dir), self.cache_description).append(pa.concat_tables(new))
            rows += new
        table = pa.concat_tables(rows)
        position = {cid: row for row, cid in enumerate(table["caption_id"].to_pylist())}
        table = table.take(pa.array([position[cid] for cid in shard.caption_ids], pa.int64()))
        write_parquet_atomic(table, path)
        log.info("embed-text: computed shard %s (%d captions encoded)", shard.name, len(missing))
        return ShardResult(shard.name, table.num_rows, len(missing), True)


def _cached_rows(path: Path, wanted: set[str]) -> pa.Table:
    """The first row of each wanted caption in one cache file."""
    table = pq.read_table(path)
    table = table.filter(pc.is_in(table["caption_id"], pa.array(sorted(wanted), pa.string())))
    seen: set[str] = set()
    keep = [not (cid in seen or seen.add(cid)) for cid in table["caption_id"].to_pylist()]
    return table.filter(pa.array(keep, pa.bool_()))


def plan_caption_shards(texts: dict[str, str], cache: EmbeddingCache, shard_rows: int) -> list[CaptionShard]:
    """Fixed shards of `shard_rows` captions, each told which cache file holds which of its captions
    (the first file in the cache's order, as `EmbeddingCache.select` would pick)."""
    if shard_rows < 1:
        raise ValueError(f"embed_text.shard_rows must be >= 1, got {shard_rows}")
    home: dict[str, str] = {}
    for path in cache.files():
        try:
            ids = pq.read_table(path, columns=["caption_id"])["caption_id"].to_pylist()
        except (OSError, pa.ArrowInvalid) as error:  # renamed into place whole: outside damage
            log.warning("text-embedding cache: skipping unreadable shard %s (%s)", path, error)
            continue
        for cid in ids:
            home.setdefault(cid, str(path))
    ids, shards = list(texts), []
    for index, start in enumerate(range(0, len(ids), shard_rows)):
        chunk = ids[start : start + shard_rows]
        files: dict[str, list[str]] = {}
        for cid in chunk:
            if cid in home:
                files.setdefault(home[cid], []).append(cid)
        cached = tuple((file, tuple(found)) for file, found in sorted(files.items()))
        shards.append(CaptionShard(index, tuple(chunk), tuple(texts[c] for c in chunk), cached))
    return shards


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
    description = {"backend": config.backend, "model": config.model, "revision": revision,
                   "max_tokens": config.max_tokens, "dtype": config.dtype}
    cache = EmbeddingCache(caches / key, description)
    shards = plan_caption_shards(texts, cache, config.shard_rows)
    cached = sum(len(ids) for shard in shards for _, ids in shard.cached)
    log.info("embed-text: %d of %d captions already in the embedding cache %s", cached, len(texts), key)

    if not texts:  # no captions at all
        schema = _write_empty(folder, config)
        summary = {"captions": 0, "embedded_new": 0, "reused": 0, "encoder": encoder_id, "encoder_key": key,
                   "dim": 0, "max_tokens": config.max_tokens, "dtype": config.dtype}
        return StageOutput(tables={TABLE: _record(schema, 0)}, summary=summary)
    folder.mkdir(parents=True, exist_ok=True)
    expected = {f"{shard.name}.parquet" for shard in shards}
    for leftover in folder.iterdir():  # temporaries of a killed run, parts of another layout
        if leftover.name not in expected:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    missing = [shard for shard in shards if not shard_done(folder / f"{shard.name}.parquet")]
    job = EmbedShard(config, str(source.path), str(cache.directory), description, encoder_id, str(folder), ctx.device)
    encoded = computed = 0
    with ctx.progress(len(texts), "text embeddings", unit="caption",
                      initial=len(texts) - sum(len(s.caption_ids) for s in missing)) as progress:
        for result in fan_out(ctx.stage, job, missing, ctx.runtime):
            encoded += result.encoded
            computed += result.computed
            progress.update(result.rows)
    log.info("embed-text: %d of %d shards computed in this run", computed, len(shards))

    parts = [folder / name for name in sorted(expected)]
    schema = pq.read_schema(parts[0])
    written = sum(pq.ParquetFile(part).metadata.num_rows for part in parts)
    if written != len(texts):
        raise RuntimeError(
            f"embed-text: the parts under {folder} hold {written} of {len(texts)} captions; "
            f"the cache {cache.directory} was changed during the run — run the stage again"
        )
    dim = schema.field("tokens").type.value_type.list_size
    summary = {
        "captions": len(texts),
        "embedded_new": encoded,  # in this run: a resumed run does not count the parts it kept
        "reused": len(texts) - encoded,
        "encoder": encoder_id,
        "encoder_key": key,
        "dim": dim,
        "max_tokens": config.max_tokens,
        "dtype": config.dtype,
        "shards": len(shards),
        "shards_computed_this_run": computed,
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
