"""The `caption` stage: ingest's images -> `captions`, `failures` and `caption_pool` tables.

Gemini captions cost money and time, so they go to a store-wide cache as they arrive:

    <store>/caches/captions/gemini-<key>/part-<time>-<uuid>.parquet   (image_id, caption, origin, truncated)

keyed by model, prompt and word limit. Shards of `shard_rows` are written atomically, so a kill
loses at most the shard in flight, and any later run (of this or another preset) sends only the
images that cache does not hold yet. Failures are not cached: they are retried on the next run,
and the stage reports itself incomplete until there are none.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tasks.caption.backends import CaptionResult, caption_id, dataset_captions, label_captions, label_pool
from tasks.config import CaptionConfig, GeminiConfig
from tasks.hashing import hash_value
from tasks.stage import Stage, StageContext, StageOutput
from tasks.store import Manifest, Store, TableRecord, write_json
from tasks.tables import write_parquet_atomic

log = logging.getLogger("tok1d")

IMAGE_META_COLUMNS = ("image_id", "split", "label_id", "label_name", "source_caption")
VAL_SPLIT = "val"

CAPTIONS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("split", pa.string()),
        ("label_id", pa.int64()),
        ("caption_id", pa.string()),
        ("caption", pa.string()),
        ("origin", pa.string()),
    ]
)
FAILURES_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("attempts", pa.int32())]
)
POOL_SCHEMA = pa.schema(
    [
        ("label_id", pa.int64()),
        ("label_name", pa.string()),
        ("caption_id", pa.string()),
        ("caption", pa.string()),
        ("origin", pa.string()),
    ]
)
CACHE_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("caption", pa.string()), ("origin", pa.string()), ("truncated", pa.bool_())]
)


# ---------------------------------------------------------------------------- ingest input


def images_dataset(manifest: Manifest, store: Store) -> ds.Dataset:
    files = manifest.table_files(store, "images")
    if not files:
        raise ValueError(f"ingest artifact {manifest.artifact_id} has no files for table 'images'")
    dataset = ds.dataset([str(path) for path in files], format="parquet")
    missing = [name for name in (*IMAGE_META_COLUMNS, "image") if name not in dataset.schema.names]
    if missing:
        raise ValueError(
            f"ingest artifact {manifest.artifact_id}: table 'images' lacks columns {missing}; "
            f"rerun the ingest stage with the current code"
        )
    return dataset


def read_image_meta(dataset: ds.Dataset) -> pa.Table:
    table = dataset.to_table(columns=list(IMAGE_META_COLUMNS))
    if pc.count_distinct(table["image_id"]).as_py() != table.num_rows:
        raise ValueError("ingest table 'images' holds duplicate image_id values; rerun the ingest stage")
    return table


def iter_pngs(dataset: ds.Dataset, image_ids: list[str], batch_size: int = 256) -> Iterator[tuple[str, bytes]]:
    """(image_id, PNG bytes) of the given images, reading only their rows' image column."""
    if not image_ids:
        return
    wanted = pc.field("image_id").isin(pa.array(image_ids, pa.string()))
    for batch in dataset.to_batches(columns=["image_id", "image"], filter=wanted, batch_size=batch_size):
        for image_id, png in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            yield image_id, png


def read_classes(manifest: Manifest, store: Store, images: pa.Table) -> list[tuple[int, str]]:
    """(label_id, label_name) of every class: ingest's `classes` table, else those the images name."""
    if "classes" in manifest.tables:
        files = manifest.table_files(store, "classes")
        table = pa.concat_tables([pq.read_table(path, columns=["label_id", "label_name"]) for path in files])
        pairs = zip(table["label_id"].to_pylist(), table["label_name"].to_pylist())
    else:
        pairs = zip(images["label_id"].to_pylist(), images["label_name"].to_pylist())
    classes = {int(label): str(name) for label, name in pairs if label is not None and name is not None}
    return sorted(classes.items())


# ---------------------------------------------------------------------------- store-wide cache


def gemini_cache_key(config: GeminiConfig) -> str:
    """What a cached Gemini caption depends on (not the key, endpoint, timeouts or retries)."""
    return "gemini-" + hash_value(
        {"backend": "gemini", "model": config.model, "prompt": config.prompt, "max_words": config.max_words}
    )[:24]


class CaptionCache:
    """Captions of one backend configuration, shared by every run on the store.

    Appends are whole Parquet shards under unique names (so concurrent runs never collide);
    reading deduplicates by image_id, keeping the first row in file (= time) order.
    """

    def __init__(self, directory: Path, shard_rows: int, description: dict | None = None):
        self.directory = directory
        self.shard_rows = max(1, shard_rows)
        self._buffer: list[CaptionResult] = []
        directory.mkdir(parents=True, exist_ok=True)
        if description is not None and not (directory / "key.json").exists():
            write_json(directory / "key.json", description)

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("part-*.parquet"))

    def load(self) -> dict[str, tuple[str, str]]:
        """image_id -> (caption, origin)."""
        captions: dict[str, tuple[str, str]] = {}
        for path in self.files():
            try:
                table = pq.read_table(path, columns=["image_id", "caption", "origin"])
            except (OSError, pa.ArrowInvalid) as error:
                # Shards are renamed into place whole, so this is outside damage; recaption them.
                log.warning("caption cache: skipping unreadable shard %s (%s)", path, error)
                continue
            for image_id, caption, origin in zip(*(table[name].to_pylist() for name in table.column_names)):
                captions.setdefault(image_id, (caption, origin))
        return captions

    def add(self, result: CaptionResult) -> None:
        self._buffer.append(result)
        if len(self._buffer) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        rows, self._buffer = self._buffer, []
        table = pa.table(
            {
                "image_id": [r.image_id for r in rows],
                "caption": [r.caption for r in rows],
                "origin": [r.origin for r in rows],
                "truncated": [r.truncated for r in rows],
            },
            schema=CACHE_SCHEMA,
        )
        # Time first, so that file order is write order; the uuid keeps concurrent writers apart.
        path = self.directory / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        write_parquet_atomic(table, path)


def write_table(output_dir: Path, name: str, table: pa.Table) -> TableRecord:
    """One table of the stage output: `<name>/part-00000.parquet`, replacing any earlier attempt."""
    folder = output_dir / name
    shutil.rmtree(folder, ignore_errors=True)
    write_parquet_atomic(table, folder / "part-00000.parquet")
    return TableRecord(
        glob=f"{name}/*.parquet",
        rows=table.num_rows,
        columns={field.name: str(field.type) for field in table.schema},
    )


# ---------------------------------------------------------------------------- backends


def gemini_results(ctx: StageContext, dataset: ds.Dataset, image_ids: list[str]) -> tuple[list[CaptionResult], dict]:
    from tasks.caption.gemini import GeminiCaptioner

    config: CaptionConfig = ctx.config
    key = gemini_cache_key(config.gemini)
    description = {"model": config.gemini.model, "prompt": config.gemini.prompt, "max_words": config.gemini.max_words}
    cache = CaptionCache(ctx.store.root / "caches" / "captions" / key, config.shard_rows, description)
    cached = cache.load()
    missing = [image_id for image_id in image_ids if image_id not in cached]
    log.info("caption: %d of %d images already in the caption cache %s", len(image_ids) - len(missing), len(image_ids), key)
    stats = {"requests": 0, "retries": 0, "truncated": 0}
    failures: dict[str, CaptionResult] = {}
    if missing:
        # Only now is the key needed: a run whose captions are all cached works without one.
        captioner = GeminiCaptioner(config.gemini)
        progress = ctx.progress(len(image_ids), "gemini captions", unit="img", initial=len(image_ids) - len(missing))
        try:
            for result in captioner.caption_many(iter_pngs(dataset, missing)):
                if result.ok:
                    cache.add(result)
                else:
                    failures[result.image_id] = result
                progress.update(1, failed=len(failures))
        finally:
            cache.flush()  # keep what arrived, also when the run stops on an error
            progress.close()
        stats = {"requests": captioner.stats.requests, "retries": captioner.stats.retries, "truncated": captioner.stats.truncated}
        cached = cache.load()  # also picks up captions that a concurrent run added
    results = []
    for image_id in image_ids:
        if image_id in cached:
            caption, origin = cached[image_id]
            results.append(CaptionResult(image_id, caption, origin))
        elif image_id in failures:
            results.append(failures[image_id])
    return results, stats


def pool_from_captions(captions: pa.Table, images: pa.Table, per_class: int) -> list[dict]:
    """Captions of up to `per_class` validation images per class, in ingest order."""
    names = dict(zip(images["label_id"].to_pylist(), images["label_name"].to_pylist()))
    pool: dict[int, dict[str, dict]] = {}
    for row in captions.to_pylist():
        label_id = row["label_id"]
        if row["split"] != VAL_SPLIT or label_id is None:
            continue
        entries = pool.setdefault(label_id, {})
        if len(entries) < per_class and row["caption_id"] not in entries:
            entries[row["caption_id"]] = {
                "label_id": label_id,
                "label_name": names.get(label_id),
                "caption_id": row["caption_id"],
                "caption": row["caption"],
                "origin": row["origin"],
            }
    return [entry for label_id in sorted(pool) for entry in pool[label_id].values()]


# ---------------------------------------------------------------------------- the stage


def run_caption(ctx: StageContext) -> StageOutput:
    config: CaptionConfig = ctx.config
    ingest = ctx.inputs["ingest"]
    dataset = images_dataset(ingest, ctx.store)
    images = read_image_meta(dataset)
    image_ids = images["image_id"].to_pylist()
    stats = {"requests": 0, "retries": 0, "truncated": 0}

    if config.backend == "none":
        results: list[CaptionResult] = []
    elif config.backend == "label":
        results = label_captions(images, config.templates)
    elif config.backend == "dataset":
        results = dataset_captions(images)
    elif config.backend == "gemini":
        results, stats = gemini_results(ctx, dataset, image_ids)
    else:  # the config schema admits no other value
        raise ValueError(f"caption.backend: unknown backend {config.backend!r}")

    by_id = {result.image_id: result for result in results}
    rows = []
    for image_id, split, label_id in zip(image_ids, images["split"].to_pylist(), images["label_id"].to_pylist()):
        result = by_id.get(image_id)
        if result is not None and result.ok:
            rows.append(
                {
                    "image_id": image_id,
                    "split": split,
                    "label_id": label_id,
                    "caption_id": caption_id(result.caption),
                    "caption": result.caption,
                    "origin": result.origin,
                }
            )
    captions = pa.Table.from_pylist(rows, schema=CAPTIONS_SCHEMA)
    failed = [result for result in results if not result.ok]
    failures = pa.Table.from_pylist(
        [{"image_id": r.image_id, "reason": r.reason, "detail": r.detail, "attempts": r.attempts} for r in failed],
        schema=FAILURES_SCHEMA,
    )
    if config.backend == "label":
        pool_rows = label_pool(read_classes(ingest, ctx.store, images), config.templates)
    elif config.backend == "none":
        pool_rows = []
    else:
        pool_rows = pool_from_captions(captions, images, config.pool_per_class)
    pool = pa.Table.from_pylist(pool_rows, schema=POOL_SCHEMA)
    if not pool_rows and config.backend != "none" and images["label_id"].null_count < images.num_rows:
        log.warning(
            "caption: the caption pool is empty (it holds captions of %r images); class-conditional "
            "generation will have no captions to draw from",
            VAL_SPLIT,
        )

    tables = {
        "captions": write_table(ctx.output_dir, "captions", captions),
        "failures": write_table(ctx.output_dir, "failures", failures),
        "caption_pool": write_table(ctx.output_dir, "caption_pool", pool),
    }
    total = len(image_ids)
    # Images neither captioned nor failed; `none` captions nothing on purpose.
    pending = 0 if config.backend == "none" else total - captions.num_rows - failures.num_rows
    reasons = dict(Counter(r.reason for r in failed))
    if failed:
        log.warning("caption: %d images without caption (%s); a rerun retries them", len(failed), reasons)
    summary = {
        "backend": config.backend,
        "images": total,
        "captioned": captions.num_rows,
        "failed": failures.num_rows,
        "pending": pending,
        "coverage": round(captions.num_rows / total, 6) if total else 0.0,
        "requests": stats["requests"],
        "retries": stats["retries"],
        "truncated": stats["truncated"],
        "failure_reasons": reasons,
        "pool_classes": len({row["label_id"] for row in pool_rows}),
        "pool_captions": pool.num_rows,
    }
    return StageOutput(tables=tables, summary=summary, complete=failures.num_rows == 0 and pending == 0)


STAGE = Stage(
    name="caption",
    description="One caption per image (dataset captions, class-name templates or Gemini) and per-class caption pools",
    inputs=("ingest",),
    code=("tasks.caption",),
    run=run_caption,
)
