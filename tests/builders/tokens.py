"""Pretokenize artifacts from token arrays, written with the stage's schema, column builder,
part names and train-token statistics."""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from builders.store import commit_folder, work_folder
from tasks.pretokenize.read import META_FILE, TABLE, tokens_schema
from tasks.pretokenize.compute import part_name, token_statistics, tokens_array
from tasks.store import Manifest, Store, TableRecord, write_json
from tasks.tables import write_parquet_atomic


def token_artifact(
    store: Store,
    tokens: np.ndarray | torch.Tensor,
    labels: Sequence[int],
    splits: Sequence[str],
    *,
    class_names: Sequence[str],
    token_dim: int | None = None,
    codebook_size: int | None = None,
    image_ids: Sequence[str] | None = None,
    caption_ids: Sequence[str | None] | None = None,
    shards: int = 1,
    **meta: Any,
) -> Manifest:
    """A pretokenize artifact: row i holds tokens[i] (integer ids [M, N]: discrete, stored uint16;
    floats [M, N, D]: continuous, stored float16), label labels[i], split splits[i], id image_ids[i]
    (default `img-i`) and caption caption_ids[i] (default none), in `shards` parts of equal size.
    tokens.json is the stage's: token shape (token_dim: the tokenizer's; D for continuous tokens),
    classes, rows per split, and for continuous tokens the per-channel train statistics; `meta`
    adds or overrides keys (e.g. uses_text, tokenizer_artifact)."""
    tokens = torch.as_tensor(tokens)
    discrete = not tokens.is_floating_point()
    rows, seq_len = tokens.shape[:2]
    if token_dim is None and not discrete:
        token_dim = int(tokens.shape[2])
    splits = [str(split) for split in splits]
    schema = tokens_schema(discrete, codebook_size or 0)
    table = pa.Table.from_arrays(
        [
            pa.array(list(image_ids) if image_ids is not None else [f"img-{i}" for i in range(rows)], pa.string()),
            pa.array(list(splits), pa.string()),
            pa.array([int(label) for label in labels], pa.int64()),
            pa.array(list(caption_ids) if caption_ids is not None else [None] * rows, pa.string()),
            tokens_array(tokens, discrete),
        ],
        schema=schema,
    )
    folder = work_folder(store)
    step = max(1, -(-rows // shards))
    for shard, start in enumerate(range(0, max(rows, 1), step)):
        write_parquet_atomic(table.slice(start, step), folder / TABLE / part_name(shard, 0), compression="zstd")
    files = sorted((folder / TABLE).glob("part-*.parquet"))
    info: dict[str, Any] = {
        "discrete": discrete,
        "seq_len": seq_len,
        "codebook_size": codebook_size if discrete else None,
        "token_dim": token_dim,
        "token_dtype": str(schema.field("tokens").type),
        "uses_text": False,
        "text": {"uses_text": False},
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "rows": dict(Counter(splits)),
        **({} if discrete else token_statistics(files, seq_len, token_dim)),
        **meta,
    }
    write_json(folder / META_FILE, info)
    record = TableRecord(glob=f"{TABLE}/*.parquet", rows=rows, columns={f.name: str(f.type) for f in schema})
    return commit_folder(store, "pretokenize", folder, {TABLE: record}, {"rows": rows, "discrete": discrete})
