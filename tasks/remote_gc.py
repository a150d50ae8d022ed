"""What `tok1d gc` may delete from a store's remote copy on object storage, and deleting it.

The mirror's own files are tidied by tasks/gc.py; these are the bucket's objects:

- Lock objects (`locks/<stage>/<slot>.json`) not refreshed for `EXPIRY_S`: their holder died (a
  live holder rewrites its lock every 30 s, tasks/remote_store.py).
- With `artifacts`, artifact folders that no cache record on the bucket names: what an upload
  cut short left (its files before its manifest and record) and superseded outputs. A folder is
  kept while any lock of its stage is live (its writer may be uploading it) or while any of its
  objects is younger than `stale_s`.

A folder's manifest is deleted first, so a half-deleted folder never looks like an artifact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tasks.gc import STALE_S
from tasks.remote_store import EXPIRY_S, LOCKS_DIR, RemoteStore
from tasks.store import MANIFEST_NAME, Manifest


@dataclass(frozen=True)
class RemoteRemoval:
    """Objects of the remote store that gc deletes: one lock, or one artifact folder's objects."""

    path: str  # the lock or the folder, relative to the store root
    objects: tuple[str, ...]
    reason: str
    bytes: int


def _named_roots(remote: RemoteStore) -> set[str]:
    """The artifact folder of every cache record on the bucket (complete or not: a slot in use)."""
    roots = set()
    for relative in remote.list_files("cache"):
        data = remote.read_bytes(relative)
        try:
            roots.add(Manifest.model_validate(json.loads(data or b"")["manifest"]).root)
        except (ValueError, KeyError, TypeError):
            continue  # an unreadable record is never trusted (tasks/store.py): it names nothing
    return roots


def plan_remote_gc(remote: RemoteStore, *, artifacts: bool = False, stale_s: float = STALE_S,
                   lock_expiry_s: float = EXPIRY_S) -> list[RemoteRemoval]:
    """Everything gc would delete from the bucket now."""
    removals: list[RemoteRemoval] = []
    live_lock_stages: set[str] = set()
    for relative, size in sorted(remote.sizes(LOCKS_DIR).items()):
        age = remote.age_s(relative)
        if age is None:
            continue  # released while we looked
        if age > lock_expiry_s:
            removals.append(RemoteRemoval(relative, (relative,), f"lock not refreshed for {age:.0f} s (its holder died)", size))
        else:
            live_lock_stages.add(relative.split("/")[1])
    if not artifacts:
        return removals
    named = _named_roots(remote)
    folders: dict[str, dict[str, int]] = {}
    for relative, size in remote.sizes("artifacts").items():
        parts = relative.split("/")
        if len(parts) >= 4:  # artifacts/<stage>/<id>/<file...>
            folders.setdefault("/".join(parts[:3]), {})[relative] = size
    for folder, objects in sorted(folders.items()):
        stage = folder.split("/")[1]
        if folder in named or stage in live_lock_stages:
            continue
        ages = [remote.age_s(relative) for relative in objects]
        if any(age is None or age < stale_s for age in ages):
            continue  # young, or changing while we looked: perhaps a writer at work
        manifest = f"{folder}/{MANIFEST_NAME}"
        order = sorted(objects, key=lambda relative: relative != manifest)
        reason = "artifact no cache record on the bucket names" + ("" if manifest in objects else
                                                                   " (an upload cut short: no manifest)")
        removals.append(RemoteRemoval(folder, tuple(order), reason, sum(objects.values())))
    return removals


def remove_remote(remote: RemoteStore, removals: list[RemoteRemoval]) -> int:
    """Delete what `plan_remote_gc` listed; the bytes freed."""
    for removal in removals:
        for relative in removal.objects:
            remote.delete(relative)
    return sum(removal.bytes for removal in removals)
