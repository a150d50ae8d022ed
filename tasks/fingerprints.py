"""Stat fingerprints of artifact files: verifying a cache hit without reading the artifact.

Every file of an artifact is hashed in full once, when it is committed (`Store.commit_artifact`).
Its stat at that moment (size, mtime_ns, ctime_ns, inode), with the sha256 it had, is its
fingerprint, kept in `fingerprints/<stage>/<artifact id>.json`. A cache hit then only stats the
files: when every fingerprint matches, the bytes are the ones that were hashed, and nothing is
read (an ImageNet ingest table is ~138 GB; hashing it on each cached run read hundreds of GB).

A file whose stat differs (touched, copied, moved to another disk, replaced) is hashed again:
the same sha256 accepts it and refreshes its fingerprint, so the next hit reads nothing again;
another sha256 or size makes the artifact altered, as it always was, and the stage recomputes.
An artifact without fingerprints (committed before they existed) is hashed once the same way.

ctime is part of the fingerprint because no user can set it: bytes edited in place with the size
kept and the mtime put back (`os.utime`) still change it. What stat cannot see at all (bit rot,
a change within the clock tick of the commit itself, a file system without stable inodes) is
what `tok1d verify` is for: it hashes every file (`Depth.FULL`) and forgets the fingerprints of
a bad artifact, so its next cache hit hashes it too and recomputes it.

File timestamps come from a coarse kernel clock: a write within one tick of a file's last change
can leave its stat as it was (git's "racy clean" files). So a fingerprint is only taken of a file
whose ctime is `SETTLE_NS` in the past: a commit waits that long after the stage's last write
(at most 50 ms), and a file re-hashed just after a change is hashed again on the next hit.

Nothing a stage imports reaches this module, so changing it leaves every stage's code version,
and with it every cached output, as it is.
"""

from __future__ import annotations

import logging
import os
import stat as stat_mode
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tasks.hashing import sha256_file
from tasks.store import MANIFEST_NAME, FileRecord, Manifest, Store, atomic_write_text

log = logging.getLogger("tok1d")

# Longer than a kernel clock tick (<= 10 ms at HZ=100): a file whose ctime is this old when it is
# stat-ed shows any later write in its stat. (File systems with 1 s timestamps are not covered.)
SETTLE_NS = 50_000_000


class FileStat(BaseModel):
    """A file's stat at a moment its bytes had `sha256`: while the stat stays, so do the bytes."""

    model_config = ConfigDict(frozen=True)

    sha256: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, sha256: str, now: os.stat_result) -> "FileStat":
        return cls(sha256=sha256, size=now.st_size, mtime_ns=now.st_mtime_ns, ctime_ns=now.st_ctime_ns,
                   inode=now.st_ino)

    def matches(self, record: FileRecord, now: os.stat_result) -> bool:
        return self == FileStat.of(record.sha256, now)


class ArtifactFingerprints(BaseModel):
    """The fingerprints of one artifact's files (relative path -> FileStat), as last verified."""

    artifact_id: str
    files: dict[str, FileStat]


class Depth(Enum):
    """How far a check looks at an artifact's files."""

    STAT = "stat"  # never reads bytes (`tok1d status`): a differing fingerprint is 'unverified'
    FINGERPRINT = "fingerprint"  # cache hits: hashes only the files whose fingerprint differs
    FULL = "full"  # `tok1d verify`: hashes every file


class FileState(Enum):
    """What a check found out about one file."""

    INTACT = "intact"
    MISSING = "missing"
    ALTERED = "altered"
    UNVERIFIED = "unverified"  # stat differs from the fingerprint (or none), bytes not read


@dataclass(frozen=True)
class FileCheck:
    """One file of an artifact against its manifest record: its state, why, its fingerprint now."""

    path: Path
    state: FileState
    detail: str = ""
    fingerprint: FileStat | None = None  # set for intact files
    hashed: bool = False

    @property
    def message(self) -> str:
        return f"{self.state.value} {self.path}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class ArtifactCheck:
    """Every file of one artifact checked to some `Depth`."""

    manifest: Manifest
    files: tuple[FileCheck, ...]

    @property
    def problems(self) -> list[str]:
        """Why the artifact cannot be trusted (missing or altered files); empty if it can."""
        return [f.message for f in self.files if f.state in (FileState.MISSING, FileState.ALTERED)]

    @property
    def intact(self) -> bool:
        return all(f.state is FileState.INTACT for f in self.files)

    @property
    def hashed_files(self) -> int:
        return sum(f.hashed for f in self.files)

    @property
    def fingerprints(self) -> dict[str, FileStat]:
        return {r.path: f.fingerprint for r, f in zip(self.manifest.files, self.files) if f.fingerprint}


def fingerprints_path(store: Store, manifest: Manifest) -> Path:
    return store.root / "fingerprints" / manifest.stage / f"{manifest.artifact_id}.json"


def read_fingerprints(store: Store, manifest: Manifest) -> dict[str, FileStat]:
    """The recorded fingerprints of `manifest`'s files; empty when none (or unreadable: hash then)."""
    path = fingerprints_path(store, manifest)
    try:
        recorded = ArtifactFingerprints.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return {}
    return recorded.files if recorded.artifact_id == manifest.artifact_id else {}


def write_fingerprints(store: Store, manifest: Manifest, files: dict[str, FileStat]) -> None:
    recorded = ArtifactFingerprints(artifact_id=manifest.artifact_id, files=files)
    atomic_write_text(fingerprints_path(store, manifest), recorded.model_dump_json(indent=1))


def forget_fingerprints(store: Store, manifest: Manifest) -> None:
    fingerprints_path(store, manifest).unlink(missing_ok=True)


def _regular_stat(path: Path) -> os.stat_result | None:
    try:
        now = os.stat(path)
    except OSError:
        return None
    return now if stat_mode.S_ISREG(now.st_mode) else None


def check_file(path: Path, record: FileRecord, recorded: FileStat | None, depth: Depth) -> FileCheck:
    looked_at = time.time_ns()
    now = _regular_stat(path)
    if now is None:
        return FileCheck(path, FileState.MISSING)
    if now.st_size != record.bytes:
        return FileCheck(path, FileState.ALTERED, f"{now.st_size} bytes, the manifest records {record.bytes}")
    if depth is not Depth.FULL and recorded is not None and recorded.matches(record, now):
        return FileCheck(path, FileState.INTACT, fingerprint=recorded)
    if depth is Depth.STAT:
        why = "stat differs from its fingerprint" if recorded is not None else "no fingerprint recorded"
        return FileCheck(path, FileState.UNVERIFIED, why)
    # The stat taken before hashing is the one kept: a write during the hash changes the file's
    # stat again (it is settled), so that write can never hide behind this fingerprint.
    if sha256_file(path) != record.sha256:
        return FileCheck(path, FileState.ALTERED, "sha256 differs from the manifest", hashed=True)
    settled = now.st_ctime_ns < looked_at - SETTLE_NS
    return FileCheck(path, FileState.INTACT, fingerprint=FileStat.of(record.sha256, now) if settled else None,
                     hashed=True)


def check_artifact(store: Store, manifest: Manifest, depth: Depth,
                   recorded: dict[str, FileStat | None] | None = None) -> ArtifactCheck:
    """Check every file of `manifest` to `depth`, against `recorded` (default: the stored fingerprints)."""
    recorded = read_fingerprints(store, manifest) if recorded is None else recorded
    directory = manifest.directory(store)
    return ArtifactCheck(manifest, tuple(
        check_file(directory / record.path, record, recorded.get(record.path), depth) for record in manifest.files
    ))


def keep_fingerprints(store: Store, check: ArtifactCheck) -> None:
    """Keep the fingerprints of an intact artifact whose files were just hashed."""
    try:
        write_fingerprints(store, check.manifest, check.fingerprints)
    except OSError as error:  # a read-only store still hands out its hits (they hash again next time)
        log.warning("%s: could not record fingerprints of %s: %s", check.manifest.stage, check.manifest.root, error)


def verified_hit(store: Store, manifest: Manifest) -> bool:
    """Whether a cached artifact is intact, reading only files whose fingerprint differs."""
    check = check_artifact(store, manifest, Depth.FINGERPRINT)
    if check.intact and check.hashed_files:
        log.info("%s: re-hashed %d file(s) of %s whose stat changed: intact", manifest.stage, check.hashed_files,
                 manifest.root)
        keep_fingerprints(store, check)
    return check.intact


def _stat_files(folder: Path) -> dict[str, os.stat_result]:
    found = {}
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).as_posix()
        if relative != MANIFEST_NAME and (now := _regular_stat(path)) is not None:
            found[relative] = now
    return found


def stat_folder(folder: Path) -> dict[str, os.stat_result]:
    """The stat of every file in an output folder before it is committed (relative path -> stat),
    taken once the newest file is settled (waits at most `SETTLE_NS`)."""
    found = _stat_files(folder)
    wait_ns = max((now.st_ctime_ns for now in found.values()), default=0) + SETTLE_NS - time.time_ns()
    if wait_ns > 0:
        time.sleep(wait_ns / 1e9)
        found = _stat_files(folder)
    return found


def record_commit(store: Store, manifest: Manifest, before: dict[str, os.stat_result]) -> None:
    """Record the fingerprints of a just-committed artifact from `before` (`stat_folder` of its
    output folder, taken before the commit hashed it).

    Moving the folder into the store keeps each file's inode and times, so those stats stand for
    the bytes the commit hashed. When the store already held the same content, the commit kept
    that copy (and just hashed it): its own fingerprints stand, and only a file with neither
    matching is hashed here.
    """
    stored = read_fingerprints(store, manifest)
    directory = manifest.directory(store)
    recorded = {}
    for record in manifest.files:
        now = _regular_stat(directory / record.path)
        moved = FileStat.of(record.sha256, before[record.path]) if record.path in before else None
        kept = moved is not None and now is not None and moved.matches(record, now)
        recorded[record.path] = moved if kept else stored.get(record.path)
    check = check_artifact(store, manifest, Depth.FINGERPRINT, recorded=recorded)
    if check.intact:
        keep_fingerprints(store, check)
