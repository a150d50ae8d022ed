"""`tok1d gc`: record dead runs as killed, put aside what breaks the store's queries, and remove
what no run needs.

Runs and stage runs whose process died are recorded `killed` (flows/reconcile.py). Lineage files
that are not whole Parquet files (a full disk under a copy, a crashed file system) are moved to
`<store>/lineage-quarantine/<table>/`, never deleted, so every DuckDB query over
`experiments.duckdb` works again. Then stale temporary files, work dirs of completed stage runs
(of unfinished ones with `--resumable`) and, with `--artifacts`, artifacts no cache record names
are removed (tasks/gc.py: nothing a live process holds). On a store on object storage the
mirror is tidied so, and the bucket loses its dead locks and, with `--artifacts`, the artifact
folders no record on it names (tasks/remote_gc.py). `--dry-run` only lists.
"""

from __future__ import annotations

from pathlib import Path

from flows.reconcile import reconcile
from tasks import gc, lineage
from tasks.remote_gc import plan_remote_gc, remove_remote
from tasks.store import Store


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def print_gc(root: Path, dry_run: bool = False, resumable: bool = False, artifacts: bool = False) -> int:
    if not (root / "lineage").exists():
        print(f"no store at {root} (nothing has run there yet)")
        return 1
    store = Store(root)
    if not dry_run:
        for lease in reconcile(store, found_by="tok1d gc"):
            print(f"recorded {lease.kind} {lease.record_id} as killed: {lease.reason}")
    moves = lineage.quarantine_damaged(store, dry_run=dry_run)
    for source, target in moves:
        print(f"{'would move' if dry_run else 'moved'} damaged lineage file {source.relative_to(root)} -> "
              f"{target.relative_to(root)}")
    removals = gc.plan_gc(store, resumable=resumable, artifacts=artifacts)
    for removal in removals:
        print(f"{'would remove' if dry_run else 'removed'} {removal.path.relative_to(root)} "
              f"({_mib(removal.bytes)}): {removal.reason}")
    freed = sum(r.bytes for r in removals) if dry_run else gc.remove(removals)
    count = len(removals)
    if store.remote is not None:  # the bucket's own leftovers (the lines above are the mirror's)
        remote_removals = plan_remote_gc(store.remote, artifacts=artifacts)
        for removal in remote_removals:
            print(f"{'would remove' if dry_run else 'removed'} {store.remote.url}/{removal.path} "
                  f"({_mib(removal.bytes)}, {len(removal.objects)} object(s)): {removal.reason}")
        freed += sum(r.bytes for r in remote_removals) if dry_run else remove_remote(store.remote, remote_removals)
        count += len(remote_removals)
    print(f"gc: {len(moves)} damaged lineage file(s) " + ("found" if dry_run else "quarantined")
          + f", {count} removal(s), {_mib(freed)} " + ("to free (dry run: nothing changed)" if dry_run else "freed"))
    return 0
