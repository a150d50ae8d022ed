"""Reading an `embed-text` artifact into arrays, and looking captions up by id."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tasks.embed_text.cache import table_arrays
from tasks.store import Manifest, Store


@dataclass
class TextEmbeddings:
    """All caption embeddings of an artifact: row i of each array belongs to caption_ids[i]."""

    caption_ids: list[str]
    index: dict[str, int]
    tokens: np.ndarray  # [N, T, D], float16 or float32 as stored; zero where masked
    mask: np.ndarray  # [N, T] bool, True at real tokens
    pooled: np.ndarray  # [N, P]
    dtype: str
    encoder: str

    def __len__(self) -> int:
        return len(self.caption_ids)

    @property
    def max_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def dim(self) -> int:
        return self.tokens.shape[2]

    def rows(self, caption_ids: list[str]) -> np.ndarray:
        try:
            return np.fromiter((self.index[cid] for cid in caption_ids), np.int64, len(caption_ids))
        except KeyError as error:
            raise KeyError(
                f"caption {error.args[0]} has no text embedding in this artifact; "
                f"were the captions and embeddings produced by the same pipeline run?"
            ) from None

    def lookup(self, caption_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, T, D], mask [B, T]) of the given captions, as CPU tensors."""
        rows = self.rows(caption_ids)
        return torch.from_numpy(self.tokens[rows]), torch.from_numpy(self.mask[rows])


def load_text_embeddings(manifest: Manifest, store: Store) -> TextEmbeddings:
    if manifest.stage != "embed-text":
        raise ValueError(f"expected an embed-text artifact, got one of stage {manifest.stage!r} ({manifest.artifact_id})")
    files = manifest.table_files(store, "embeddings")
    if not files:
        raise FileNotFoundError(
            f"embed-text artifact {manifest.artifact_id} has no embedding files under {manifest.directory(store)}"
        )
    table = pa.concat_tables([pq.read_table(path) for path in files])
    tokens, mask, pooled = table_arrays(table)
    caption_ids = table["caption_id"].to_pylist()
    dtypes = set(table["dtype"].to_pylist()) or {str(tokens.dtype)}
    encoders = set(table["encoder"].to_pylist()) or {"none"}
    if len(dtypes) != 1 or len(encoders) != 1:
        raise ValueError(f"embed-text artifact {manifest.artifact_id} mixes encoders {encoders} or dtypes {dtypes}")
    return TextEmbeddings(
        caption_ids=caption_ids,
        index={cid: row for row, cid in enumerate(caption_ids)},
        tokens=tokens,
        mask=mask,
        pooled=pooled,
        dtype=dtypes.pop(),
        encoder=encoders.pop(),
    )
