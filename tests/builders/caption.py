"""Caption artifacts from captions in memory, written with the caption stage's schemas and table writer."""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa

from builders.store import commit_folder, work_folder
from tasks.caption.backends import caption_id
from tasks.caption.stage import CAPTIONS_SCHEMA, FAILURES_SCHEMA, POOL_SCHEMA, write_table
from tasks.store import Manifest, Store


def caption_artifact(
    store: Store,
    captions: Sequence[str],
    pool: dict[int, Sequence[str]],
    *,
    labels: Sequence[int],
    image_ids: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    origin: str = "dataset",
    pool_origin: str = "label",
) -> Manifest:
    """A caption artifact: image i (id image_ids[i], default `img-i`; split splits[i], default
    train; label labels[i]) captioned captions[i]; pool[label] the class's pool captions (label
    names class_names, default `class k`); no failures. Caption ids are the stage's own."""
    count = len(captions)
    image_ids = list(image_ids) if image_ids is not None else [f"img-{i}" for i in range(count)]
    splits = list(splits) if splits is not None else ["train"] * count
    captions_table = pa.table(
        {
            "image_id": image_ids,
            "split": splits,
            "label_id": [int(label) for label in labels],
            "caption_id": [caption_id(c) for c in captions],
            "caption": list(captions),
            "origin": [origin] * count,
        },
        schema=CAPTIONS_SCHEMA,
    )
    name = (lambda label: class_names[label]) if class_names is not None else (lambda label: f"class {label}")
    pool_table = pa.Table.from_pylist(
        [
            {"label_id": label, "label_name": name(label), "caption_id": caption_id(c), "caption": c, "origin": pool_origin}
            for label, entries in pool.items()
            for c in entries
        ],
        schema=POOL_SCHEMA,
    )
    folder = work_folder(store)
    tables = {
        "captions": write_table(folder, "captions", captions_table),
        "failures": write_table(folder, "failures", FAILURES_SCHEMA.empty_table()),
        "caption_pool": write_table(folder, "caption_pool", pool_table),
    }
    return commit_folder(store, "caption", folder, tables, {"captioned": count})
