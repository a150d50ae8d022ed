"""The ingest stage: a configured image source -> `images`, `rejects` and `classes` tables.

Items are processed in fixed shards of `shard_rows` source items; a finished shard is a pair
of Parquet files, so a rerun after a kill skips straight to the first unfinished shard.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import multiprocessing
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.config import IngestConfig, RuntimeConfig
from tasks.ingest.fingerprint import source_fingerprint
from tasks.ingest.process import Accepted, Rejected, process_item, process_items
from tasks.ingest.sources import Item, Source, SourceError, check_source, open_source
from tasks.ingest.tables import (
    CLASSES_SCHEMA,
    IMAGES_SCHEMA,
    REJECTS_SCHEMA,
    column_types,
    part_path,
    shard_done,
    table_glob,
    ROW_GROUP_ROWS,
    ImagesShardWriter,
    write_parquet,
)
from tasks.progress import Progress
from tasks.stage import Stage, StageContext, StageOutput, fixed_inputs
from tasks.store import TableRecord

Outcome = tuple[Item, Accepted | Rejected]


def split_of(image_id: str, salt: str, val_fraction: float) -> str:
    """"val" for a stable pseudo-random `val_fraction` of ids, else "train"."""
    digest = hashlib.sha256((salt + image_id).encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _check(config: IngestConfig) -> None:
    if config.resolution < 1:
        raise ValueError(f"ingest.resolution must be >= 1, got {config.resolution}")
    if config.shard_rows < 1:
        raise ValueError(f"ingest.shard_rows must be >= 1, got {config.shard_rows}")
    if not 0.0 <= config.val_fraction <= 1.0:
        raise ValueError(f"ingest.val_fraction must be within [0, 1], got {config.val_fraction}")
    if config.max_image_pixels < 1:
        raise ValueError(f"ingest.max_image_pixels must be >= 1, got {config.max_image_pixels}")


# Items per message to a pool worker, and messages in flight per worker: enough to keep every
# worker busy, few enough that memory holds a bounded window of items and results however long
# the source is (Pool.imap would read the whole item iterator ahead).
_CHUNK = 16
_IN_FLIGHT = 4


def _bounded_imap(pool: ProcessPoolExecutor, config: IngestConfig, items: Iterable[Item],
                  window: int) -> Iterator[Outcome]:
    """`process_item` over items through `pool`, in order, with at most `window` chunks queued."""
    source = iter(items)
    pending: deque = deque()

    def submit() -> None:
        chunk = list(itertools.islice(source, _CHUNK))
        if chunk:
            pending.append(pool.submit(process_items, chunk, config))

    for _ in range(window):
        submit()
    while pending:
        try:
            done = pending.popleft().result()
        except BrokenProcessPool as error:
            raise RuntimeError("ingest: a worker process died (killed, or out of memory); the images written "
                               "so far are kept and a rerun resumes from them") from error
        submit()
        yield from done


@contextmanager
def _mapper(config: IngestConfig, workers: int) -> Iterator[Callable[[Iterable[Item]], Iterator[Outcome]]]:
    """`map` of `process_item` over items, in order: in this process, or in a process pool."""
    if workers <= 1:
        work = functools.partial(process_item, config=config)
        yield lambda items: map(work, items)
        return
    # spawn: a forked copy of a process with torch/Prefect threads can deadlock.
    # A process pool executor, not multiprocessing.Pool: when a worker dies, Pool loses its task
    # and waits for it forever (seen in the suite); the executor raises BrokenProcessPool.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda items: _bounded_imap(pool, config, items, _IN_FLIGHT * workers)


def ingest_workers(runtime: RuntimeConfig) -> int:
    """Ingest's process count: runtime.data_workers if set, else runtime.threads, else 1."""
    return max(1, runtime.data_workers or runtime.threads or 1)


def _finished_ids(output_dir: Path, index: int) -> list[str]:
    table = pq.read_table(part_path(output_dir, "images", index), columns=["image_id"])
    return table.column("image_id").to_pylist()


def _process_shard(
    outcomes: Iterable[Outcome],
    source: Source,
    config: IngestConfig,
    seen: set[bytes],
    progress: Progress,
    writer: ImagesShardWriter,
) -> pa.Table:
    """Write the shard's accepted images through `writer` (a row group at a time); its rejects."""
    images: dict[str, list] = {name: [] for name in IMAGES_SCHEMA.names}
    rejects: dict[str, list] = {name: [] for name in REJECTS_SCHEMA.names}

    def reject(item: Item, reason: str, detail: str) -> None:
        rejects["source"].append(item.source)
        rejects["reason"].append(reason)
        rejects["detail"].append(detail)

    def flush() -> None:
        writer.write(pa.table(images, schema=IMAGES_SCHEMA))
        for column in images.values():
            column.clear()

    for item, outcome in outcomes:
        progress.update(1)
        if isinstance(outcome, Rejected):
            reject(item, outcome.reason, outcome.detail)
            continue
        digest = bytes.fromhex(outcome.image_id)
        if digest in seen:
            reject(item, "duplicate", f"duplicate of {outcome.image_id}")
            continue
        seen.add(digest)
        row = {
            "image_id": outcome.image_id,
            "split": split_of(outcome.image_id, config.split_salt, config.val_fraction),
            "label_id": item.label_id,
            "label_name": source.classes[item.label_id],
            "source_caption": item.caption,
            "source": item.source,
            "orig_width": outcome.width,
            "orig_height": outcome.height,
            "image": outcome.data,
            "image_format": outcome.format,
            "kept_source": outcome.kept_source,
        }
        for name, value in row.items():
            images[name].append(value)
        if len(images["image_id"]) == ROW_GROUP_ROWS:
            flush()
    if images["image_id"]:
        flush()
    return pa.table(rejects, schema=REJECTS_SCHEMA)


def _tally(output_dir: Path, shards: int, classes: list[str]) -> tuple[pa.Table, dict[str, int]]:
    """The classes table and summary counts, read back from the finished shards (small columns)."""
    per_split = {"train": np.zeros(len(classes), np.int64), "val": np.zeros(len(classes), np.int64)}
    reasons: Counter[str] = Counter()
    stored: Counter[str] = Counter()
    for index in range(shards):
        images = pq.read_table(
            part_path(output_dir, "images", index), columns=["label_id", "split", "image_format", "kept_source"]
        )
        stored.update(images.column("image_format").to_pylist())
        stored["source"] += sum(images.column("kept_source").to_pylist())
        labels = images.column("label_id").to_numpy()
        splits = np.asarray(images.column("split").to_pylist(), dtype=object)
        for split, counts in per_split.items():
            counts += np.bincount(labels[splits == split], minlength=len(classes))
        rejected = pq.read_table(part_path(output_dir, "rejects", index), columns=["reason"])
        reasons.update(rejected.column("reason").to_pylist())
    train, val = per_split["train"], per_split["val"]
    table = pa.table(
        {
            "label_id": np.arange(len(classes), dtype=np.int32),
            "label_name": classes,
            "images": train + val,
            "train": train,
            "val": val,
        },
        schema=CLASSES_SCHEMA,
    )
    summary = {
        "images": int(train.sum() + val.sum()),
        "rejected": sum(reasons.values()),
        "train": int(train.sum()),
        "val": int(val.sum()),
        "classes": len(classes),
        **{f"rejected_{reason}": count for reason, count in sorted(reasons.items())},
        # How the images are stored: per format, and how many are the source files' own bytes.
        **{f"stored_{name}": count for name, count in sorted(stored.items())},
    }
    return table, summary


def finish_shard(writer: ImagesShardWriter, rejects: pa.Table) -> None:
    """Close shard `writer.index`: rejects part, then the images part into place (the done mark)."""
    writer.finish(rejects)


def run_ingest(ctx: StageContext) -> StageOutput:
    config: IngestConfig = ctx.config
    _check(config)
    source = open_source(config.source)
    total = len(source)
    if total == 0:
        raise SourceError(f"{source.description} yields no items (ingest.source.max_images={config.source.max_images})")
    output_dir = ctx.output_dir
    shards = math.ceil(total / config.shard_rows)
    for table in ("images", "rejects", "classes"):
        # Temporaries of a killed run, and parts beyond the last shard (only possible if the
        # source listing changed since): neither belongs to this run's output.
        for leftover in sorted((output_dir / table).glob(".*.tmp")):
            leftover.unlink()
        for stale in sorted((output_dir / table).glob("part-*.parquet")):
            if table != "classes" and int(stale.stem.split("-")[1]) >= shards:
                stale.unlink()

    done = [index for index in range(shards) if shard_done(output_dir, index)]
    initial = sum(min(config.shard_rows, total - index * config.shard_rows) for index in done)
    # Ids seen so far, as 32-byte digests (about 100 bytes each in the set, against 155 as hex
    # strings: 130 MB for ImageNet's 1.28M images).
    seen: set[bytes] = set()
    workers = ingest_workers(ctx.runtime)
    with ctx.progress(total, "images", unit="img", initial=initial) as bar, _mapper(config, workers) as mapper:
        for index in range(shards):
            if shard_done(output_dir, index):
                # Ids of finished shards, in shard order: duplicates are judged exactly as in one run.
                seen.update(bytes.fromhex(image_id) for image_id in _finished_ids(output_dir, index))
                continue
            start = index * config.shard_rows
            items = source.items(start, start + config.shard_rows)
            writer = ImagesShardWriter(output_dir, index)
            try:
                rejects = _process_shard(mapper(items), source, config, seen, bar, writer)
                finish_shard(writer, rejects)
            except BaseException:
                writer.abort()
                raise

    classes, summary = _tally(output_dir, shards, source.classes)
    write_parquet(classes, part_path(output_dir, "classes", 0))
    rows = {
        "images": summary["images"],
        "rejects": summary["rejected"],
        "classes": len(source.classes),
    }
    tables = {
        name: TableRecord(glob=table_glob(name), rows=rows[name], columns=column_types(schema))
        for name, schema in (("images", IMAGES_SCHEMA), ("rejects", REJECTS_SCHEMA), ("classes", CLASSES_SCHEMA))
    }
    summary = {
        **summary,
        "source": source.description,
        "shards": shards,
        "storage_policy": config.storage.policy,
        "storage_quality": config.storage.quality,
    }
    return StageOutput(tables=tables, summary=summary)


STAGE = Stage(
    name="ingest",
    description=(
        "Read images from the configured source (Fashion-MNIST, Tux Paint stamps, a folder or a "
        "Hugging Face dataset or WebDataset shards), reject unusable ones with a reason, deduplicate, "
        "split train/val, and store square RGB images (PNG, JPEG, WebP or the source's own bytes, "
        "per ingest.storage) with labels and source captions."
    ),
    config=IngestConfig,
    inputs=fixed_inputs(),
    run=run_ingest,
    fingerprint=source_fingerprint,
    check=lambda config: (_check(config), check_source(config.source)),
)
