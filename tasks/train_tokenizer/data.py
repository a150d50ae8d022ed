"""Image batches for tokenizer training and evaluation: ingest PNGs -> float images in [0, 1]
(`tasks.ingest.read`), plus, for TexTok, the text-encoder tokens of each image's caption
(`tasks.embed_text.read.TextSource`).

Training rows are addressed through the shared `EpochOrder` (over the wanted rows of each ingest
shard) and read with `ShardCache`, so the order is a function of (seed, epoch) and memory holds
one shuffle group of shards. Horizontal flips are decided per (seed, epoch, row), so a resumed
run flips exactly what an uninterrupted one would.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from tasks.embed_text.read import TextSource
from tasks.ingest.read import (ImageBatch, decode_images, decode_stored, float_images, image_resolution,
                               iter_decoded_images)
from tasks.store import Manifest, Store
from tasks.training.data import EpochOrder, ShardCache, rank_slice

# Distinguishes the flip stream from any other stream derived from the same seed.
_FLIP_STREAM = 0xF11B
# A split whose decoded images fit in this many bytes is decoded once and kept (uint8) instead of
# decoding every batch's stored images at every step: 5400 Fashion-MNIST images at 32 px are
# 17 MB, and their PNG decode was 3% of the default tokenizer's step; ImageNet at 256 px (250 GB)
# is decoded per batch as before.
DECODED_LIMIT_BYTES = 1 << 30


@dataclass
class Batch:
    """Images [B, 3, H, W] in [0, 1] and, with text, caption tokens [B, T, D] and mask [B, T]."""

    image_ids: list[str]
    images: torch.Tensor
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    label_ids: np.ndarray | None = None

    @classmethod
    def of(cls, images: ImageBatch, text: TextSource | None) -> "Batch":
        """Decoded ingest images plus, with `text`, their captions' tokens."""
        tokens, mask = text.lookup(images.image_ids) if text is not None else (None, None)
        return cls(images.image_ids, images.images, tokens, mask, images.label_ids)

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(self.image_ids, move(self.images), move(self.text), move(self.text_mask), self.label_ids)


class TrainImages:
    """One split of the ingest images table as rows 0..N-1 of an `EpochOrder`.

    Rows of other splits (and, with text, images without a caption) are left out of the
    order; `ShardCache` still reads whole ingest shards, addressed by file row.
    """

    def __init__(
        self,
        ingest: Manifest,
        store: Store,
        seed: int,
        shuffle_group: int,
        split: str = "train",
        text: TextSource | None = None,
        hflip: bool = False,
        decoded_limit_bytes: int = DECODED_LIMIT_BYTES,
    ):
        files = ingest.table_files(store, "images")
        if not files:
            raise ValueError(f"ingest/{ingest.artifact_id} has no files for table 'images'")
        selected, file_sizes = [], []
        self.skipped_no_caption = 0
        for path in files:
            table = pq.read_table(path, columns=["image_id", "split"])
            wanted = pc.equal(table.column("split"), split).to_numpy(zero_copy_only=False)
            if text is not None:
                captioned = text.has_caption(table.column("image_id").to_pylist())
                self.skipped_no_caption += int((wanted & ~captioned).sum())
                wanted &= captioned
            selected.append(np.flatnonzero(wanted))
            file_sizes.append(table.num_rows)
        if sum(len(rows) for rows in selected) == 0:
            raise ValueError(
                f"ingest/{ingest.artifact_id} has no {split} images"
                + (" with captions" if text is not None else "")
                + "; check ingest.val_fraction and the caption stage"
            )
        self.order = EpochOrder([len(rows) for rows in selected], seed, shuffle_group)
        file_offsets = np.concatenate([[0], np.cumsum(file_sizes)]).astype(np.int64)
        # Order row -> row of the concatenated ingest files.
        self.file_row = np.concatenate([file_offsets[i] + rows for i, rows in enumerate(selected)])
        self.file_order = EpochOrder(file_sizes, seed)  # only used to locate file rows
        self.shards = ShardCache(files, ["image_id", "label_id", "image"], max_shards=shuffle_group)
        self.seed = seed
        self.hflip = hflip
        self.text = text
        self._flips: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()
        side = image_resolution(ingest, store)
        self._keep_decoded = len(self) * side * side * 3 <= decoded_limit_bytes
        self._decoded: tuple[list[str], np.ndarray, np.ndarray] | None = None  # ids, labels, [N, H, W, 3]
        self._decode_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.order)

    def flips(self, epoch: int) -> np.ndarray:
        """Whether each row is mirrored in this epoch: a function of (seed, epoch) only."""
        if self._flips is None or self._flips[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, _FLIP_STREAM])
            self._flips = (epoch, rng.random(len(self)) < 0.5)
        return self._flips[1]

    def read(self, rows: np.ndarray) -> tuple[list[str], np.ndarray, list[bytes]]:
        """(image ids, label ids, PNG bytes) of order rows; safe to call from several threads."""
        with self._lock:
            table = self.shards.take(self.file_order, self.file_row[rows])
        return (
            table.column("image_id").to_pylist(),
            table.column("label_id").to_numpy().astype(np.int64),
            table.column("image").to_pylist(),
        )

    def decoded(self, map_fn=map) -> tuple[list[str], np.ndarray, np.ndarray] | None:
        """(image ids, label ids, uint8 images [N, H, W, 3]) of every order row, decoded on first
        use; None when the split is larger than the decoded-image limit."""
        if not self._keep_decoded:
            return None
        with self._decode_lock:
            if self._decoded is None:
                ids, labels, arrays = [], [], []
                for start in range(0, len(self), 1024):
                    chunk_ids, chunk_labels, stored = self.read(np.arange(start, min(start + 1024, len(self))))
                    ids += chunk_ids
                    labels.append(chunk_labels)
                    arrays += list(map_fn(decode_stored, stored))
                self._decoded = (ids, np.concatenate(labels), np.stack(arrays))
        return self._decoded

    def batch(self, rows: np.ndarray, epoch: int, map_fn=map) -> Batch:
        decoded = self.decoded(map_fn)
        if decoded is not None:
            all_ids, all_labels, all_images = decoded
            image_ids, labels = [all_ids[i] for i in rows], all_labels[rows]
            images = float_images(all_images[rows])
        else:
            image_ids, labels, stored = self.read(rows)
            images = decode_images(stored, map_fn)
        if self.hflip:
            flip = torch.from_numpy(self.flips(epoch)[rows])
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        text, mask = self.text.lookup(image_ids) if self.text is not None else (None, None)
        return Batch(image_ids, images, text, mask, labels)


class BatchLoader:
    """The batch of each training step; with `workers` > 0, PNGs are decoded by a thread pool
    and the next step's batch is prepared while the current step computes.

    The rows of step s follow from s alone (every step takes one global batch, epoch tails are
    dropped, as in `tasks.training.data.global_batches`); a prefetched batch is still only used
    when its rows equal the rows the loop asks for.
    """

    def __init__(self, images: TrainImages, global_batch: int, rank: int, world: int, workers: int = 0):
        self.images = images
        self.global_batch = global_batch
        self.rank, self.world = rank, world
        self.steps_per_epoch = len(images) // global_batch
        self.pool = ThreadPoolExecutor(workers) if workers > 0 else None
        # The prefetch runs in its own thread: were it a task of `pool`, its decode tasks would
        # wait behind it for a free worker, which with one worker never comes (a deadlock).
        self.prefetcher = ThreadPoolExecutor(1) if workers > 0 else None
        self._next: tuple[int, np.ndarray, Future] | None = None
        self._epoch_rows: tuple[int, np.ndarray] | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def rows_of(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            self._epoch_rows = (epoch, self.images.order.epoch(epoch))
        rows = self._epoch_rows[1][index * self.global_batch : (index + 1) * self.global_batch]
        return rank_slice(rows, self.rank, self.world)

    def _load(self, rows: np.ndarray, step: int) -> Batch:
        map_fn = self.pool.map if self.pool is not None else map
        return self.images.batch(rows, self.epoch_of(step), map_fn)

    def get(self, rows: np.ndarray, step: int) -> Batch:
        batch = None
        if self._next is not None:
            next_step, next_rows, future = self._next
            self._next = None
            prefetched = future.result()
            if next_step == step and np.array_equal(next_rows, rows):
                batch = prefetched
        if batch is None:
            batch = self._load(rows, step)
        if self.pool is not None:
            upcoming = self.rows_of(step + 1)
            self._next = (step + 1, upcoming, self.prefetcher.submit(self._load, upcoming, step + 1))
        return batch

    def close(self) -> None:
        if self.pool is not None:
            self.prefetcher.shutdown(wait=True, cancel_futures=True)
            self.pool.shutdown(wait=True, cancel_futures=True)


def iter_eval_batches(
    ingest: Manifest,
    store: Store,
    batch_size: int,
    limit: int,
    split: str = "val",
    text: TextSource | None = None,
) -> Iterator[Batch]:
    """The first `limit` images of a split (0 = all) in stored order, skipping uncaptioned ones with text."""
    keep = text.has_caption if text is not None else None
    for images in iter_decoded_images(ingest, store, batch_size, limit, split, keep):
        yield Batch.of(images, text)
