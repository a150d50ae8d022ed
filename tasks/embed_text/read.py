"""Reading an `embed-text` artifact into arrays, and looking captions (or images) up by id."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tasks.caption.read import load_captions
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
