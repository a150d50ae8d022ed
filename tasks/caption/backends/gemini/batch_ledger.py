"""The record of a stage run's Gemini batch jobs, kept in its work dir so that a rerun resumes them:

    <work dir>/gemini-batch/jobs.json                      one entry per request file (below)
    <work dir>/gemini-batch/requests/<digest[:16]>.jsonl   the request file, until its job is done

The work dir belongs to the stage's cache slot: it survives a kill or a failed run (the rerun of
the same configuration gets it back) and is removed when the stage completes, by which time
every recorded job's results are in the caption cache or recorded as failures.

Each step is recorded (atomically: temp file + rename) as soon as it happened and before the
next one starts: the request file and its sha256, then the uploaded file's name, then the batch
job's name. So a kill at any point leaves a ledger that names every job that was created,
except one whose creation was in flight; the job's display name carries the request file's
digest, by which the resuming run finds such a job among the project's batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from tasks.store import write_json

LEDGER_DIR = "gemini-batch"
LEDGER_VERSION = 1


@dataclass
class BatchEntry:
    """One request file and what became of it: uploaded (`file`), submitted (`job`), `done`."""

    digest: str
    image_ids: list[str]
    file: str | None = None
    job: str | None = None
    done: bool = False
    # The job's last known state (JOB_STATE_...), for the progress line of a resumed run.
    state: str | None = None

    @property
    def display_name(self) -> str:
        """The job's display name: how a job whose creation was not recorded is found again."""
        return f"tok1d-caption-{self.digest[:32]}"


@dataclass
class BatchLedger:
    """The entries of one work dir, written whole and atomically after every change."""

    root: Path
    entries: list[BatchEntry] = field(default_factory=list)

    @classmethod
    def open(cls, work_dir: Path) -> "BatchLedger":
        root = work_dir / LEDGER_DIR
        ledger = cls(root)
        path = ledger.path
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise RuntimeError(
                    f"gemini batch: cannot read the job record {path} ({type(error).__name__}); it names batch "
                    f"jobs already paid for: repair it, or delete it to submit the missing captions again"
                ) from None
            if data.get("version") != LEDGER_VERSION:
                raise RuntimeError(f"gemini batch: {path} has version {data.get('version')!r}, expected {LEDGER_VERSION}")
            ledger.entries = [BatchEntry(**entry) for entry in data["entries"]]
        return ledger

    @property
    def path(self) -> Path:
        return self.root / "jobs.json"

    def request_path(self, entry: BatchEntry) -> Path:
        return self.root / "requests" / f"{entry.digest[:16]}.jsonl"

    def save(self) -> None:
        write_json(self.path, {"version": LEDGER_VERSION, "entries": [asdict(entry) for entry in self.entries]})

    def covered(self) -> set[str]:
        """Images of the jobs not done yet: they are on their way, so no new job asks for them."""
        return {image_id for entry in self.entries if not entry.done for image_id in entry.image_ids}


def write_request_file(directory: Path, lines: Iterable[bytes]) -> tuple[Path, str]:
    """Stream JSONL lines to a temporary file, then rename it to its digest: (path, sha256).

    A kill leaves at most a hidden temporary file, never a request file that looks whole.
    """
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".request-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            for line in lines:
                handle.write(line)
                handle.write(b"\n")
                digest.update(line)
                digest.update(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        sha = digest.hexdigest()
        path = directory / f"{sha[:16]}.jsonl"
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path, sha


def file_digest(path: Path) -> str | None:
    """sha256 of a file, None if it does not exist."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
