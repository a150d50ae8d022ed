"""One shard of ingest: source items [start, stop) -> that shard's images and rejects parts,
written into the stage's work folder (`shards/images`, `shards/rejects`) for the stage to
finish (tasks/ingest/stage.py: the duplicate check against earlier shards, then into the
artifact).

A shard is the unit every fan-out runs (tasks/shards.py): one after another in the stage's
process, or one Ray task each. `runtime.data_workers` (else `runtime.threads`, else 1) is how
many processes one shard task keeps busy: its items go through a process pool of that size, the
one the stage opened for all its shards when they run in its own process, else one per shard
task (a Ray task asks Ray for that many CPUs). Shard boundaries never depend on it.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa

from tasks.config import IngestConfig, RuntimeConfig
from tasks.ingest.process import Accepted, Rejected, process_item, process_items
from tasks.ingest.sources import Item, Source, open_source
from tasks.ingest.tables import IMAGES_SCHEMA, REJECTS_SCHEMA, ROW_GROUP_ROWS, ImagesShardWriter, part_path, shard_done
from tasks.shards import RangeShard, ShardResult, shard_done as part_done

Outcome = tuple[Item, Accepted | Rejected]
Mapper = Callable[[Iterable[Item]], Iterator[Outcome]]


def split_of(image_id: str, salt: str, val_fraction: float) -> str:
    """"val" for a stable pseudo-random `val_fraction` of ids, else "train"."""
    digest = hashlib.sha256((salt + image_id).encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def ingest_workers(runtime: RuntimeConfig) -> int:
    """Processes per shard task: runtime.data_workers if set, else runtime.threads, else 1."""
    return max(1, runtime.data_workers or runtime.threads or 1)


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
def worker_pool(config: IngestConfig, workers: int) -> Iterator[Mapper]:
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


@dataclass
class _Local:
    """What the stage lends the shards that run in its own process: its open source, its pool,
    and its progress bar (per item; a shard elsewhere counts once it is done)."""

    key: str
    source: Source
    mapper: Mapper | None = None
    tick: Callable[[str, int], None] | None = None


# The stage's loan, by the run's cache key; a Ray worker process has none and opens its own.
_LOCAL: dict[str, _Local] = {}
# The source a worker process opened, by the run's cache key (a listing of 1.28M files is worth
# keeping for the next shard this process is given); one run's at a time.
_OPENED: dict[str, Source] = {}


@contextmanager
def lend(local: _Local) -> Iterator[None]:
    """Shards of run `local.key` computed in this process inside the block use what it lends."""
    _LOCAL[local.key] = local
    try:
        yield
    finally:
        _LOCAL.pop(local.key, None)


def _source(key: str, config: IngestConfig) -> Source:
    if key in _LOCAL:
        return _LOCAL[key].source
    if key not in _OPENED:
        _OPENED.clear()
        _OPENED[key] = open_source(config.source)
    return _OPENED[key]


def process_shard(
    outcomes: Iterable[Outcome],
    source: Source,
    config: IngestConfig,
    tick: Callable[[int], None],
    writer: ImagesShardWriter,
) -> pa.Table:
    """Write the shard's accepted images through `writer` (a row group at a time), the first of
    each id only; return its rejects (in item order, duplicates within the shard included)."""
    images: dict[str, list] = {name: [] for name in IMAGES_SCHEMA.names}
    rejects: dict[str, list] = {name: [] for name in REJECTS_SCHEMA.names}
    seen: set[bytes] = set()

    def reject(item: Item, reason: str, detail: str) -> None:
        rejects["source"].append(item.source)
        rejects["reason"].append(reason)
        rejects["detail"].append(detail)

    def flush() -> None:
        writer.write(pa.table(images, schema=IMAGES_SCHEMA))
        for column in images.values():
            column.clear()

    for item, outcome in outcomes:
        tick(1)
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


def computed(folder: Path, index: int) -> bool:
    """Shard `index`'s parts are in `folder`: both there, the images part (renamed in last) readable."""
    return shard_done(folder, index) and part_done(part_path(folder, "images", index), IMAGES_SCHEMA)


def finish_shard(writer: ImagesShardWriter, rejects: pa.Table) -> None:
    """Close shard `writer.index`: rejects part, then the images part into place (the done mark)."""
    writer.finish(rejects)


@dataclass(frozen=True)
class IngestShard:
    """Compute one shard's parts under `folder` (picklable: it runs on a Ray worker as well as in
    the stage's process). A shard whose parts are there is left as it is."""

    config: IngestConfig
    key: str  # the run's cache key: which source listing (and loan) belongs to this run
    folder: str
    workers: int

    def __call__(self, shard: RangeShard) -> ShardResult:
        folder = Path(self.folder)
        if computed(folder, shard.index):
            return ShardResult(shard.name, shard.rows, 0, False)
        source = _source(self.key, self.config)
        local = _LOCAL.get(self.key)
        tick = functools.partial(local.tick, shard.name) if local is not None and local.tick else lambda n: None
        items = source.items(shard.start, shard.stop)
        with _mapper(local, self.config, self.workers) as mapper:
            writer = ImagesShardWriter(folder, shard.index)
            try:
                rejects = process_shard(mapper(items), source, self.config, tick, writer)
                finish_shard(writer, rejects)
            except BaseException:
                writer.abort()
                raise
        return ShardResult(shard.name, shard.rows, shard.rows, True)


@contextmanager
def _mapper(local: _Local | None, config: IngestConfig, workers: int) -> Iterator[Mapper]:
    if local is not None and local.mapper is not None:
        yield local.mapper
        return
    with worker_pool(config, workers) as mapper:
        yield mapper
