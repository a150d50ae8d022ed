"""A cheap fingerprint of the files an ingest source reads, for the stage's cache key.

Sizes and modification times of every file under the source folder (inside symlinked folders
too): a changed, added or removed image makes a new key, so the stage never serves a stale
cached table.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tasks.config import IngestConfig
from tasks.ingest.sources.fashion_mnist import DEFAULT_DIR as FASHION_MNIST_DIR
from tasks.ingest.sources.folder import walk_tree
from tasks.ingest.sources.tuxpaint import DEFAULT_DIR as TUXPAINT_DIR

_DEFAULT_DIRS = {"fashion-mnist": FASHION_MNIST_DIR, "tuxpaint": TUXPAINT_DIR}


def source_fingerprint(config: IngestConfig) -> str:
    source = config.source
    directory = source.path or _DEFAULT_DIRS.get(source.kind)
    digest = hashlib.sha256(f"{source.kind}|{source.hf_name}|{source.hf_split}".encode())
    if directory is None or not Path(directory).expanduser().exists():
        return digest.hexdigest()[:16]
    root = Path(directory).expanduser().resolve()
    if root.is_file():  # one file (a WebDataset shard)
        stat = root.stat()
        digest.update(f"{root.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]
    # The same walk as the folder sources': inside symlinked folders too, never out of the root.
    files, escaped = walk_tree(root, skip_hidden=False)
    for path in sorted(files):
        try:
            stat = path.stat()
        except OSError:
            continue
        digest.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    for path, target in sorted(escaped):
        digest.update(f"{path.relative_to(root)}->{target}\n".encode())
    return digest.hexdigest()[:16]
