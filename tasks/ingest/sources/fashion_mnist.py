"""Fashion-MNIST from its idx files (Debian: dataset-fashion-mnist), else Hugging Face's copy."""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from tasks.config import SourceConfig
from tasks.ingest.sources.base import Item, Source, SourceError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_HF_NAME = "zalando-datasets/fashion_mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"

# The official class names, index = label id (github.com/zalandoresearch/fashion-mnist).
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

# (images, labels) file stems, in source order: the 60k training images, then the 10k test ones.
PARTS = (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_CHUNK_IMAGES = 1024
# Errors of a damaged file, raised by gzip/zlib while reading.
_READ_ERRORS = (OSError, EOFError, zlib.error)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _corrupt(path: Path, problem: str) -> SourceError:
    return SourceError(
        f"corrupt Fashion-MNIST file {path}: {problem}; reinstall the Debian package {DEBIAN_PACKAGE} "
        f"or point ingest.source.path at a folder with intact idx files"
    )


def _read_exact(handle: BinaryIO, size: int, path: Path) -> bytes:
    try:
        data = handle.read(size)
    except _READ_ERRORS as error:
        raise _corrupt(path, f"{type(error).__name__}: {error}") from error
    if len(data) != size:
        raise _corrupt(path, f"ends early (wanted {size} more bytes, got {len(data)})")
    return data


def _header(handle: BinaryIO, path: Path, magic: int, ndim: int) -> tuple[int, ...]:
    found = int.from_bytes(_read_exact(handle, 4, path), "big")
    if found != magic:
        raise _corrupt(path, f"magic number 0x{found:08x}, expected 0x{magic:08x}")
    return struct.unpack(f">{ndim}I", _read_exact(handle, 4 * ndim, path))


def read_idx_labels(path: Path) -> np.ndarray:
    with _open(path) as handle:
        (count,) = _header(handle, path, LABELS_MAGIC, 1)
        labels = np.frombuffer(_read_exact(handle, count, path), dtype=np.uint8)
        if handle.read(1):
            raise _corrupt(path, f"has bytes after its {count} labels")
    if labels.size and labels.max() >= len(CLASSES):
        raise _corrupt(path, f"label {labels.max()} outside 0..{len(CLASSES) - 1}")
    return labels


def read_idx_images_header(path: Path) -> tuple[int, int, int]:
    with _open(path) as handle:
        count, rows, cols = _header(handle, path, IMAGES_MAGIC, 3)
    return count, rows, cols


@dataclass(frozen=True)
class _IdxPart:
    images: Path
    labels: np.ndarray
    rows: int
    cols: int


class IdxSource(Source):
    """Fashion-MNIST idx files: train (60k) then t10k (10k), each image a 28x28 grey buffer."""

    def __init__(self, directory: Path, max_images: int | None):
        self.directory = directory
        self.classes = list(CLASSES)
        self.description = f"fashion-mnist idx files in {directory}"
        self.parts: list[_IdxPart] = []
        for images_stem, labels_stem in PARTS:
            images, labels_path = _find(directory, images_stem), _find(directory, labels_stem)
            if images is None or labels_path is None:
                missing = images_stem if images is None else labels_stem
                raise SourceError(
                    f"{directory} has some Fashion-MNIST files but not {missing}(.gz); reinstall the "
                    f"Debian package {DEBIAN_PACKAGE} or fix ingest.source.path"
                )
            labels = read_idx_labels(labels_path)
            count, rows, cols = read_idx_images_header(images)
            if count != len(labels):
                raise _corrupt(images, f"{count} images but {labels_path.name} has {len(labels)} labels")
            self.parts.append(_IdxPart(images, labels, rows, cols))
        super().__init__(sum(len(part.labels) for part in self.parts), max_images)

    def _items(self, start: int, stop: int) -> Iterator[Item]:
        offset = 0
        for part in self.parts:
            count = len(part.labels)
            first, last = max(start - offset, 0), min(stop - offset, count)
            offset += count
            if first >= last:
                continue
            size = part.rows * part.cols
            with _open(part.images) as handle:
                try:
                    handle.seek(16 + first * size)  # gzip seeks by decompressing forward
                except _READ_ERRORS as error:
                    raise _corrupt(part.images, f"{type(error).__name__}: {error}") from error
                for chunk_start in range(first, last, _CHUNK_IMAGES):
                    chunk_stop = min(chunk_start + _CHUNK_IMAGES, last)
                    data = _read_exact(handle, (chunk_stop - chunk_start) * size, part.images)
                    for index in range(chunk_start, chunk_stop):
                        at = (index - chunk_start) * size
                        yield Item(
                            source=f"fashion-mnist/{part.images.name}#{index}",
                            label_id=int(part.labels[index]),
                            caption=None,
                            kind="pixels",
                            data=data[at : at + size],
                            shape=(part.rows, part.cols),
                        )


def open_fashion_mnist(config: SourceConfig) -> Source:
    directory = Path(config.path or DEFAULT_DIR).expanduser()
    present = directory.is_dir() and any(_find(directory, stem) for part in PARTS for stem in part)
    if present:
        return IdxSource(directory, config.max_images)

    from tasks.ingest.sources.huggingface import HuggingFaceSource, load_hf_dataset, short_name

    name = config.hf_name or DEFAULT_HF_NAME
    try:
        dataset = load_hf_dataset(name)
        parts = [(split, dataset[split]) for split in ("train", "test")]
    except Exception as error:
        raise SourceError(
            f"Fashion-MNIST not found: no idx files (train-images-idx3-ubyte.gz, ...) in {directory}, and "
            f"the Hugging Face copy {name!r} could not be loaded ({type(error).__name__}: {error}). Install "
            f"the Debian package {DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE}), or set "
            f"ingest.source.path to a folder holding the idx files."
        ) from error
    return HuggingFaceSource(
        parts,
        name=short_name(name),
        image_column="image",
        label_column="label",
        caption_column=None,
        max_images=config.max_images,
        class_names=list(CLASSES),
    )
