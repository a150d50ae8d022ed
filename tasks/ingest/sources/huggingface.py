"""A Hugging Face dataset (hub id, local data folder, or `save_to_disk` folder) as an image source,
read as a memory-mapped Arrow dataset or, with `ingest.source.hf_streaming`, streamed
(`datasets.load_dataset(..., streaming=True)`: rows arrive as the data files are read).

A streamed split has no length of its own: it comes from the dataset's info (hub datasets
record it) or from `ingest.source.max_images`. A slice of it is `skip(start).take(n)`, which
reads past the skipped rows, so a resumed run re-reads (but does not re-process) them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from tasks.config import SourceConfig
from tasks.ingest.sources.base import Item, Source, SourceError

# Class name used when the dataset has no label column: every image is in one class.
UNLABELLED_CLASS = "image"
_BATCH = 256


def short_name(name_or_path: str) -> str:
    """A hub id as is; a local dataset folder by its folder name (no machine paths in the output)."""
    path = Path(name_or_path).expanduser()
    return path.resolve().name if path.exists() else name_or_path


def load_hf_dataset(name_or_path: str, split: str | None = None, streaming: bool = False) -> Any:
    """`datasets.load_from_disk` for a `save_to_disk` folder (memory-mapped: `streaming` changes
    nothing), else `datasets.load_dataset`."""
    import datasets

    path = Path(name_or_path).expanduser()
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split is None:
                return dataset
            if split not in dataset:
                raise SourceError(f"{path} has splits {sorted(dataset)}, not {split!r} (ingest.source.hf_split)")
            return dataset[split]
        return dataset
    return datasets.load_dataset(name_or_path, split=split, streaming=streaming)


def _streamed(dataset: Any) -> bool:
    import datasets

    return isinstance(dataset, datasets.IterableDataset)


def _length(dataset: Any, split: str, name: str, max_images: int | None) -> int:
    """Rows of a split: len() of an Arrow dataset; of a streamed one, its info's count or max_images."""
    if not _streamed(dataset):
        return len(dataset)
    known = (dataset.info.splits or {}).get(split) if dataset.info is not None else None
    if known is not None and known.num_examples:
        return known.num_examples if max_images is None else min(known.num_examples, max_images)
    if max_images is None:
        raise SourceError(
            f"the streamed dataset {name} split {split} does not say how many rows it has: set "
            f"ingest.source.max_images (or hf_streaming=false)"
        )
    return max_images


def _batches(dataset: Any, first: int, last: int) -> Iterator[tuple[int, dict[str, list]]]:
    """(row index of the batch's first row, columns) for rows first..last-1, _BATCH at a time."""
    if _streamed(dataset):
        index = first
        for batch in dataset.skip(first).take(last - first).iter(batch_size=_BATCH):
            yield index, batch
            index += len(next(iter(batch.values())))
        return
    for batch_start in range(first, last, _BATCH):
        yield batch_start, dataset[batch_start : min(batch_start + _BATCH, last)]


class HuggingFaceSource(Source):
    """Rows of one or more dataset splits, in order; images stay encoded until processed."""

    def __init__(
        self,
        parts: list[tuple[str, Any]],
        *,
        name: str,
        image_column: str,
        label_column: str | None,
        caption_column: str | None,
        max_images: int | None,
        class_names: list[str] | None = None,
    ):
        import datasets

        self.description = f"huggingface {name} ({', '.join(split for split, _ in parts)})"
        self.name = name
        self.image_column, self.label_column, self.caption_column = image_column, label_column, caption_column
        wanted = [c for c in (image_column, label_column, caption_column) if c is not None]
        self.parts: list[tuple[str, Any]] = []
        self.lengths: list[int] = []
        for split, dataset in parts:
            if _streamed(dataset) and dataset.features is None:
                dataset = dataset._resolve_features()  # formats that only know them after a first read
            missing = [c for c in wanted if c not in dataset.column_names]
            if missing:
                raise SourceError(
                    f"dataset {name} split {split} has no column(s) {missing}; it has {dataset.column_names} "
                    f"(set ingest.source.hf_image_column / hf_label_column / hf_caption_column)"
                )
            dataset = dataset.select_columns(wanted)
            feature = dataset.features[image_column]
            if isinstance(feature, datasets.Image):
                # Keep the encoded bytes: decoding happens in our own robust decoder.
                dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
            elif not (isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")):
                raise SourceError(
                    f"column {image_column!r} of {name} is {feature}, not an Image feature or encoded bytes"
                )
            self.parts.append((split, dataset))
            self.lengths.append(_length(dataset, split, name, max_images))

        self._label_ids: dict[Any, int] | None = None  # None: the stored value is the id (ClassLabel)
        if label_column is None:
            self.classes = [UNLABELLED_CLASS]
        else:
            feature = self.parts[0][1].features[label_column]
            if isinstance(feature, datasets.ClassLabel):
                self.classes = list(feature.names)
                if class_names is not None:
                    if len(class_names) != len(self.classes):
                        raise SourceError(f"{name} has {len(self.classes)} classes, expected {len(class_names)}")
                    self.classes = list(class_names)
            else:
                # Plain values (strings, ints): sorted distinct values -> 0..K-1 (a streamed split:
                # one pass over its label column first).
                values = sorted({v for (_, d), n in zip(self.parts, self.lengths)
                                 for v in self._distinct(d, label_column, n) if v is not None})
                self._label_ids = {value: index for index, value in enumerate(values)}
                self.classes = [str(value) for value in values]
        super().__init__(sum(self.lengths), max_images)

    @staticmethod
    def _distinct(dataset: Any, column: str, rows: int) -> set:
        if not _streamed(dataset):
            return set(dataset.unique(column))
        return {value for _, batch in _batches(dataset.select_columns([column]), 0, rows) for value in batch[column]}

    def _label(self, value: Any) -> int | None:
        if self.label_column is None:
            return 0
        if value is None:
            return None
        if self._label_ids is None:
            return int(value) if 0 <= int(value) < len(self.classes) else None
        return self._label_ids[value]

    def _items(self, start: int, stop: int) -> Iterator[Item]:
        offset = 0
        for (split, dataset), count in zip(self.parts, self.lengths):
            first, last = max(start - offset, 0), min(stop - offset, count)
            offset += count
            if first >= last:
                continue
            for batch_start, batch in _batches(dataset, first, last):
                for k, image in enumerate(batch[self.image_column]):
                    source = f"{self.name}/{split}#{batch_start + k}"
                    raw_label = batch[self.label_column][k] if self.label_column else None
                    label_id = self._label(raw_label)
                    caption = batch[self.caption_column][k] if self.caption_column else None
                    caption = (caption.strip() or None) if isinstance(caption, str) else None
                    data, path = (image.get("bytes"), image.get("path")) if isinstance(image, dict) else (image, None)
                    reject = None
                    if label_id is None:
                        reject = ("no-label", f"label {raw_label!r} is missing or outside the class list")
                    elif data is None and not path:
                        reject = ("missing-image", f"column {self.image_column!r} is empty")
                    yield Item(
                        source=source,
                        label_id=label_id,
                        caption=caption,
                        kind="hf",
                        data=data,
                        path=path if data is None else None,
                        reject=reject,
                    )


def open_huggingface(config: SourceConfig) -> Source:
    target = config.path or config.hf_name
    if not target:
        raise SourceError("ingest.source.kind=huggingface needs ingest.source.hf_name (or a local ingest.source.path)")
    try:
        dataset = load_hf_dataset(target, split=config.hf_split, streaming=config.hf_streaming)
    except SourceError:
        raise
    except Exception as error:
        raise SourceError(
            f"cannot load the Hugging Face dataset {target!r} split {config.hf_split!r}: "
            f"{type(error).__name__}: {error} (check ingest.source.hf_name / path / hf_split)"
        ) from error
    name = short_name(config.hf_name or target)
    return HuggingFaceSource(
        [(config.hf_split, dataset)],
        name=name,
        image_column=config.hf_image_column,
        label_column=config.hf_label_column,
        caption_column=config.hf_caption_column,
        max_images=config.max_images,
    )
