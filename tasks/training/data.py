"""Deterministic, resumable, shard-aware sample order over Parquet tables.

The order of an epoch is a function of (seed, epoch) only, and the training position is one
integer, so a resumed run sees exactly the batches an uninterrupted one would. Shards are
shuffled, then rows are shuffled within groups of `shuffle_group` shards, so only a group's
shards need to be in memory at a time (flat memory at ImageNet scale).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class EpochOrder:
    """Which global row comes at each position of each epoch."""

    def __init__(self, shard_sizes: Sequence[int], seed: int, shuffle_group: int = 8):
        if sum(shard_sizes) == 0:
            raise ValueError("no rows to train on: the input table is empty")
        self.shard_sizes = list(shard_sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self.seed = seed
        self.shuffle_group = max(1, shuffle_group)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def epoch(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        shards = rng.permutation(len(self.shard_sizes))
        order = []
        for start in range(0, len(shards), self.shuffle_group):
            group = shards[start : start + self.shuffle_group]
            rows = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in group])
            order.append(rng.permutation(rows))
        return np.concatenate(order)

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        return shard, rows - self.offsets[shard]


@dataclass
class Position:
    """Where training stands in the data: epoch and the number of samples already consumed in it."""

    epoch: int = 0
    offset: int = 0


def global_batches(
    order: EpochOrder, batch_size: int, start: Position
) -> Iterator[tuple[np.ndarray, Position]]:
    """Endless global batches (row indices) from `start`; each comes with the position after it.

    An epoch's tail shorter than a batch is dropped so every step has the same global batch.
    """
    if batch_size > len(order):
        raise ValueError(f"batch size {batch_size} is larger than the table ({len(order)} rows)")
    epoch, offset = start.epoch, start.offset
    while True:
        rows = order.epoch(epoch)
        while offset + batch_size <= len(rows):
            batch = rows[offset : offset + batch_size]
            offset += batch_size
            yield batch, Position(epoch, offset)
        epoch, offset = epoch + 1, 0


def rank_slice(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """The part of a global batch one process computes (equal parts: DDP's mean = global mean)."""
    if len(batch) % world:
        raise ValueError(f"global batch {len(batch)} is not divisible by the {world} processes")
    per_rank = len(batch) // world
    return batch[rank * per_rank : (rank + 1) * per_rank]


class ShardCache:
    """Reads rows of a sharded Parquet table by global index, keeping recent shards in memory."""

    def __init__(self, files: Sequence[Path], columns: Sequence[str] | None, max_shards: int = 8):
        self.files = list(files)
        self.columns = list(columns) if columns else None
        self.max_shards = max(1, max_shards)
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self.sizes = [pq.ParquetFile(f).metadata.num_rows for f in self.files]

    def shard(self, index: int) -> pa.Table:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        table = pq.read_table(self.files[index], columns=self.columns)
        self._cache[index] = table
        if len(self._cache) > self.max_shards:
            self._cache.popitem(last=False)
        return table

    def take(self, order: EpochOrder, rows: np.ndarray) -> pa.Table:
        """The given global rows, in the given order."""
        shards, local = order.locate(rows)
        pieces = []
        positions = []
        for shard in np.unique(shards):
            mask = shards == shard
            pieces.append(self.shard(int(shard)).take(pa.array(local[mask])))
            positions.append(np.nonzero(mask)[0])
        table = pa.concat_tables(pieces)
        inverse = np.argsort(np.concatenate(positions))
        return table.take(pa.array(inverse))
