"""A Hugging Face dataset (hub id, local data folder, or `save_to_disk` folder) as an image source."""

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


def load_hf_dataset(name_or_path: str, split: str | None = None) -> Any:
    """`datasets.load_from_disk` for a `save_to_disk` folder, else `datasets.load_dataset`."""
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
    return datasets.load_dataset(name_or_path, split=split)


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
        for split, dataset in parts:
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
                # Plain values (strings, ints): sorted distinct values -> 0..K-1.
                values = sorted({v for _, d in self.parts for v in d.unique(label_column) if v is not None})
                self._label_ids = {value: index for index, value in enumerate(values)}
                self.classes = [str(value) for value in values]
        super().__init__(sum(len(dataset) for _, dataset in self.parts), max_images)

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
        for split, dataset in self.parts:
            count = len(dataset)
            first, last = max(start - offset, 0), min(stop - offset, count)
            offset += count
            for batch_start in range(first, last, _BATCH):
                batch = dataset[batch_start : min(batch_start + _BATCH, last)]
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
        dataset = load_hf_dataset(target, split=config.hf_split)
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
