"""WebDataset tar shards (ingest.source.kind=webdataset): `ingest.source.path` is one `.tar` or a
folder of them (any depth, sorted by path), read with the standard library's tarfile.

The WebDataset convention: a sample is the run of adjacent members sharing a key (the member
path up to the first dot of its file name, `n01440764_10026.jpg` -> key `n01440764_10026`,
extension `jpg`). Its image is the member with an image extension (jpg first, then jpeg, png,
webp, then any other raster extension), `.cls` its class number (an integer, as in ImageNet
shards) and `.txt` its caption. Class names are `classes.txt` beside the shards (line i = class
i) if present, else the class numbers themselves ("0".."K-1"); with no `.cls` at all every image
is one class. Order: shards by path, samples in tar order.

Shards must be uncompressed tars: listing reads only the 512-byte member headers (seeking past
the data), and each image is read by its offset in the shard by whoever processes it, so a
worker pool reads the shards in parallel and a resumed run jumps straight to its shard.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from tasks.config import SourceConfig
from tasks.ingest.sources.base import Item, Source, SourceError
from tasks.ingest.sources.folder import IMAGE_EXTENSIONS, walk_tree

UNLABELLED_CLASS = "image"
CLASS_NAMES_FILE = "classes.txt"
# Image extensions in the order a sample's image is chosen when it has several.
_PREFERRED = ("jpg", "jpeg", "png", "webp")
_IMAGE_EXTS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS) - {"svg"}
# WebDataset's split of a member path into key and extension (webdataset.tariterators.base_plus_ext).
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass(frozen=True)
class Sample:
    """One sample of a shard: where its image and caption bytes are, and its class number."""

    shard: int
    key: str
    image: tuple[str, int, int] | None  # (member name, data offset, size)
    caption: tuple[int, int] | None  # (offset, size) of the .txt member
    label: int | None
    reject: tuple[str, str] | None = None


def _shards(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files, _ = walk_tree(path)  # never out of the folder through a symlink
    return sorted((p for p in files if p.suffix == ".tar"), key=lambda p: p.relative_to(path).parts)


def _pick_image(members: dict[str, tarfile.TarInfo]) -> str | None:
    for ext in _PREFERRED:
        if ext in members:
            return ext
    others = sorted(ext for ext in members if ext.lower() in _IMAGE_EXTS)
    return others[0] if others else None


def _sample(shard: int, key: str, members: dict[str, tarfile.TarInfo], tar: tarfile.TarFile) -> Sample:
    ext = _pick_image(members)
    image = (members[ext].name, members[ext].offset_data, members[ext].size) if ext else None
    caption = (members["txt"].offset_data, members["txt"].size) if "txt" in members else None
    label, reject = None, None
    if "cls" in members:
        stream = tar.extractfile(members["cls"])
        text = stream.read(64).decode("utf-8", "replace").strip() if stream else ""
        if re.fullmatch(r"\d+", text):
            label = int(text)
        else:
            reject = ("no-label", f"{key}.cls holds {text!r}, not a class number")
    if image is None:
        reject = ("missing-image", f"sample {key} has no image member (it has {', '.join(sorted(members))})")
    return Sample(shard, key, image, caption, label, reject)


def list_samples(shards: list[Path], limit: int | None) -> list[Sample]:
    """The samples of the shards in order (the first `limit` of them if given)."""
    samples: list[Sample] = []
    for index, shard in enumerate(shards):
        try:
            with tarfile.open(shard, "r:") as tar:
                key, members = None, {}
                for info in tar:
                    match = _KEY_EXT.match(info.name)
                    if not info.isfile() or match is None:
                        continue
                    if match.group(1) != key:
                        if key is not None:
                            samples.append(_sample(index, key, members, tar))
                            if limit is not None and len(samples) >= limit:
                                return samples
                        key, members = match.group(1), {}
                    members.setdefault(match.group(2).lower(), info)
                if key is not None:
                    samples.append(_sample(index, key, members, tar))
        except (tarfile.TarError, OSError) as error:
            raise SourceError(
                f"WebDataset shard {shard} cannot be listed ({type(error).__name__}: {error}); shards must be "
                f"uncompressed .tar files (ingest.source.path)"
            ) from error
        if limit is not None and len(samples) >= limit:
            break
    return samples[:limit] if limit is not None else samples


class WebDatasetSource(Source):
    """Samples of tar shards; images are read by byte range (Item.span) where they are processed."""

    def __init__(self, root: Path, shards: list[Path], samples: list[Sample], classes: list[str] | None,
                 max_images: int | None):
        self.root, self.shards, self.samples = root, shards, samples
        self.description = f"webdataset {root} ({len(shards)} shard(s))"
        # Without any .cls member every image is in one class; with them, a sample without one
        # is set aside (no-label).
        self.labelled = any(sample.label is not None for sample in samples)
        if not self.labelled:
            classes = [UNLABELLED_CLASS]
        elif classes is None:
            classes = [str(i) for i in range(max(s.label for s in samples if s.label is not None) + 1)]
        self.classes = classes
        super().__init__(len(samples), max_images)

    def _name(self, shard: int) -> str:
        path = self.shards[shard]
        return path.name if self.root.is_file() else path.relative_to(self.root).as_posix()

    def _items(self, start: int, stop: int) -> Iterator[Item]:
        handles: dict[int, BinaryIO] = {}
        try:
            for sample in self.samples[start:stop]:
                shard = self.shards[sample.shard]
                name = f"{self._name(sample.shard)}/{sample.image[0] if sample.image else sample.key}"
                label, reject = (sample.label if self.labelled else 0), sample.reject
                if reject is None and (label is None or label >= len(self.classes)):
                    reject = ("no-label", f"class {label} of {sample.key} is missing or outside the class list")
                caption = None
                if sample.caption is not None and reject is None:
                    if sample.shard not in handles:
                        handles[sample.shard] = open(shard, "rb")
                    handle = handles[sample.shard]
                    handle.seek(sample.caption[0])
                    caption = " ".join(handle.read(sample.caption[1]).decode("utf-8", "replace").split()) or None
                yield Item(
                    source=name,
                    label_id=label if reject is None else None,
                    caption=caption,
                    kind="file",
                    path=str(shard),
                    span=sample.image[1:] if sample.image else None,
                    reject=reject,
                )
        finally:
            for handle in handles.values():
                handle.close()


def open_webdataset(config: SourceConfig) -> Source:
    if not config.path:
        raise SourceError("ingest.source.kind=webdataset needs ingest.source.path (a .tar shard or a folder of them)")
    root = Path(config.path).expanduser().resolve()
    if not root.exists():
        raise SourceError(f"ingest.source.path {root} does not exist")
    shards = _shards(root)
    if not shards:
        raise SourceError(f"no .tar shards under ingest.source.path {root}")
    samples = list_samples(shards, config.max_images)
    if not samples:
        raise SourceError(f"the WebDataset shards under {root} hold no samples")
    names_file = (root if root.is_dir() else root.parent) / CLASS_NAMES_FILE
    classes = None
    if names_file.is_file():
        classes = [line.strip() for line in names_file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    return WebDatasetSource(root, shards, samples, classes, config.max_images)
