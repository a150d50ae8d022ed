"""`tok1d status`: the latest run of each stage, the cache, and failures, from the lineage tables."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from tasks import lineage
from tasks.registry import STAGE_ORDER
from tasks.store import Store

# The headline metrics of each stage's latest output, with how many images or samples they are on.
HEADLINE_METRICS = ("psnr", "ssim", "rfid", "rkid", "gfid", "gkid")
LATEST_METRICS_SQL = f"""
    select m.stage, m.name, m.value, m.n, m.std, m.ci_low, m.ci_high
    from metrics m join (
        select stage, output_artifact from (
            select *, row_number() over (partition by stage order by event_time desc) as rn
            from stages where status = 'completed') where rn = 1) s
      on m.stage = s.stage and m.artifact_id = s.output_artifact
    where m.name in {HEADLINE_METRICS!r}
    qualify row_number() over (partition by m.stage, m.name order by m.event_time desc) = 1
"""

LATEST_STAGES_SQL = """
    select stage, status, cache_hit, output_artifact, started_at, ended_at, error, host, pid
    from (select *, row_number() over (partition by stage order by event_time desc) as rn from stages)
    where rn = 1
"""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def shown_status(status: str, host: str | None, pid: int | None) -> str:
    """A `running` stage whose process on this host is gone was killed: it never wrote its end
    event (the next run resumes it from its checkpoints)."""
    if status == "running" and pid is not None and host == socket.gethostname() and not _process_alive(pid):
        return "killed"
    return status


def print_status(root: Path) -> int:
    if not (root / "lineage").exists():
        print(f"no store at {root} (nothing has run there yet)")
        return 1
    store = Store(root)
    connection = lineage.connect(store)
    try:
        runs = connection.execute(
            "select count(*), count(*) filter (where status = 'failed') from runs"
        ).fetchone()
        # Pipeline order (the registry's); stages no longer registered go last.
        latest = sorted(connection.execute(LATEST_STAGES_SQL).fetchall(),
                        key=lambda row: STAGE_ORDER.index(row[0]) if row[0] in STAGE_ORDER else len(STAGE_ORDER))
        headline = connection.execute(LATEST_METRICS_SQL).fetchall()
        failures = connection.execute(
            "select stage, ended_at, error from stages where status = 'failed' order by ended_at desc limit 5"
        ).fetchall()
    finally:
        connection.close()
    print(f"store: {store.root}")
    print(f"runs: {runs[0]} ({runs[1]} failed)\n")
    print(f"{'stage':<18}{'status':<11}{'cached':<8}{'finished':<21}artifact")
    for stage, status, cache_hit, artifact, _started, ended, error, host, pid in latest:
        finished = ended.strftime("%Y-%m-%d %H:%M:%S") if ended else "-"
        print(f"{stage:<18}{shown_status(status, host, pid):<11}{'yes' if cache_hit else 'no':<8}{finished:<21}{artifact or error or '-'}")
    if headline:
        print("\nmetrics of the latest outputs (N = images or samples; KID +- std over subsets; 95% interval):")
        order = {name: i for i, name in enumerate(HEADLINE_METRICS)}
        for stage, name, value, n, std, low, high in sorted(
                headline, key=lambda r: (STAGE_ORDER.index(r[0]) if r[0] in STAGE_ORDER else 99, order[r[1]])):
            spread = f" +- {std:.4g}" if std is not None else (f" [{low:.4g}, {high:.4g}]" if low is not None else "")
            print(f"  {stage:<16}{name:<6}{value:>10.4g}{spread:<22} N={n if n is not None else '?'}")
    # Each output's files are hashed once: a store's artifacts can be gigabytes.
    cached = [(stage, manifest, "incomplete" if not complete else ("damaged" if manifest.problems(store) else "intact"))
              for stage, _slot_key, manifest, complete in store.cache_records()]
    print(f"\ncache: {sum(state == 'intact' for *_, state in cached)} intact of {len(cached)} recorded outputs")
    for stage, manifest, state in cached:
        print(f"  {stage:<16}{state:<11}{manifest.rows:>8} rows  {manifest.root}")
    if failures:
        print("\nrecent failures:")
        for stage, ended, error in failures:
            print(f"  {stage} at {ended:%Y-%m-%d %H:%M:%S}: {error}")
    print(f"\nquery: duckdb {store.duckdb_path} -c \"select stage, status, cache_hit from stages\"")
    return 0
