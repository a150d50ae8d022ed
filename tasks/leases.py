"""Leases: how a later process learns that a run or stage run died without writing its end.

A killed process writes nothing, so its last lineage event stays `running` forever. While a run
or stage run works it holds a lease, `<store>/leases/<kind>-<id>.json`: its host, pid and the
process's start time, plus the lineage fields its end event needs; a daemon thread refreshes the
file's mtime (the heartbeat). `reconcile` (called by every run, `tok1d status` and `tok1d gc`)
appends a `killed` event, never editing history, for each lease whose process is gone (same
host: the pid is not running, or runs another process, told by its start time) or whose
heartbeat expired (any host, e.g. a worker node sharing the store), then removes the lease.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from tasks.store import Store, atomic_write_text, host_tag, writer_tag

log = logging.getLogger("tok1d")

HEARTBEAT_S = 30.0
# A lease of another host whose heartbeat is older than this is dead; generous against NFS
# attribute caching and a stalled but living writer.
EXPIRY_S = 600.0
LEASES_DIR = "leases"
# `.<lease file>.<pid>-<host tag>.claimed`: a lease a reconciler took to record its death.
_CLAIMED = re.compile(r"\.(.+\.json)\.(\d+)-([0-9a-f]{8})\.claimed")


def process_start(pid: int) -> str | None:
    """When process `pid` started (boot id + start tick from /proc), to tell it from a later
    process that reuses its pid; None where /proc is not available."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counts from after the command name, which may hold spaces: split after ")".
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether process `pid` runs, and (given its `process_start`) is still the same process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    return started is None or process_start(pid) in (None, started)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"__datetime__": value.isoformat()}
    raise TypeError(f"cannot write {type(value).__name__} into a lease")


def _json_hook(value: dict) -> Any:
    return datetime.fromisoformat(value["__datetime__"]) if set(value) == {"__datetime__"} else value


class Lease:
    """Held (as a context manager) by a run or stage run while it works; `fields` are the lineage
    fields its `killed` event will carry if it dies."""

    def __init__(self, store: Store, kind: str, record_id: str, fields: dict[str, Any],
                 heartbeat_s: float = HEARTBEAT_S):
        self.path = store.root / LEASES_DIR / f"{kind}-{record_id}.json"
        self.body = {"kind": kind, "id": record_id, "host": socket.gethostname(), "pid": os.getpid(),
                     "process_start": process_start(os.getpid()), "fields": fields}
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kept = False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:  # removed by gc on another host that thought us dead: say so once
                log.warning("lease %s is gone: another process took this run for dead", self.path)
                return

    def __enter__(self) -> "Lease":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.body, default=_json_default))
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.path.stem}", daemon=True)
        self._thread.start()
        return self

    def keep(self) -> None:
        """Leave the lease behind on exit: the end event could not be written (a full disk), so
        the next reconcile records the run as killed instead of it staying `running`."""
        self._kept = True

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._kept:
            self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class DeadLease:
    """A lease whose holder is gone: what it was, and why it is taken for dead."""

    path: Path
    kind: str
    record_id: str
    host: str
    pid: int
    fields: dict[str, Any]
    reason: str


def dead_leases(store: Store, expiry_s: float = EXPIRY_S) -> list[DeadLease]:
    here = socket.gethostname()
    dead = []
    for path in sorted((store.root / LEASES_DIR).glob("*.json")):
        try:
            body = json.loads(path.read_text(), object_hook=_json_hook)
            age = time.time() - path.stat().st_mtime
        except (OSError, ValueError):
            continue  # being written or removed right now
        host, pid = body["host"], body["pid"]
        if host == here:
            if process_alive(pid, body.get("process_start")):
                continue
            reason = f"process {pid} on {host} is gone"
        elif age > expiry_s:
            reason = f"no heartbeat from {host} (pid {pid}) for {age:.0f} s"
        else:
            continue
        dead.append(DeadLease(path, body["kind"], body["id"], host, pid, body["fields"], reason))
    return dead


def _return_orphaned_claims(store: Store) -> None:
    """Put back the claims of reconcilers that died before recording the death they claimed (a
    kill of `tok1d status` or of a starting run), so that death is still recorded; a claimer on
    another host cannot be checked and keeps its claim."""
    for claimed in (store.root / LEASES_DIR).glob(".*.claimed"):
        match = _CLAIMED.fullmatch(claimed.name)
        if match is None or match.group(3) != host_tag() or process_alive(int(match.group(2))):
            continue
        try:
            os.replace(claimed, claimed.with_name(match.group(1)))
        except OSError:
            continue  # another reconciler put it back first


def reconcile(store: Store, found_by: str, record: Callable[[DeadLease, str], bool],
              expiry_s: float = EXPIRY_S) -> list[DeadLease]:
    """Call `record(lease, error)` for each dead lease (it appends the `killed` event and says
    whether it did), then remove the lease; returns those recorded. Safe to run from several
    processes at once: a lease is claimed by renaming it away first, so each death is recorded
    once, and a claim whose claimer died is put back for the next reconcile."""
    _return_orphaned_claims(store)
    found = []
    for lease in dead_leases(store, expiry_s):
        claimed = lease.path.with_name(f".{lease.path.name}.{writer_tag()}.claimed")
        try:
            os.replace(lease.path, claimed)
        except OSError:
            continue  # another process claimed it first
        at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        if record(lease, f"killed: {lease.reason} (found by {found_by} at {at})"):
            found.append(lease)
        claimed.unlink(missing_ok=True)
    return found
