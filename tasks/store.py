"""The artifact store: immutable, content-addressed stage outputs described by small manifests.

Layout of a store directory:

    artifacts/<stage>/<artifact_id>/   finished outputs (never modified; manifest.json inside)
    work/<stage>/<cache_key>/          in-progress state of a stage run (shards, checkpoints)
    cache/<stage>/<cache_key>.<n>.json cache index: the manifest a cache key produced
    lineage/<table>/*.parquet          append-only lineage records (see tasks/lineage.py)
    experiments.duckdb                 views over the lineage records

Every file is written under a temporary name and renamed into place, so a kill never leaves a
half-written file that looks whole. Prefect persists no results here: the cache records are
tok1d's results (flows/stage_task.py).

A store can also live on object storage (`Store("s3://bucket/prefix")`, any fsspec URL): then
`root` is a local mirror of it (`TOK1D_STORE_MIRROR`, by default under ~/.cache/tok1d/mirrors/)
where stages work as on a local store, and artifacts, cache records and lineage records travel
to and from the shared copy (tasks/remote_store.py says in what order, and why that is safe).
The mirror remembers its URL (`remote.json`), so `Store(<mirror>)` in a worker process is the
same remote store. Work directories and leases stay in the mirror: an unfinished run resumes on
the machine that ran it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, Field

from tasks.hashing import hash_value, sha256_file
from tasks.remote_store import RemoteStore, is_remote_url

MANIFEST_NAME = "manifest.json"
# In a mirror: the URL of the store it mirrors.
REMOTE_MARKER = "remote.json"
MIRROR_ENV = "TOK1D_STORE_MIRROR"


class FileRecord(BaseModel):
    """One file of an artifact, relative to the artifact directory."""

    model_config = ConfigDict(frozen=True)

    path: str
    sha256: str
    bytes: int


class TableRecord(BaseModel):
    """A Parquet table inside an artifact: a folder of shards."""

    model_config = ConfigDict(frozen=True)

    glob: str
    rows: int
    columns: dict[str, str]


class Manifest(BaseModel):
    """What a stage hands to the next one: where its output is and how to check it."""

    model_config = ConfigDict(frozen=True)

    stage: str
    artifact_id: str
    root: str  # artifact directory, relative to the store root
    files: list[FileRecord]
    tables: dict[str, TableRecord] = Field(default_factory=dict)
    rows: int = 0
    config_hash: str
    cache_key: str
    code_version: str
    summary: dict[str, Any] = Field(default_factory=dict)
    created_at: str

    def directory(self, store: "Store") -> Path:
        return store.root / self.root

    def path(self, store: "Store", relative: str) -> Path:
        return store.root / self.root / relative

    def table_glob(self, store: "Store", table: str) -> str:
        if table not in self.tables:
            raise KeyError(f"artifact {self.stage}/{self.artifact_id} has no table {table!r}; has {sorted(self.tables)}")
        return str(store.root / self.root / self.tables[table].glob)

    def table_files(self, store: "Store", table: str) -> list[Path]:
        pattern = self.tables[table].glob
        return sorted((store.root / self.root).glob(pattern))

    def problems(self, store: "Store") -> list[str]:
        """Why this artifact cannot be trusted (missing or altered files); empty if it is intact."""
        found = []
        directory = self.directory(store)
        for record in self.files:
            path = directory / record.path
            if not path.is_file():
                found.append(f"missing {path}")
            elif path.stat().st_size != record.bytes or sha256_file(path) != record.sha256:
                found.append(f"altered {path}")
        return found


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{writer_tag()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if absent) for the block: one process at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def host_tag(host: str | None = None) -> str:
    """A short, file-name-safe stand-in for a host name (this host's by default)."""
    return hashlib.sha256((host or socket.gethostname()).encode()).hexdigest()[:8]


def writer_tag() -> str:
    """`<pid>-<host tag>` of this process, put in the names of its temporary files: a kill leaves
    them behind, and `tok1d gc` (tasks/gc.py) removes them as soon as their writer is gone
    instead of waiting until they are old."""
    return f"{os.getpid()}-{host_tag()}"


def temporary_path(path: Path) -> Path:
    """A sibling name for writing `path` that no reader globbing for finished files matches:
    `.<name>.<pid>-<host tag>-<random>.tmp`."""
    return path.with_name(f".{path.name}.{writer_tag()}-{uuid.uuid4().hex[:8]}.tmp")


def local_root(location: str | Path) -> Path:
    """The directory tok1d works in for the store a user named: the store itself, or the mirror
    of a remote one (attached, and its bucket checked, on first use)."""
    if is_remote_url(location):
        return Store(location).root
    return Path(str(location).removeprefix("file://")).expanduser().resolve()


def default_mirror(url: str) -> Path:
    """Where the mirror of the store at `url` lives unless `TOK1D_STORE_MIRROR` says otherwise."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", url).strip("-")[:80]
    return cache / "tok1d" / "mirrors" / f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


class Store:
    """A directory holding every artifact, cache record and lineage record of a project, or the
    local mirror of one on object storage (`remote`)."""

    def __init__(self, root: str | Path):
        self.remote: RemoteStore | None = None
        if is_remote_url(root):
            url = str(root).rstrip("/")
            mirror = os.environ.get(MIRROR_ENV)
            self.root = Path(mirror).expanduser().resolve() if mirror else default_mirror(url)
            self._attach(url)
        else:
            self.root = Path(str(root).removeprefix("file://")).expanduser().resolve()
            marker = self.root / REMOTE_MARKER
            if marker.is_file():
                self.remote = RemoteStore(json.loads(marker.read_text())["url"])
        for sub in ("artifacts", "work", "cache", "lineage"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def _attach(self, url: str) -> None:
        marker = self.root / REMOTE_MARKER
        if marker.is_file():
            mirrored = json.loads(marker.read_text())["url"]
            if mirrored != url:
                raise ValueError(f"{self.root} mirrors the store {mirrored}, not {url}: set {MIRROR_ENV} to "
                                 "another folder (one mirror per store)")
            self.remote = RemoteStore(url)
            return
        self.remote = RemoteStore(url)
        self.remote.check_reachable()
        if self.root.exists() and any(self.root.iterdir()):
            raise ValueError(f"{self.root} is not empty and mirrors no store: give {url} its own {MIRROR_ENV}")
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({"url": url}))

    @property
    def location(self) -> str:
        """What the user named: the store's URL, or its directory."""
        return self.remote.url if self.remote is not None else str(self.root)

    def publish(self, path: Path) -> None:
        """Upload a finished file of the mirror to the same place in the remote store (a local
        store has nothing to do)."""
        if self.remote is not None:
            self.remote.put_file(path, path.relative_to(self.root).as_posix())

    def sync_folder(self, relative_dir: str) -> int:
        """Exchange the immutable, uniquely named files under `relative_dir` (lineage records)
        with the remote store: download those the mirror lacks and upload those the remote lacks
        (written while it could not be reached); how many files moved."""
        if self.remote is None:
            return 0
        remote = set(self.remote.list_files(relative_dir))
        moved = 0
        for relative in sorted(remote):
            local = self.root / relative
            if local.name.startswith((".", "_")) or local.exists():
                continue
            tmp = temporary_path(local)
            try:
                self.remote.get_file(relative, tmp)
                os.replace(tmp, local)
            finally:
                tmp.unlink(missing_ok=True)
            moved += 1
        for local in sorted((self.root / relative_dir).rglob("*")):
            relative = local.relative_to(self.root).as_posix()
            if local.is_file() and not local.name.startswith((".", "_")) and relative not in remote:
                self.publish(local)
                moved += 1
        return moved

    @contextmanager
    def slot_lock(self, stage: str, slot_key: str) -> Iterator[None]:
        """Held while one process computes a cache slot: a file lock in the work dir, and on a
        remote store also the slot's lock object, so processes on other machines wait too."""
        with exclusive_lock(self.work_dir(stage, slot_key) / ".lock"):
            if self.remote is None:
                yield
            else:
                with self.remote.lock(f"{stage}/{slot_key}", f"{stage} {slot_key[:12]}"):
                    yield

    @property
    def duckdb_path(self) -> Path:
        return self.root / "experiments.duckdb"

    def work_dir(self, stage: str, cache_key: str) -> Path:
        path = self.root / "work" / stage / cache_key[:24]
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------------ artifacts

    def commit_artifact(
        self,
        stage: str,
        source_dir: Path,
        *,
        tables: dict[str, TableRecord],
        config_hash: str,
        cache_key: str,
        code_version: str,
        summary: dict[str, Any],
    ) -> Manifest:
        """Move a finished output folder into the store under its content address."""
        source_dir = Path(source_dir)
        files = []
        for path in sorted(p for p in source_dir.rglob("*") if p.is_file()):
            relative = path.relative_to(source_dir).as_posix()
            if relative == MANIFEST_NAME or path.name.startswith("."):
                continue
            files.append(FileRecord(path=relative, sha256=sha256_file(path), bytes=path.stat().st_size))
        artifact_id = hash_value([[f.path, f.sha256] for f in files])[:32]
        target = self.root / "artifacts" / stage / artifact_id
        manifest = Manifest(
            stage=stage,
            artifact_id=artifact_id,
            root=target.relative_to(self.root).as_posix(),
            files=files,
            tables=tables,
            rows=sum(t.rows for t in tables.values()),
            config_hash=config_hash,
            cache_key=cache_key,
            code_version=code_version,
            summary=summary,
            created_at=utc_now(),
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            existing = self.read_manifest_in(target)
            if existing is not None and not existing.problems(self):
                # Same content already stored (e.g. a deterministic recompute): keep the original.
                shutil.rmtree(source_dir, ignore_errors=True)
                self._push_artifact(existing)
                return manifest.model_copy(update={"created_at": existing.created_at})
            shutil.rmtree(target)
        atomic_write_text(source_dir / MANIFEST_NAME, manifest.model_dump_json(indent=2))
        os.replace(source_dir, target)
        self._push_artifact(manifest)
        return manifest

    def _push_artifact(self, manifest: Manifest) -> None:
        """Upload an artifact's files, then its manifest (a reader trusts nothing before that).
        Files already there at their size are kept: the path is content-addressed, and a pull
        checks every sha256 anyway."""
        if self.remote is None:
            return
        directory = self.root / manifest.root
        for record in manifest.files:
            relative = f"{manifest.root}/{record.path}"
            if self.remote.size(relative) != record.bytes:
                self.remote.put_file(directory / record.path, relative)
        self.remote.put_file(directory / MANIFEST_NAME, f"{manifest.root}/{MANIFEST_NAME}")

    @staticmethod
    def read_manifest_in(directory: Path) -> Manifest | None:
        path = directory / MANIFEST_NAME
        if not path.exists():
            return None
        return Manifest.model_validate_json(path.read_text())

    # ------------------------------------------------------------------ cache index

    def cache_record_path(self, stage: str, cache_key: str, slot: int) -> Path:
        return self.root / "cache" / stage / f"{cache_key}.{slot}.json"

    def read_cache_record(self, stage: str, cache_key: str, slot: int) -> tuple[Manifest | None, bool]:
        """(manifest, complete) of a slot; (None, True) if the slot is free. On a remote store the
        remote record decides (another machine may have filled the slot), and is kept in the mirror."""
        path = self.cache_record_path(stage, cache_key, slot)
        if self.remote is not None:
            data = self.remote.read_bytes(path.relative_to(self.root).as_posix())
            if data is None and path.exists():
                data = self._finish_publishing(path)
            if data is None:
                return None, True
            if not path.exists() or path.read_bytes() != data:
                atomic_write_bytes(path, data)
        elif not path.exists():
            return None, True
        try:
            record = json.loads(path.read_text())
            return Manifest.model_validate(record["manifest"]), bool(record["complete"])
        except (ValueError, KeyError):
            return None, False  # unreadable record: treat the slot as used, never trust it

    def _finish_publishing(self, path: Path) -> bytes | None:
        """A slot recorded here but not on the remote store: its run committed, then lost the
        connection before the upload ended. Upload the artifact and the record now if the mirror's
        copy is intact (every file re-hashed: a rare path); else the slot is free."""
        try:
            record = json.loads(path.read_text())
            manifest = Manifest.model_validate(record["manifest"])
        except (ValueError, KeyError):
            return None
        if not record.get("complete") or self.read_manifest_in(self.root / manifest.root) is None or manifest.problems(self):
            return None
        self._push_artifact(manifest)
        self.publish(path)
        return path.read_bytes()

    def write_cache_record(
        self, stage: str, cache_key: str, slot: int, manifest: Manifest, complete: bool = True
    ) -> None:
        """Record what a slot holds; on a remote store after the artifact's manifest is there."""
        record = {"complete": complete, "manifest": manifest.model_dump(mode="json")}
        path = self.cache_record_path(stage, cache_key, slot)
        atomic_write_text(path, json.dumps(record, indent=2))
        self.publish(path)

    def cache_records(self) -> list[tuple[str, str, Manifest, bool]]:
        """(stage, slot key, manifest, complete) for every cache record in the store."""
        records = []
        for path in sorted((self.root / "cache").glob("*/*.json")):
            try:
                record = json.loads(path.read_text())
                manifest = Manifest.model_validate(record["manifest"])
            except (ValueError, KeyError):
                continue
            records.append((path.parent.name, path.stem, manifest, bool(record["complete"])))
        return records


def write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
