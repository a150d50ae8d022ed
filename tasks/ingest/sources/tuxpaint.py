"""Tux Paint stamps (Debian: tuxpaint-stamps-default): category folder = class, .txt = caption.

Layout of /usr/share/tuxpaint/stamps: `<category>/<any/sub/folders>/<stamp>.{png,svg,jpg}`
with `<stamp>.txt` (first line: the English description, then `lang.utf8=...` translations),
`<stamp>.dat` and sounds beside it. A stamp may ship both an SVG and a PNG of the same picture;
Tux Paint shows the SVG, so do we (the PNG when SVGs are not rasterised). `<stamp>_mirror.png`
and `<stamp>_flip.png` are hand-drawn mirrored versions; they share `<stamp>.txt`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tasks.config import SourceConfig
from tasks.ingest.sources.base import Source, SourceError
from tasks.ingest.sources.folder import FileEntry, FileSource, class_folders, read_text, walk_files

DEFAULT_DIR = "/usr/share/tuxpaint/stamps"
DEBIAN_PACKAGE = "tuxpaint-stamps-default"
EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".svg"})
_VARIANT_SUFFIXES = ("_mirror", "_flip")


def first_line_caption(path: Path) -> str | None:
    lines = read_text(path).splitlines()
    return (lines[0].strip() or None) if lines else None


def caption_file(image: Path) -> Path | None:
    own = image.with_suffix(".txt")
    if own.is_file():
        return own
    for suffix in _VARIANT_SUFFIXES:
        if image.stem.endswith(suffix):
            shared = image.with_name(image.stem[: -len(suffix)] + ".txt")
            if shared.is_file():
                return shared
    return None


def pick_stamp_files(files: list[Path], rasterize_svg: bool) -> list[Path]:
    """One file per stamp (folder + stem): the SVG if it will be rasterised, else a raster one."""
    by_stamp: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    for path in files:
        by_stamp[(path.parent, path.stem)].append(path)
    order = {".svg": 0 if rasterize_svg else 9, ".png": 1, ".jpg": 2, ".jpeg": 3}
    return [min(group, key=lambda p: (order[p.suffix.lower()], p.name)) for group in by_stamp.values()]


def open_tuxpaint(config: SourceConfig) -> Source:
    root = Path(config.path or DEFAULT_DIR).expanduser().resolve()
    if not root.is_dir():
        raise SourceError(
            f"Tux Paint stamps not found at {root}: install the Debian package {DEBIAN_PACKAGE} "
            f"(apt-get install {DEBIAN_PACKAGE}) or set ingest.source.path to a stamps folder"
        )
    classes = class_folders(root)
    files, entries = walk_files(root, EXTENSIONS)
    for path in pick_stamp_files(files, config.rasterize_svg):
        relative = path.relative_to(root)
        caption = caption_file(path)
        caption_path = caption.relative_to(root).as_posix() if caption is not None else None
        if len(relative.parts) == 1:
            reject = ("no-class", f"stamps must sit inside a category folder of {root}")
            entries.append(FileEntry(relative.as_posix(), None, caption_path, reject))
        else:
            entries.append(FileEntry(relative.as_posix(), classes.index(relative.parts[0]), caption_path))
    if not entries:
        raise SourceError(f"no stamp images (.png/.jpg/.svg) under {root} (ingest.source.path)")
    return FileSource(
        root,
        classes,
        entries,
        description=f"tuxpaint stamps {root}",
        read_caption=first_line_caption,
        max_images=config.max_images,
    )
