"""Cache keys of stage runs and verified cache hits (the Prefect cache policy in flows/ uses them).

A stage's cache key = stage name + stage code version + hash of its config section + the
artifact ids of its input manifests. A key can own several *slots*: when the artifact a slot
recorded is missing or altered, that slot is skipped and the stage recomputes into the next
one, so Prefect never hands back an output whose files are gone (Prefect itself would: its
cache record lives apart from our files). A hit is verified by the files' stat fingerprints,
hashing only files whose stat changed (tasks/fingerprints.py).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tasks.fingerprints import verified_hit
from tasks.hashing import hash_value
from tasks.mirror import pull_artifact
from tasks.store import Manifest, Store

MAX_SLOTS = 1000


@lru_cache(maxsize=1)
def git_revision() -> str | None:
    """The checkout's commit (with +dirty), recorded in lineage; None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def stage_cache_key(stage: str, stage_code: str, config_hash: str, inputs: dict[str, Manifest]) -> str:
    return hash_value(
        {
            "stage": stage,
            "code": stage_code,
            "config": config_hash,
            "inputs": {name: manifest.artifact_id for name, manifest in sorted(inputs.items())},
        }
    )


@dataclass(frozen=True)
class CacheSlot:
    """Where a stage run's output is recorded: a hit if `manifest` is set (and verified)."""

    key: str
    slot: int
    manifest: Manifest | None

    @property
    def slot_key(self) -> str:
        return f"{self.key}.{self.slot}"


def resolve_slot(store: Store, stage: str, key: str) -> CacheSlot:
    """The first slot of `key` that is either free (compute there) or holds an intact, complete
    artifact (a hit). Slots whose artifact is damaged or was recorded incomplete are skipped.

    Intact = every file's stat matches its fingerprint, or its bytes still have the recorded
    sha256; this is called several times per cached run (Prefect's cache policy, the runner), so
    a matching fingerprint reads no artifact bytes. On a remote store, the artifact of a record is
    first pulled into the mirror (tasks/mirror.py); one that cannot be pulled intact is skipped."""
    for slot in range(MAX_SLOTS):
        manifest, complete = store.read_cache_record(stage, key, slot)
        if manifest is None and complete:
            return CacheSlot(key, slot, None)
        if manifest is not None and complete and store.remote is not None and not pull_artifact(store, manifest):
            continue
        if manifest is not None and complete and verified_hit(store, manifest):
            return CacheSlot(key, slot, manifest)
    raise RuntimeError(f"{stage}: {MAX_SLOTS} invalidated cache slots for key {key}; clean {store.root / 'cache'}")
