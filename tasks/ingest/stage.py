"""The ingest stage: a configured image source -> `images`, `rejects` and `classes` tables.

Items are processed in fixed shards of `shard_rows` source items (tasks/ingest/shard.py), run
by the attached fan-out (tasks/shards.py: here, or one Ray task per shard). A shard task writes
its parts into the work folder; the stage takes the shards' results in shard order and finishes
each: images already in an earlier shard are rejected as duplicates (the first copy in source
order is kept, exactly as one pass over the source would), then the parts move into the
artifact. A finished shard is a pair of Parquet files, so a rerun after a kill computes only the
shards with neither finished nor computed parts.
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.config import IngestConfig
from tasks.ingest.fingerprint import source_fingerprint
from tasks.ingest.shard import (
    IngestShard,
    _Local,
    computed,
    ingest_workers,
    lend,
    split_of,
    worker_pool,
)
from tasks.ingest.sources import SourceError, check_source, open_source
from tasks.ingest.tables import (
    CLASSES_SCHEMA,
    IMAGES_SCHEMA,
    REJECTS_SCHEMA,
    column_types,
    part_path,
    shard_done,
    table_glob,
    write_images_without,
    write_parquet,
)
from tasks.shards import ShardNeeds, fan_out, plan_range_shards
from tasks.stage import Stage, StageContext, StageOutput, fixed_inputs
from tasks.store import TableRecord

__all__ = ["STAGE", "run_ingest", "split_of"]
# Where shard tasks write their parts, inside the stage's work folder (beside `output`).
SHARDS_DIR = "shards"


def _check(config: IngestConfig) -> None:
    if config.resolution < 1:
        raise ValueError(f"ingest.resolution must be >= 1, got {config.resolution}")
    if config.shard_rows < 1:
        raise ValueError(f"ingest.shard_rows must be >= 1, got {config.shard_rows}")
    if not 0.0 <= config.val_fraction <= 1.0:
        raise ValueError(f"ingest.val_fraction must be within [0, 1], got {config.val_fraction}")
    if config.max_image_pixels < 1:
        raise ValueError(f"ingest.max_image_pixels must be >= 1, got {config.max_image_pixels}")


def _ids(path: Path) -> list[str]:
    return pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist()


def finish_into_artifact(work: Path, output_dir: Path, index: int, seen: set[bytes]) -> None:
    """Move shard `index`'s computed parts from `work` into the artifact, rejecting its images that
    an earlier shard has (ids in `seen`, which gains this shard's). The images part is the done
    mark and goes last: a kill before it leaves the computed parts to finish again, the same way."""
    images, rejects = part_path(work, "images", index), part_path(work, "rejects", index)
    ids = _ids(images)
    drop = {row for row, image_id in enumerate(ids) if bytes.fromhex(image_id) in seen}
    table = pq.read_table(rejects)
    if drop:
        rows = sorted(drop)
        sources = pq.read_table(images, columns=["source"]).column("source").take(pa.array(rows))
        duplicates = pa.table({"source": sources, "reason": ["duplicate"] * len(rows),
                               "detail": [f"duplicate of {ids[row]}" for row in rows]}, schema=REJECTS_SCHEMA)
        table = pa.concat_tables([table, duplicates])
    write_parquet(table, part_path(output_dir, "rejects", index))
    final = part_path(output_dir, "images", index)
    final.parent.mkdir(parents=True, exist_ok=True)
    if drop:
        write_images_without(images, final, drop)
        images.unlink()
    else:
        os.replace(images, final)
    rejects.unlink()
    seen.update(bytes.fromhex(image_id) for row, image_id in enumerate(ids) if row not in drop)


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


def _clean(folder: Path, shards: int) -> None:
    """Temporaries of a killed run, and parts beyond the last shard (only possible if the source
    listing changed since): neither belongs to this run's output."""
    for table in ("images", "rejects", "classes"):
        for leftover in sorted((folder / table).glob(".*.tmp")):
            leftover.unlink()
        for stale in sorted((folder / table).glob("part-*.parquet")):
            if table != "classes" and int(stale.stem.split("-")[1]) >= shards:
                stale.unlink()


def run_ingest(ctx: StageContext) -> StageOutput:
    config: IngestConfig = ctx.config
    _check(config)
    source = open_source(config.source)
    total = len(source)
    if total == 0:
        raise SourceError(f"{source.description} yields no items (ingest.source.max_images={config.source.max_images})")
    output_dir, work = ctx.output_dir, ctx.work_dir / SHARDS_DIR
    shards = plan_range_shards(total, config.shard_rows, "ingest.shard_rows")
    _clean(output_dir, len(shards))
    _clean(work, len(shards))

    finished = {shard.index for shard in shards if shard_done(output_dir, shard.index)}
    to_compute = [shard for shard in shards if shard.index not in finished and not computed(work, shard.index)]
    initial = total - sum(shard.rows for shard in to_compute)
    workers = ingest_workers(ctx.runtime)
    job = IngestShard(config, ctx.cache_key, str(work), workers)
    # Ids finished so far, as 32-byte digests (about 100 bytes each in the set, against 155 as hex
    # strings: 130 MB for ImageNet's 1.28M images).
    seen: set[bytes] = set()
    shards_computed = 0
    with ctx.progress(total, "images", unit="img", initial=initial) as bar, ExitStack() as stack:
        ticked: Counter[str] = Counter()

        def tick(name: str, count: int) -> None:
            ticked[name] += count
            bar.update(count)

        local = _Local(ctx.cache_key, source, tick=tick)
        if ctx.runtime.task_runner == "in-process" and to_compute:  # shards run here: one pool for all
            local.mapper = stack.enter_context(worker_pool(config, workers))
        stack.enter_context(lend(local))
        results = fan_out(ctx.stage, job, to_compute, ctx.runtime, ShardNeeds(cpus=workers, device=False))
        stack.callback(getattr(results, "close", lambda: None))  # a failed stage leaves no shard running
        pending = {shard.index for shard in to_compute}
        for shard in shards:
            if shard.index in finished:
                # Ids of finished shards, in shard order: duplicates are judged exactly as in one pass.
                seen.update(bytes.fromhex(image_id) for image_id in _ids(part_path(output_dir, "images", shard.index)))
                continue
            if shard.index in pending:
                result = next(results)
                assert result.name == shard.name, (result.name, shard.name)  # fan-outs yield in shard order
                shards_computed += result.computed
                bar.update(result.rows - ticked.pop(shard.name, 0))
            finish_into_artifact(work, output_dir, shard.index, seen)

    classes, summary = _tally(output_dir, len(shards), source.classes)
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
        "shards": len(shards),
        "shards_computed_this_run": shards_computed,
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
