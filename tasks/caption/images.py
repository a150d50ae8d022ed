"""The ingest artifact as the caption stage reads it: image metadata in memory, pixels on demand."""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tasks.store import Manifest, Store

IMAGE_META_COLUMNS = ("image_id", "split", "label_id", "label_name", "source_caption")
# Pools are drawn from this split, so class-conditional generation samples captions of unseen images.
VAL_SPLIT = "val"


class IngestImages:
    """The `images` table of an ingest artifact: `meta` holds every column but the pixels, in ingest order."""

    def __init__(self, manifest: Manifest, store: Store):
        self.manifest = manifest
        self.store = store
        self.dataset = _images_dataset(manifest, store)
        self.meta = self.dataset.to_table(columns=list(IMAGE_META_COLUMNS))
        if pc.count_distinct(self.meta["image_id"]).as_py() != self.meta.num_rows:
            raise ValueError("ingest table 'images' holds duplicate image_id values; rerun the ingest stage")

    @property
    def image_ids(self) -> list[str]:
        return self.meta["image_id"].to_pylist()

    def pngs(self, image_ids: list[str], batch_size: int = 256) -> Iterator[tuple[str, bytes]]:
        """(image_id, PNG bytes) of the given images, reading only their rows' image column."""
        if not image_ids:
            return
        wanted = pc.field("image_id").isin(pa.array(image_ids, pa.string()))
        for batch in self.dataset.to_batches(columns=["image_id", "image"], filter=wanted, batch_size=batch_size):
            for image_id, png in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                yield image_id, png

    def classes(self) -> list[tuple[int, str]]:
        """(label_id, label_name) of every class: ingest's `classes` table, else those the images name."""
        if "classes" in self.manifest.tables:
            files = self.manifest.table_files(self.store, "classes")
            table = pa.concat_tables([pq.read_table(path, columns=["label_id", "label_name"]) for path in files])
            pairs = zip(table["label_id"].to_pylist(), table["label_name"].to_pylist())
        else:
            pairs = zip(self.meta["label_id"].to_pylist(), self.meta["label_name"].to_pylist())
        classes = {int(label): str(name) for label, name in pairs if label is not None and name is not None}
        return sorted(classes.items())

    def has_labels(self) -> bool:
        return self.meta["label_id"].null_count < self.meta.num_rows


def _images_dataset(manifest: Manifest, store: Store) -> ds.Dataset:
    files = manifest.table_files(store, "images")
    if not files:
        raise ValueError(f"ingest artifact {manifest.artifact_id} has no files for table 'images'")
    dataset = ds.dataset([str(path) for path in files], format="parquet")
    missing = [name for name in (*IMAGE_META_COLUMNS, "image") if name not in dataset.schema.names]
    if missing:
        raise ValueError(
            f"ingest artifact {manifest.artifact_id}: table 'images' lacks columns {missing}; "
            f"rerun the ingest stage with the current code"
        )
    return dataset
