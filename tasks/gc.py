"""What `tok1d gc` may remove from a store, and removing it, without touching a live writer's files.

- Work dirs (`work/<stage>/<key>/`) whose lock no process holds: those of a stage run that has
  completed since (a complete cache record of that key) always; those of an unfinished one (the
  checkpoints a rerun resumes from) only when asked (`resumable`). A held lock means a live
  stage run: its dir and everything in it are left alone.
- Temporary files of interrupted writes (`.<name>.<pid>-<host>-<random>.tmp`, claimed leases)
  whose writer, named in the file name (tasks/store.py `writer_tag`), is gone from this host,
  and any older than `stale_s`: every write renames its temporary file within moments, so an old
  one has no writer (the rule for other hosts' files and names without a writer).
- With `artifacts`, artifact folders that no cache record names (superseded or orphaned outputs);
  lineage keeps describing them.
"""

from __future__ import annotations

import fcntl
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.leases import process_alive
from tasks.store import Store, host_tag

STALE_S = 600.0
_TEMPORARY_SUFFIXES = (".tmp", ".claimed")
# `<pid>-<host tag>-<random>.tmp` at the end of a temporary file's name: who writes it.
_WRITER = re.compile(r"\.(\d+)-([0-9a-f]{8})-[^.]+\.tmp$")


@dataclass(frozen=True)
class Removal:
    """A file or folder gc removes, why, and how many bytes that frees."""

    path: Path
    reason: str
    bytes: int


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def lock_is_free(lock: Path) -> bool:
    """Whether no process holds the flock on `lock` (the runner holds it while computing)."""
    try:
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True
    except OSError:
        return True  # no lock file can be opened: nobody holds it


def dead_writer(path: Path) -> int | None:
    """The pid of the process that wrote temporary file `path` if it is gone from this host (a
    kill cut its write short); None when it may still be writing, is on another host, or the
    name does not say. A pid reused since only delays the removal until the file is stale."""
    match = _WRITER.search(path.name)
    if match is None or match.group(2) != host_tag() or process_alive(int(match.group(1))):
        return None
    return int(match.group(1))


def plan_gc(store: Store, *, resumable: bool = False, artifacts: bool = False, stale_s: float = STALE_S) -> list[Removal]:
    """Everything gc would remove now, in the order it removes it."""
    records = store.cache_records()
    # (stage, key cut as work dir names are) of every complete cache record: its work dir is done.
    finished = {(stage, slot_key[:24]) for stage, slot_key, _, complete in records if complete}
    removals: list[Removal] = []
    kept: set[Path] = set()  # work dirs left alone: live, or resumable and not asked for
    for work in sorted(p for p in (store.root / "work").glob("*/*") if p.is_dir()):
        if not lock_is_free(work / ".lock"):
            kept.add(work)
        elif (work.parent.name, work.name) in finished:
            removals.append(Removal(work, "work dir of a stage run that completed since", _size(work)))
        elif resumable:
            removals.append(Removal(work, "work dir of an unfinished stage run (what a rerun would resume from)", _size(work)))
        else:
            kept.add(work)
    removed = {r.path for r in removals}
    now = time.time()
    for path in sorted(store.root.rglob(".*")):
        if not path.is_file() or not path.name.endswith(_TEMPORARY_SUFFIXES):
            continue
        if any(parent in kept or parent in removed for parent in path.parents):
            continue
        writer = dead_writer(path)
        if writer is None and now - path.stat().st_mtime < stale_s:
            continue  # young: perhaps a writer at work
        reason = "temporary file of an interrupted write" + (f" (its writer, process {writer}, is gone)" if writer else "")
        removals.append(Removal(path, reason, path.stat().st_size))
    if artifacts:
        named = {manifest.root for _, _, manifest, _ in records}
        for folder in sorted(p for p in (store.root / "artifacts").glob("*/*") if p.is_dir()):
            if folder.relative_to(store.root).as_posix() not in named:
                removals.append(Removal(folder, "artifact no cache record names", _size(folder)))
    return removals


def remove(removals: list[Removal]) -> int:
    """Remove what `plan_gc` listed; the bytes freed."""
    freed = 0
    for removal in removals:
        if removal.path.is_dir():
            shutil.rmtree(removal.path, ignore_errors=True)
        else:
            removal.path.unlink(missing_ok=True)
        freed += removal.bytes
    return freed
