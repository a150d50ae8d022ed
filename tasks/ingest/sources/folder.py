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


@dataclass(frozen=True, slots=True)  # slots: a listing of 1.28M files stays small
class FileEntry:
    """One image file of a folder source, relative to its root."""

    path: str
    label_id: int | None
    caption_path: str | None = None
    reject: tuple[str, str] | None = None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def walk_tree(root: Path, skip_hidden: bool = True) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every file under `root` (any depth), and the symlinks that lead out of it with their targets.

    Symlinks that stay inside `root` are followed (each folder once: loops and folders linked
    twice are walked once); one that leads out is never followed, so a source folder cannot make
    ingest read (or fingerprint) files elsewhere on the machine.
    """
    real_root = os.path.realpath(root)
    found: list[Path] = []
    escaped: list[tuple[Path, str]] = []
    seen: set[str] = set()

    def kept(path: Path) -> bool:
        """Whether to walk or list `path`; a symlink out of the root is recorded in `escaped`."""
        if skip_hidden and path.name.startswith("."):
            return False
        if path.is_symlink() and not _inside(os.path.realpath(path), real_root):
            escaped.append((path, os.path.realpath(path)))
            return False
        return True

    for current, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        # Real folders before symlinked ones, so a folder linked under another name keeps its own.
        dirs[:] = [d for d in sorted(dirs, key=lambda d: ((Path(current) / d).is_symlink(), d)) if kept(Path(current) / d)]
        found += [Path(current) / name for name in sorted(files) if kept(Path(current) / name)]
    return found, escaped


def walk_files(directory: Path, extensions: frozenset[str]) -> tuple[list[Path], list[FileEntry]]:
    """Files under `directory` with one of the extensions, and a rejected entry per symlink out of it."""
    files, escaped = walk_tree(directory)
    rejects = [
        FileEntry(path.relative_to(directory).as_posix(), None, None,
                  ("outside-source", f"a symlink to {target}, outside the source folder {directory}: not followed"))
        for path, target in escaped
        if path.suffix.lower() in extensions or os.path.isdir(path)
    ]
    return [path for path in files if path.suffix.lower() in extensions], rejects


def class_folders(root: Path) -> list[str]:
    """The class names: first-level subfolders, except hidden ones and symlinks leading out of `root`."""
    real_root = os.path.realpath(root)
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and _inside(os.path.realpath(p), real_root)
    )


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
    files, entries = walk_files(root, IMAGE_EXTENSIONS)
    for path in files:
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
