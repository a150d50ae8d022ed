"""The `caption` stage: ingest's images -> `captions`, `failures` and `caption_pool` tables.

The configured backend (`tasks/caption/backends/`, picked by `caption.backend`) captions the
images and chooses the per-class pool; this module turns its results into the stage's tables
and summary the same way for every backend. Images a backend neither captioned nor failed are
pending, and the stage reports itself incomplete until none are pending or failed (a rerun
retries them).
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa

from tasks.caption.backends import CaptionResult, caption_id, check_backend, open_backend
from tasks.caption.images import VAL_SPLIT, IngestImages
from tasks.config import CaptionConfig
from tasks.stage import Stage, StageContext, StageOutput, fixed_inputs
from tasks.store import TableRecord
from tasks.tables import write_parquet_atomic

log = logging.getLogger("tok1d")

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


def captions_table(images: pa.Table, results: list[CaptionResult]) -> pa.Table:
    """One row per captioned image, in ingest order."""
    by_id = {result.image_id: result for result in results}
    rows = []
    for image_id, split, label_id in zip(*(images[name].to_pylist() for name in ("image_id", "split", "label_id"))):
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
    return pa.Table.from_pylist(rows, schema=CAPTIONS_SCHEMA)


def failures_table(failed: list[CaptionResult]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"image_id": r.image_id, "reason": r.reason, "detail": r.detail, "attempts": r.attempts} for r in failed],
        schema=FAILURES_SCHEMA,
    )


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


def run_caption(ctx: StageContext) -> StageOutput:
    config: CaptionConfig = ctx.config
    backend = open_backend(config)
    images = IngestImages(ctx.inputs["ingest"], ctx.store)
    run = backend.caption(ctx, images)

    captions = captions_table(images.meta, run.results)
    failed = [result for result in run.results if not result.ok]
    failures = failures_table(failed)
    pool_rows = backend.pool(images, captions)
    pool = pa.Table.from_pylist(pool_rows, schema=POOL_SCHEMA)
    if not pool_rows and backend.captions_images and images.has_labels():
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
    total = images.meta.num_rows
    # Images neither captioned nor failed; a backend that captions nothing leaves none pending.
    pending = total - captions.num_rows - failures.num_rows if backend.captions_images else 0
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
        "requests": run.requests,
        "retries": run.retries,
        "truncated": run.truncated,
        "failure_reasons": reasons,
        "pool_classes": len({row["label_id"] for row in pool_rows}),
        "pool_captions": pool.num_rows,
        **run.details,
    }
    return StageOutput(tables=tables, summary=summary, complete=failures.num_rows == 0 and pending == 0)


STAGE = Stage(
    name="caption",
    description="One caption per image (dataset captions, class-name templates or Gemini) and per-class caption pools",
    config=CaptionConfig,
    inputs=fixed_inputs("ingest"),
    check=check_backend,
    run=run_caption,
)
