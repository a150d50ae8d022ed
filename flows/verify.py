"""`tok1d verify`: every artifact file of the store hashed again, each bad one named; exit 1 if any."""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.store import Store
from tasks.verify import verify_store


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def print_verification(root: Path, stage: str | None = None) -> int:
    """Print what `verify_store` found: 0 if every file is intact, 1 if any is bad, 2 for bad usage."""
    if not (root / "artifacts").is_dir():
        print(f"tok1d verify: no store at {root}", file=sys.stderr)
        return 2
    store = Store(root)
    if stage is not None and not (store.root / "artifacts" / stage).is_dir():
        present = sorted(p.name for p in (store.root / "artifacts").iterdir() if p.is_dir())
        print(f"tok1d verify: no artifacts of stage {stage!r} in {store.root}; stages with artifacts: "
              f"{', '.join(present) or 'none'}", file=sys.stderr)
        return 2
    result = verify_store(store, stage)
    print(f"store: {store.root}")
    for bad_stage, message in result.bad:
        print(f"  BAD {bad_stage}: {message}")
    artifacts = len(result.checks) + len(result.unreadable)
    summary = (f"{artifacts} artifacts, {result.files} files, {_size(result.bytes)} hashed in "
               f"{result.seconds:.1f} s")
    if result.bad:
        print(f"{summary}: {len(result.bad)} bad file(s); a run that needs them recomputes their stage")
        return 1
    print(f"{summary}: all intact")
    return 0
