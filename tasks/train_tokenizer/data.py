"""Image batches for tokenizer training and evaluation: ingest PNGs -> float images in [0, 1],
plus, for TexTok, the text-encoder tokens of each image's caption.

Training rows are addressed through the shared `EpochOrder` (over the wanted rows of each ingest
shard) and read with `ShardCache`, so the order is a function of (seed, epoch) and memory holds
one shuffle group of shards. Horizontal flips are decided per (seed, epoch, row), so a resumed
run flips exactly what an uninterrupted one would.
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from tasks.caption.read import load_captions
from tasks.embed_text.read import TextEmbeddings, load_text_embeddings
from tasks.ingest.read import iter_image_batches
from tasks.store import Manifest, Store
from tasks.training.data import EpochOrder, ShardCache, rank_slice

# Distinguishes the flip stream from any other stream derived from the same seed.
_FLIP_STREAM = 0xF11B


@dataclass
class Batch:
    """Images [B, 3, H, W] in [0, 1] and, with text, caption tokens [B, T, D] and mask [B, T]."""

    image_ids: list[str]
    images: torch.Tensor
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    label_ids: np.ndarray | None = None

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(self.image_ids, move(self.images), move(self.text), move(self.text_mask), self.label_ids)


def _decode_rgb(data: bytes) -> np.ndarray:
    """A stored PNG -> uint8 [H, W, 3]; ~25% faster than format probing plus an RGB copy."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        image.load()
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def decode_images(pngs: list[bytes], map_fn=map) -> torch.Tensor:
    """Stored PNGs -> float tensor [B, 3, H, W] in [0, 1]."""
    arrays = np.stack(list(map_fn(_decode_rgb, pngs)))
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255.0)


def image_resolution(ingest: Manifest, store: Store) -> int:
    """Side of the (square) ingested images, read from the first stored image."""
    for path in ingest.table_files(store, "images"):
        parquet = pq.ParquetFile(path)
        if parquet.metadata.num_rows:
            first = next(parquet.iter_batches(batch_size=1, columns=["image"]))
            height, width, _ = _decode_rgb(first.column("image")[0].as_py()).shape
            if height != width:
                raise ValueError(f"ingest/{ingest.artifact_id} holds {width}x{height} images; tokenizers need square ones")
            return height
    raise ValueError(f"ingest/{ingest.artifact_id} has no images; ingest a non-empty source first")


class TextSource:
    """Each image's caption (from the caption stage) and its text tokens (from embed-text)."""

    def __init__(self, caption_manifest: Manifest, embed_manifest: Manifest, store: Store):
        captions = load_captions(caption_manifest, store, columns=["image_id", "caption_id"])
        self.caption_of: dict[str, str] = dict(
            zip(captions.column("image_id").to_pylist(), captions.column("caption_id").to_pylist())
        )
        self.embeddings: TextEmbeddings = load_text_embeddings(embed_manifest, store)
        if not self.caption_of:
            raise ValueError(
                f"use_text is set but caption/{caption_manifest.artifact_id} has no captions; "
                "set caption.backend to label, dataset or gemini (or use_text: false)"
            )
        if len(self.embeddings) == 0 or self.embeddings.dim == 0:
            raise ValueError(
                f"use_text is set but embed-text/{embed_manifest.artifact_id} holds no embeddings; "
                "set embed_text.backend to sentence-transformers or t5 (or use_text: false)"
            )
        self.caption_artifact = caption_manifest.artifact_id
        self.embed_artifact = embed_manifest.artifact_id

    @property
    def dim(self) -> int:
        return self.embeddings.dim

    @property
    def max_tokens(self) -> int:
        return self.embeddings.max_tokens

    def has_caption(self, image_ids: list[str]) -> np.ndarray:
        return np.fromiter((i in self.caption_of for i in image_ids), bool, len(image_ids))

    def lookup(self, image_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens float32 [B, T, D], mask bool [B, T]) of the images' captions."""
        try:
            caption_ids = [self.caption_of[i] for i in image_ids]
        except KeyError as error:
            raise KeyError(f"image {error.args[0]} has no caption in caption/{self.caption_artifact}") from None
        tokens, mask = self.embeddings.lookup(caption_ids)
        return tokens.float(), mask


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

    def batch(self, rows: np.ndarray, epoch: int, map_fn=map) -> Batch:
        image_ids, labels, pngs = self.read(rows)
        images = decode_images(pngs, map_fn)
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
            self._next = (step + 1, upcoming, self.pool.submit(self._load, upcoming, step + 1))
        return batch

    def close(self) -> None:
        if self.pool is not None:
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
    seen = 0
    for record in iter_image_batches(ingest, store, batch_size, split=split, columns=["image_id", "label_id", "image"]):
        image_ids = record.column("image_id").to_pylist()
        keep = text.has_caption(image_ids) if text is not None else np.ones(len(image_ids), bool)
        if limit:
            keep &= np.cumsum(keep) <= limit - seen
        if not keep.any():
            if limit and seen >= limit:
                return
            continue
        indices = np.flatnonzero(keep)
        image_ids = [image_ids[i] for i in indices]
        pngs = record.column("image").to_pylist()
        images = decode_images([pngs[i] for i in indices])
        labels = record.column("label_id").to_numpy().astype(np.int64)[indices]
        text_tokens, mask = text.lookup(image_ids) if text is not None else (None, None)
        yield Batch(image_ids, images, text_tokens, mask, labels)
        seen += len(indices)
        if limit and seen >= limit:
            return

