"""`tok1d gc`: record dead runs as killed, put aside what breaks the store's queries, and remove
what no run needs.

Runs and stage runs whose process died are recorded `killed` (flows/reconcile.py). Lineage files
that are not whole Parquet files (a full disk under a copy, a crashed file system) are moved to
`<store>/lineage-quarantine/<table>/`, never deleted, so every DuckDB query over
`experiments.duckdb` works again. Then stale temporary files, work dirs of completed stage runs
(of unfinished ones with `--resumable`) and, with `--artifacts`, artifacts no cache record names
are removed (tasks/gc.py: nothing a live process holds). `--dry-run` only lists.
"""

from __future__ import annotations

from pathlib import Path

from flows.reconcile import reconcile
from tasks import gc, lineage
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
    print(f"gc: {len(moves)} damaged lineage file(s) " + ("found" if dry_run else "quarantined")
          + f", {len(removals)} removal(s), {_mib(freed)} " + ("to free (dry run: nothing changed)" if dry_run else "freed"))
    return 0
