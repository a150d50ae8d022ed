"""Bringing a remote store's artifact into the local mirror, verified, before it counts as a hit.

A cache record on object storage names an artifact another machine (or an earlier mirror)
committed. It is a hit here only once its manifest is there and every file has the recorded
size and sha256; then the mirror holds it like a locally committed artifact, fingerprints
included, so later hits read no bytes. Files are downloaded under temporary names and the
manifest is written last, so a killed pull leaves an artifact folder without a manifest, which
no reader trusts and the next pull completes.
"""

from __future__ import annotations

import logging
import os

from tasks.fingerprints import record_commit, stat_folder, verified_hit
from tasks.hashing import sha256_file
from tasks.store import MANIFEST_NAME, Manifest, Store, atomic_write_bytes, temporary_path

log = logging.getLogger("tok1d")


def _local_copy(store: Store, manifest: Manifest) -> Manifest | None:
    try:
        return Store.read_manifest_in(store.root / manifest.root)
    except ValueError:
        return None  # a damaged manifest: pull the artifact again


def pull_artifact(store: Store, manifest: Manifest) -> bool:
    """Whether the mirror now holds `manifest`'s artifact intact (downloading what it lacks);
    False, with a warning, when the remote copy has no manifest or a file differs from it."""
    local = _local_copy(store, manifest)
    if local is not None and local.files == manifest.files and verified_hit(store, local):
        return True
    assert store.remote is not None
    where = f"{store.remote.url}/{manifest.root}"
    remote_manifest = store.remote.read_bytes(f"{manifest.root}/{MANIFEST_NAME}")
    if remote_manifest is None:
        log.warning("%s: the cache record names %s, which has no manifest (an unfinished upload): recomputing",
                    manifest.stage, where)
        return False
    if Manifest.model_validate_json(remote_manifest).files != manifest.files:
        log.warning("%s: the manifest at %s lists other files than its cache record: recomputing", manifest.stage, where)
        return False
    directory = store.root / manifest.root
    total = sum(record.bytes for record in manifest.files)
    log.info("%s: pulling %d file(s), %.1f MB, from %s", manifest.stage, len(manifest.files), total / 1e6, where)
    for record in manifest.files:
        path = directory / record.path
        if path.is_file() and path.stat().st_size == record.bytes and sha256_file(path) == record.sha256:
            continue  # left by an earlier, interrupted pull
        tmp = temporary_path(path)
        try:
            store.remote.get_file(f"{manifest.root}/{record.path}", tmp)
            if tmp.stat().st_size != record.bytes or sha256_file(tmp) != record.sha256:
                log.warning("%s: %s/%s differs from its manifest (altered on the remote store): recomputing",
                            manifest.stage, where, record.path)
                return False
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    before = stat_folder(directory)
    atomic_write_bytes(directory / MANIFEST_NAME, remote_manifest)
    record_commit(store, manifest, before)
    return True
