"""Reading a `pretokenize` artifact: the tokens table as arrays, whole or in batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from tasks.store import Manifest, Store, read_json

TABLE = "tokens"
META_FILE = "tokens.json"
SPLITS = ("train", "val")


def tokens_schema(discrete: bool, codebook_size: int) -> pa.Schema:
    if discrete and codebook_size > 2**16:
        raise ValueError(f"codebook_size={codebook_size} does not fit the table's uint16 token ids (max 65536)")
    tokens = pa.list_(pa.uint16()) if discrete else pa.list_(pa.list_(pa.float16()))
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("split", pa.string()),
            ("label_id", pa.int64()),
            ("caption_id", pa.string()),  # null when the image has no caption
            ("tokens", tokens),
        ]
    )


def decode_tokens(column: pa.ChunkedArray | pa.Array, discrete: bool, seq_len: int, token_dim: int) -> np.ndarray:
    """The `tokens` column -> int64 ids [M, N] or float32 tokens [M, N, D]."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = array.flatten()
    if discrete:
        return values.to_numpy(zero_copy_only=False).astype(np.int64).reshape(len(array), seq_len)
    flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return flat.reshape(len(array), seq_len, token_dim)


@dataclass
class TokenTable:
    """Rows of the tokens table: tokens[i] belongs to image_ids[i]."""

    image_ids: list[str]
    labels: np.ndarray  # int64 [M]
    caption_ids: list[str | None]
    tokens: np.ndarray  # int64 [M, N] (discrete) or float32 [M, N, D]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def discrete(self) -> bool:
        return bool(self.meta["discrete"])


def token_meta(manifest: Manifest, store: Store) -> dict[str, Any]:
    """The artifact's tokens.json (token shape, codebook, classes, text, rows per split), checked
    to hold what readers of the token table rely on."""
    if manifest.stage != "pretokenize":
        raise ValueError(f"expected a pretokenize artifact, got one of stage {manifest.stage!r} ({manifest.artifact_id})")
    path = manifest.path(store, META_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"pretokenize artifact {manifest.artifact_id} has no {META_FILE} at {path}; rerun pretokenize")
    meta = read_json(path)
    required = ("discrete", "seq_len", "num_classes") + (("codebook_size",) if meta.get("discrete") else ("token_dim",))
    missing = [key for key in required if key not in meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}; rerun the pretokenize stage with the current code")
    return meta


def _dataset(manifest: Manifest, store: Store) -> pads.Dataset:
    files = manifest.table_files(store, TABLE)
    if not files:
        raise FileNotFoundError(f"pretokenize/{manifest.artifact_id} has no token files under {manifest.directory(store)}")
    return pads.dataset([str(p) for p in files], format="parquet")


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")


def _to_table(table: pa.Table, meta: dict[str, Any]) -> TokenTable:
    return TokenTable(
        image_ids=table.column("image_id").to_pylist(),
        labels=table.column("label_id").to_numpy().astype(np.int64),
        caption_ids=table.column("caption_id").to_pylist(),
        tokens=decode_tokens(table.column("tokens"), bool(meta["discrete"]), meta["seq_len"], meta["token_dim"]),
        meta=meta,
    )


def load_token_table(manifest: Manifest, store: Store, split: str | None = None) -> TokenTable:
    """The whole tokens table (or one split) in memory, in stored order."""
    _check_split(split)
    meta = token_meta(manifest, store)
    condition = pc.field("split") == split if split is not None else None
    return _to_table(_dataset(manifest, store).to_table(filter=condition), meta)


def iter_token_batches(
    manifest: Manifest, store: Store, batch_size: int, split: str | None = None
) -> Iterator[TokenTable]:
    """The tokens table in stored order, at most `batch_size` rows at a time (flat memory)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_split(split)
    meta = token_meta(manifest, store)
    condition = pc.field("split") == split if split is not None else None
    for batch in _dataset(manifest, store).to_batches(filter=condition, batch_size=batch_size):
        if batch.num_rows:
            yield _to_table(pa.Table.from_batches([batch]), meta)
