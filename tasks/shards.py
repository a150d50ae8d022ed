"""Sharded fan-out: a stage's work cut into fixed shards, each computed by a plain function that
writes one immutable file, run by whichever fan-out the orchestrator attached.

A shard is a fixed row range of one input file (`Shard`) or of a list the input manifest fixes
(embed-text's captions), derived from the inputs and the stage's `shard_rows` only, never from
the number of workers: the shard plan, every shard's file
name and every file's bytes are the same whether the shards run in this process or on a Ray
cluster with any number of workers. A shard whose file exists (written by rename, so never half)
and reads back is done: a killed fan-out, run again, computes only the missing shards.

tasks/ never imports Prefect or Ray: `fan_out` runs the shards in a plain loop unless the
orchestrator attached another `FanOut` (flows/fanout.py: one Prefect task per shard, in-process
or on Ray's task runner per `runtime.task_runner`). What one shard task needs (`ShardNeeds`: CPU
cores, whether it computes on `runtime.device`) is the stage's to say; the fan-out turns it into
a resource request where it has one to make (Ray's `num_cpus` / `num_gpus`).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("tok1d")
R = TypeVar("R")
T = TypeVar("T")  # a shard: any picklable object with a stable `name`


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of input file number `file_index` (`path`), part `part` of that file.

    `name` is the shard's stable id and the stem of its output file: it depends on the position
    of the file in the input manifest and on the part size only.
    """

    file_index: int
    part: int
    path: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.file_index:05d}-{self.part:04d}"

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class RangeShard:
    """Items [start, stop) of a stage's input in input order (source items, samples), shard
    `index`; `name` is the stem of its files."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_range_shards(total: int, shard_rows: int, setting: str) -> list[RangeShard]:
    """Shards of `shard_rows` items (the config key `setting`) of `total` items, in order."""
    if shard_rows < 1:
        raise ValueError(f"{setting} must be >= 1, got {shard_rows}")
    return [RangeShard(index, start, min(total, start + shard_rows))
            for index, start in enumerate(range(0, total, shard_rows))]


@dataclass(frozen=True)
class ShardResult:
    """One shard's outcome: rows it covers, rows it encoded, whether this call computed it."""

    name: str
    rows: int
    encoded: int
    computed: bool
    # Seconds of the shard's main work when computed (e.g. evaluate's generation), else 0.
    seconds: float = 0.0


@dataclass(frozen=True)
class ShardNeeds:
    """What one shard task of a stage uses while it runs.

    cpus:   the processes it keeps busy (ingest's worker pool per shard; 1 otherwise).
    device: True when it computes on `runtime.device` (a GPU with `cuda`), False when it never
            touches one (ingest decodes and encodes images on the CPU).
    """

    cpus: int = 1
    device: bool = True

    def __post_init__(self) -> None:
        if self.cpus < 1:
            raise ValueError(f"a shard task needs at least one CPU, got cpus={self.cpus}")


def plan_shards(files: Sequence[Path], shard_rows: int) -> list[Shard]:
    """The shards of `files` (in manifest order): parts of `shard_rows` rows; an empty file still
    has one (empty) part, so every input file leaves a trace in the output."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    shards = []
    for index, path in enumerate(files):
        rows = pq.ParquetFile(path).metadata.num_rows
        for part in range(max(1, math.ceil(rows / shard_rows))):
            shards.append(Shard(index, part, str(path), part * shard_rows, min(rows, (part + 1) * shard_rows)))
    return shards


def iter_shard_batches(shard: Shard, batch_size: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The shard's rows in batches of at most `batch_size`, reading only the row groups it overlaps."""
    parquet = pq.ParquetFile(shard.path)
    groups, offset, first = [], 0, None
    for group in range(parquet.metadata.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if offset + rows > shard.start and offset < shard.stop:
            groups.append(group)
            first = offset if first is None else first
        offset += rows
    if not groups:
        return
    row, pending = first, None
    for batch in parquet.iter_batches(batch_size=batch_size, row_groups=groups, columns=columns):
        lo, hi = max(shard.start - row, 0), min(shard.stop - row, batch.num_rows)
        row += batch.num_rows
        if hi <= lo:
            continue
        piece = batch.slice(lo, hi - lo)
        # Row-group ends cut batches short: regroup into full batches so the batch boundaries
        # (and with them the model's batched arithmetic) depend on the shard alone.
        pending = piece if pending is None else pa.concat_batches([pending, piece])
        while pending is not None and pending.num_rows >= batch_size:
            yield pending.slice(0, batch_size)
            pending = pending.slice(batch_size) if pending.num_rows > batch_size else None
    if pending is not None and pending.num_rows:
        yield pending


def shard_done(path: Path, schema: pa.Schema | None = None) -> bool:
    """True when the shard's file exists and its footer reads (with `schema`, when given)."""
    if not path.is_file():
        return False
    try:
        found = pq.read_schema(path)
        return schema is None or found.equals(schema)
    except (OSError, pa.ArrowInvalid) as error:
        log.warning("shard file %s is unreadable (%s); computing it again", path, error)
        return False


class FanOut(Protocol):
    """Runs `fn` on every shard and yields the results in shard order."""

    def map(self, stage: str, fn: Callable[[T], R], shards: Sequence[T], runtime: Any,
            needs: ShardNeeds) -> Iterator[R]: ...


class InProcess:
    """The default fan-out: one shard after another in this process."""

    def map(self, stage: str, fn: Callable[[T], R], shards: Sequence[T], runtime: Any,
            needs: ShardNeeds) -> Iterator[R]:
        if getattr(runtime, "task_runner", "in-process") != "in-process":
            log.warning("%s: runtime.task_runner=%s needs a Prefect flow (tok1d run); running the shards "
                        "in this process", stage, runtime.task_runner)
        for shard in shards:
            yield fn(shard)


_fanout: FanOut = InProcess()


@contextmanager
def attached_fanout(fanout: FanOut) -> Iterator[None]:
    """Run the shards of every `fan_out` inside the block with `fanout`."""
    global _fanout
    previous, _fanout = _fanout, fanout
    try:
        yield
    finally:
        _fanout = previous


def fan_out(stage: str, fn: Callable[[T], R], shards: Sequence[T], runtime: Any,
            needs: ShardNeeds = ShardNeeds()) -> Iterator[R]:
    """`fn(shard)` for every shard, in shard order, on the attached fan-out.

    `fn` must be picklable (a module-level function or a dataclass instance) and must write its
    shard's file itself: results travel back, but files are what resume and commit rely on.
    Results are yielded as soon as the next one in shard order is done, so the caller can fold
    shard K in (e.g. ingest's duplicate check) while later shards still run.
    """
    return _fanout.map(stage, fn, shards, runtime, needs)
