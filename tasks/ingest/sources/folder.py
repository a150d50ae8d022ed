"""A local image folder: each first-level subfolder is a class, `<stem>.txt` beside an image its caption."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from tasks.config import SourceConfig
from tasks.ingest.sources.base import Item, Source, SourceError

# Raster formats Pillow decodes that people keep photos and drawings in, plus SVG.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".qoi", ".avif", ".svg"}
)  # fmt: skip


@dataclass(frozen=True)
class FileEntry:
    """One image file of a folder source, relative to its root."""

    path: str
    label_id: int | None
    caption_path: str | None = None
    reject: tuple[str, str] | None = None


def walk_files(directory: Path, extensions: frozenset[str]) -> list[Path]:
    """Files under `directory` (any depth, symlinks followed once) with one of the extensions."""
    found: list[Path] = []
    seen: set[str] = set()
    for current, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:  # a symlink loop, or the same folder linked twice
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in extensions:
                found.append(Path(current) / name)
    return found


def class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8-sig", errors="replace")


def whole_caption(path: Path) -> str | None:
    return " ".join(read_text(path).split()) or None


class FileSource(Source):
    """A sorted list of files under `root`, read lazily; captions are read for the items asked for."""

    def __init__(
        self,
        root: Path,
        classes: list[str],
        entries: list[FileEntry],
        *,
        description: str,
        read_caption: Callable[[Path], str | None],
        max_images: int | None,
    ):
        self.root = root
        self.classes = classes
        self.entries = sorted(entries, key=lambda entry: PurePosixPath(entry.path).parts)
        self.description = description
        self.read_caption = read_caption
        super().__init__(len(self.entries), max_images)

    def _caption(self, entry: FileEntry) -> str | None:
        if entry.caption_path is None:
            return None
        try:
            return self.read_caption(self.root / entry.caption_path)
        except OSError:
            return None  # an unreadable caption file leaves the image without a caption

    def _items(self, start: int, stop: int) -> Iterator[Item]:
        for entry in self.entries[start:stop]:
            yield Item(
                source=entry.path,
                label_id=entry.label_id,
                caption=self._caption(entry),
                kind="file",
                path=str(self.root / entry.path),
                reject=entry.reject,
            )


def open_folder(config: SourceConfig) -> Source:
    if not config.path:
        raise SourceError("ingest.source.kind=folder needs ingest.source.path (the image folder)")
    root = Path(config.path).expanduser().resolve()
    if not root.is_dir():
        raise SourceError(f"ingest.source.path {root} is not a folder")
    classes = class_folders(root)
    entries = []
    for path in walk_files(root, IMAGE_EXTENSIONS):
        relative = path.relative_to(root)
        caption = path.with_suffix(".txt")
        caption_path = caption.relative_to(root).as_posix() if caption.is_file() else None
        if len(relative.parts) == 1:
            reject = ("no-class", f"images must sit inside a class folder (a first-level subfolder of {root})")
            entries.append(FileEntry(relative.as_posix(), None, caption_path, reject))
        else:
            entries.append(FileEntry(relative.as_posix(), classes.index(relative.parts[0]), caption_path))
    if not entries:
        raise SourceError(
            f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under ingest.source.path {root}"
        )
    return FileSource(
        root, classes, entries, description=f"folder {root}", read_caption=whole_caption, max_images=config.max_images
    )
