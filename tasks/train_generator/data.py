"""The generator's training data: the train rows of a pretokenize `tokens` table, as tensors.

Every process reads the table's shards itself (an `EpochOrder` over their train rows, rows
fetched through a `ShardCache`) and takes its slice of each global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from tasks.embed_text.read import TextEmbeddings
from tasks.pretokenize.read import TABLE, decode_tokens
from tasks.train_generator.kinds.base import TokenBatch
from tasks.store import Manifest, Store
from tasks.training.data import EpochOrder, ShardCache

TRAIN_SPLIT = "train"
TRAIN_COLUMNS = ("tokens", "label_id", "caption_id")


def token_files(manifest: Manifest, store: Store) -> list[Path]:
    manifest.table_glob(store, TABLE)  # a clear KeyError if the table is absent
    files = manifest.table_files(store, TABLE)
    if not files:
        raise FileNotFoundError(f"pretokenize artifact {manifest.artifact_id} has no shards for table {TABLE!r}")
    return files


class TrainRows(ShardCache):
    """The train rows of a token table's shards, read by global train-row index.

    A shard may hold both splits; `sizes` counts its train rows and `shard` returns only those,
    so an `EpochOrder` over `sizes` never sees a validation row.
    """

    def __init__(self, files: Sequence[Path], columns: Sequence[str], max_shards: int = 8):
        super().__init__(files, [*columns, "split"], max_shards)
        self.sizes = [_train_count(path) for path in self.files]

    def shard(self, index: int) -> pa.Table:
        if index not in self._cache:
            table = pq.read_table(self.files[index], columns=self.columns)
            self._cache[index] = table.filter(pc.equal(table["split"], TRAIN_SPLIT))
            if len(self._cache) > self.max_shards:
                self._cache.popitem(last=False)
        self._cache.move_to_end(index)
        return self._cache[index]


def _train_count(path: Path) -> int:
    split = pq.read_table(path, columns=["split"])["split"]
    return int(pc.sum(pc.equal(split, TRAIN_SPLIT)).as_py() or 0)


class TokenBatches:
    """Rows of the train split -> `TokenBatch`es on the training device."""

    def __init__(self, data: TrainRows, order: EpochOrder, meta: dict[str, Any], scale: float | None,
                 texts: TextEmbeddings | None, device: torch.device):
        self.data, self.order, self.meta, self.scale, self.texts, self.device = data, order, meta, scale, texts, device
        self.num_classes = int(meta["num_classes"])

    def tensors(self, rows: np.ndarray) -> TokenBatch:
        table = self.data.take(self.order, rows)
        meta = self.meta
        tokens = torch.from_numpy(decode_tokens(table["tokens"], bool(meta["discrete"]), int(meta["seq_len"]),
                                                int(meta["token_dim"] or 0)))
        if self.scale is not None:
            tokens = tokens / self.scale
        labels = table["label_id"].to_numpy(zero_copy_only=False).astype(np.int64)
        if self.num_classes == 0:
            labels = np.zeros_like(labels)  # unconditional: every row gets the null class
        elif labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"token table labels span [{labels.min()}, {labels.max()}] but tokens.json says "
                             f"num_classes={self.num_classes}; rerun pretokenize")
        batch = TokenBatch(tokens.to(self.device), torch.from_numpy(labels).to(self.device))
        if self.texts is not None:
            caption_ids = table["caption_id"].to_pylist()
            if any(cid is None for cid in caption_ids):
                raise ValueError("train_generator.conditioning=text, but some train images have no caption "
                                 "(caption_id is null); use caption.backend=label, dataset or gemini")
            text, mask = self.texts.lookup(caption_ids)
            batch.text, batch.text_mask = text.to(self.device).float(), mask.to(self.device)
        return batch
