"""The shared copy of a store on object storage (s3://, gs://, any fsspec URL).

Object stores have no rename and no file locks, so a remote store is written in an order that
never shows a reader something half-made, and locked by conditional creates:

- An artifact's files are uploaded first and its `manifest.json` last; a cache record
  (`cache/<stage>/<key>.<slot>.json`) is uploaded only after the manifest it names. A reader
  counts a slot only when the record, the manifest and every file's sha256 agree, so a kill
  between two uploads leaves an orphan file, never a hit.
- Lineage records are immutable Parquet files with unique names: uploads never collide.
- The lock of a cache slot is an object created with "create only if absent" (S3 `If-None-Match:
  *`, GCS generation 0, exclusive open elsewhere; fsspec's `pipe_file(mode="create")`), rewritten
  by its holder every `HEARTBEAT_S` and taken over by a waiter once it is older than `EXPIRY_S`.

Each process works in a local mirror (tasks/store.py): stages read and write local files, the
mirror holds the work directories of unfinished runs, and finished results travel through here.
Credentials and endpoints come from the usual places of each filesystem (for S3: AWS_* variables,
AWS_ENDPOINT_URL, ~/.aws) or from FSSPEC_<PROTOCOL>_<OPTION> variables.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

log = logging.getLogger("tok1d")

HEARTBEAT_S = 30.0
# A lock not rewritten for this long belongs to a dead holder (the same margin as tasks/leases.py).
EXPIRY_S = 600.0
LOCKS_DIR = "locks"


def is_remote_url(location: str | os.PathLike) -> bool:
    """Whether `location` names object storage (`<protocol>://...`, but not `file://`)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


class RemoteStore:
    """Files of a store under one fsspec URL, addressed by their path relative to the store root."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        try:
            # Not fsspec's shared instance: the endpoint and credentials come from the environment
            # (AWS_ENDPOINT_URL, ...), which the instance cache does not key on.
            self.fs, self.base = fsspec.core.url_to_fs(self.url, skip_instance_cache=True)
        except (ImportError, ValueError) as error:
            protocol = self.url.split("://", 1)[0]
            hint = "pip install -c constraints.txt -e '.[s3]'" if protocol in ("s3", "s3a") else f"install the fsspec filesystem for {protocol}://"
            raise RuntimeError(f"cannot open the store {self.url} ({error}): {hint}") from None
        self.base = self.base.rstrip("/")

    def _key(self, relative: str) -> str:
        return f"{self.base}/{relative}"

    def check_reachable(self) -> None:
        """Fail early, naming the store, if its bucket cannot be listed (wrong endpoint, no bucket)."""
        bucket = self.base.split("/", 1)[0]
        try:
            self.fs.ls(bucket, detail=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"the store's bucket {bucket!r} does not exist ({self.url}); create it first") from None
        except (OSError, PermissionError) as error:
            raise OSError(f"cannot reach the store {self.url}: {error} (check the endpoint and credentials: "
                          "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY for s3://)") from error

    def read_bytes(self, relative: str) -> bytes | None:
        """The object's bytes; None if it does not exist."""
        try:
            return self.fs.cat_file(self._key(relative))
        except FileNotFoundError:
            return None

    def write_bytes(self, relative: str, data: bytes) -> None:
        self.fs.pipe_file(self._key(relative), data)

    def create_bytes(self, relative: str, data: bytes) -> bool:
        """Create the object only if it does not exist; False if it does."""
        try:
            self.fs.pipe_file(self._key(relative), data, mode="create")
        except FileExistsError:
            return False
        return True

    def put_file(self, local: Path, relative: str) -> None:
        self.fs.put_file(str(local), self._key(relative))

    def get_file(self, relative: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self._key(relative), str(local))

    def size(self, relative: str) -> int | None:
        try:
            return int(self.fs.info(self._key(relative))["size"])
        except FileNotFoundError:
            return None

    def age_s(self, relative: str) -> float | None:
        """Seconds since the object was last written; None if it does not exist."""
        try:
            modified = self.fs.modified(self._key(relative))
        except FileNotFoundError:
            return None
        if modified.tzinfo is None:
            modified = modified.replace(tzinfo=timezone.utc)
        return (datetime.now(timezone.utc) - modified).total_seconds()

    def delete(self, relative: str) -> None:
        try:
            self.fs.rm_file(self._key(relative))
        except FileNotFoundError:
            pass

    def list_files(self, relative_dir: str) -> list[str]:
        """Paths (relative to the store root) of every object under `relative_dir`."""
        return sorted(self.sizes(relative_dir))

    def sizes(self, relative_dir: str) -> dict[str, int]:
        """Bytes of every object under `relative_dir`, by path relative to the store root."""
        self.fs.invalidate_cache(self._key(relative_dir))
        try:
            found = self.fs.find(self._key(relative_dir), detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.base + "/"
        return {path[len(prefix):]: int(info.get("size") or 0) for path, info in found.items()
                if path.startswith(prefix) and info.get("type", "file") != "directory"}

    @contextmanager
    def lock(self, name: str, what: str, poll_s: float = 0.5, expiry_s: float = EXPIRY_S,
             heartbeat_s: float = HEARTBEAT_S) -> Iterator[None]:
        """Hold the lock object `locks/<name>.json` for the block, waiting while another process
        holds it; `what` names the work in the waiting message."""
        relative = f"{LOCKS_DIR}/{name}.json"
        body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode()
        waited_since = None
        while not self.create_bytes(relative, body):
            age = self.age_s(relative)
            if age is not None and age > expiry_s:
                log.warning("%s: taking over the lock %s/%s, not refreshed for %.0f s (its holder died)",
                            what, self.url, relative, age)
                self.delete(relative)
                continue
            if waited_since is None:
                waited_since = time.monotonic()
                holder = self.read_bytes(relative)
                log.info("%s: waiting for %s, which another process holds (%s)", what, relative,
                         holder.decode(errors="replace") if holder else "just released")
            time.sleep(poll_s)
            poll_s = min(poll_s * 1.5, 5.0)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(heartbeat_s):
                try:
                    self.write_bytes(relative, body)
                except OSError as error:  # the next beat tries again; expiry is generous
                    log.warning("%s: could not refresh the lock %s (%s)", what, relative, error)

        thread = threading.Thread(target=beat, name=f"lock-{name}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.delete(relative)
