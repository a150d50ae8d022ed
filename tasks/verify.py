"""`tok1d verify`: hash every artifact file of a store again and name each bad one.

Cache hits trust a file whose stat matches its fingerprint (tasks/fingerprints.py). This is the
check that trusts nothing: bit rot, or bytes edited with the size kept and the times put back,
show up here. A bad artifact's fingerprints are forgotten, so its next cache hit hashes it, finds
it altered and recomputes the stage; an intact artifact's fingerprints are refreshed (a store
copied to another disk gets hits that read nothing again).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tasks.fingerprints import ArtifactCheck, Depth, check_artifact, forget_fingerprints, keep_fingerprints
from tasks.progress import Progress
from tasks.store import MANIFEST_NAME, Manifest, Store


@dataclass(frozen=True)
class Unreadable:
    """An artifact folder whose manifest is missing or unreadable: none of its files can be checked."""

    directory: Path
    reason: str

    @property
    def message(self) -> str:
        return f"unreadable {self.directory / MANIFEST_NAME} ({self.reason})"


@dataclass(frozen=True)
class Verification:
    """What verifying a store (or one stage of it) found."""

    checks: list[ArtifactCheck]
    unreadable: list[Unreadable]
    seconds: float

    @property
    def bad(self) -> list[tuple[str, str]]:
        """(stage, message) of every missing, altered or unreadable file."""
        found = [(check.manifest.stage, problem) for check in self.checks for problem in check.problems]
        return found + [(u.directory.parent.name, u.message) for u in self.unreadable]

    @property
    def files(self) -> int:
        return sum(len(check.files) for check in self.checks)

    @property
    def bytes(self) -> int:
        return sum(record.bytes for check in self.checks for record in check.manifest.files)


def stored_manifests(store: Store, stage: str | None = None) -> tuple[list[Manifest], list[Unreadable]]:
    """Every artifact of the store (of `stage`): the folders under artifacts/, and the ones cache
    records name whose folder is gone (all their files are missing)."""
    manifests: dict[str, Manifest] = {}
    unreadable = []
    for directory in sorted((store.root / "artifacts").glob(f"{stage or '*'}/*")):
        if not directory.is_dir() or directory.name.startswith("."):
            continue
        try:
            manifest = Store.read_manifest_in(directory)
        except (OSError, ValueError) as error:
            unreadable.append(Unreadable(directory, type(error).__name__))
            continue
        if manifest is None:
            unreadable.append(Unreadable(directory, "no manifest"))
        else:
            manifests[manifest.root] = manifest
    for record_stage, _slot, manifest, _complete in store.cache_records():
        if stage in (None, record_stage) and not (store.root / manifest.root).is_dir():
            manifests.setdefault(manifest.root, manifest)
    return list(manifests.values()), unreadable


def verify_store(store: Store, stage: str | None = None) -> Verification:
    """Hash every file of every artifact (of `stage`) against its manifest."""
    started = time.monotonic()
    manifests, unreadable = stored_manifests(store, stage)
    checks = []
    with Progress("verify", sum(len(m.files) for m in manifests), "hashing artifact files", unit="file") as progress:
        for manifest in manifests:
            check = check_artifact(store, manifest, Depth.FULL)
            progress.update(len(manifest.files))
            if check.intact:
                keep_fingerprints(store, check)
            else:
                forget_fingerprints(store, manifest)
            checks.append(check)
    return Verification(checks, unreadable, time.monotonic() - started)
