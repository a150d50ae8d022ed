"""`tok1d gc`: record dead runs as killed and put aside what breaks the store's queries.

Runs and stage runs whose process died are recorded `killed` (flows/reconcile.py). Lineage files
that are not whole Parquet files (a full disk under a copy, a crashed file system) are moved to
`<store>/lineage-quarantine/<table>/`, never deleted, so every DuckDB query over
`experiments.duckdb` works again. `--dry-run` only lists the damaged files.
"""

from __future__ import annotations

from pathlib import Path

from flows.reconcile import reconcile
from tasks import lineage
from tasks.store import Store


def print_gc(root: Path, dry_run: bool = False) -> int:
    if not (root / "lineage").exists():
        print(f"no store at {root} (nothing has run there yet)")
        return 1
    store = Store(root)
    if not dry_run:
        for lease in reconcile(store, found_by="tok1d gc"):
            print(f"recorded {lease.kind} {lease.record_id} as killed: {lease.reason}")
    moves = lineage.quarantine_damaged(store, dry_run=dry_run)
    verb = "would move" if dry_run else "moved"
    for source, target in moves:
        print(f"{verb} damaged lineage file {source.relative_to(root)} -> {target.relative_to(root)}")
    print(f"gc: {len(moves)} damaged lineage file(s) " + ("found (dry run: nothing moved)" if dry_run else "quarantined"))
    return 0
