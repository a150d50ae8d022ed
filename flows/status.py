"""`tok1d status`: the latest run and its stages, stages only earlier runs touched, the cache, and
the failures still open, from the lineage tables."""

from __future__ import annotations

import socket
from pathlib import Path

from flows.reconcile import reconcile
from tasks import lineage
from tasks.fingerprints import Depth, check_artifact
from tasks.leases import process_alive
from tasks.registry import STAGE_ORDER
from tasks.store import Manifest, Store

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

# The same metrics of given outputs (a run's): `$artifacts` is a list of artifact ids.
ARTIFACT_METRICS_SQL = f"""
    select stage, name, value, n, std, ci_low, ci_high from metrics
    where list_contains($artifacts, artifact_id) and name in {HEADLINE_METRICS!r}
    qualify row_number() over (partition by stage, name order by event_time desc) = 1
"""

LATEST_RUN_SQL = """
    select run_id, flow, preset, status, started_at from runs order by started_at desc nulls last limit 1
"""

# The latest attempt of each stage: within one run (`run_id = ?`), or of stages no run since has touched.
_STAGE_COLUMNS = "stage, status, cache_hit, output_artifact, started_at, ended_at, error, host, pid, run_id"
RUN_STAGES_SQL = f"""
    select {_STAGE_COLUMNS} from stages where run_id = $run
    qualify row_number() over (partition by stage order by event_time desc) = 1
"""
EARLIER_STAGES_SQL = f"""
    select {_STAGE_COLUMNS} from stages where stage not in (select stage from stages where run_id = $run)
    qualify row_number() over (partition by stage order by event_time desc) = 1
"""

# A failure is fixed once a later attempt of the same stage with the same cache key (same inputs,
# config and code) completed; only the others still need the user.
_FIXED = """exists (select 1 from stages later where later.stage = f.stage
                    and later.cache_key is not distinct from f.cache_key
                    and later.status = 'completed' and later.event_time > f.event_time)"""
OPEN_FAILURES_SQL = f"""
    select f.stage, f.ended_at, f.error, f.run_id from stages f
    where f.status = 'failed' and not {_FIXED} order by f.ended_at desc limit 5
"""
FIXED_FAILURES_SQL = f"select count(*) from stages f where f.status = 'failed' and {_FIXED}"
RUNS_SQL = """
    select count(*), count(*) filter (where status = 'killed'), count(*) filter (where status = 'failed'),
           count(*) filter (where status = 'failed' and exists (
               select 1 from runs later where later.config_hash = r.config_hash
               and later.status = 'completed' and later.started_at > r.started_at))
    from runs r
"""


def shown_status(status: str, host: str | None, pid: int | None) -> str:
    """A `running` stage whose process on this host is gone was killed: it never wrote its end
    event (the next run resumes it from its checkpoints)."""
    if status == "running" and pid is not None and host == socket.gethostname() and not process_alive(pid):
        return "killed"
    return status


def cache_state(store: Store, manifest: Manifest, complete: bool) -> str:
    """intact, damaged (a file missing or of another size), unverified or incomplete, from stat
    alone: status reads no artifact bytes (an ImageNet store holds hundreds of GB)."""
    if not complete:
        return "incomplete"
    check = check_artifact(store, manifest, Depth.STAT)
    return "damaged" if check.problems else ("intact" if check.intact else "unverified")


def _stage_key(row: tuple) -> int:
    return STAGE_ORDER.index(row[0]) if row[0] in STAGE_ORDER else len(STAGE_ORDER)


def _print_stages(title: str, rows: list[tuple]) -> None:
    if not rows:
        return
    print(f"{title}:")
    print(f"{'stage':<18}{'status':<11}{'cached':<8}{'finished':<21}artifact")
    for stage, status, cache_hit, artifact, _started, ended, error, host, pid, _run in sorted(rows, key=_stage_key):
        finished = ended.strftime("%Y-%m-%d %H:%M:%S") if ended else "-"
        print(f"{stage:<18}{shown_status(status, host, pid):<11}{'yes' if cache_hit else 'no':<8}{finished:<21}"
              f"{artifact or error or '-'}")


def print_headline(rows: list[tuple], title: str) -> None:
    """Headline metric rows (stage, name, value, n, std, ci_low, ci_high), in pipeline order, with N."""
    if not rows:
        return
    print(f"\n{title} (N = images or samples; KID +- std over subsets; 95% interval):")
    order = {name: i for i, name in enumerate(HEADLINE_METRICS)}
    for stage, name, value, n, std, low, high in sorted(
            rows, key=lambda r: (STAGE_ORDER.index(r[0]) if r[0] in STAGE_ORDER else 99, order[r[1]])):
        spread = f" +- {std:.4g}" if std is not None else (f" [{low:.4g}, {high:.4g}]" if low is not None else "")
        print(f"  {stage:<16}{name:<6}{value:>10.4g}{spread:<22} N={n if n is not None else '?'}")


def print_run_headline(store: Store, artifact_ids: list[str]) -> None:
    """The headline metrics of a run's outputs (what `tok1d run` ends with)."""
    connection = lineage.connect(store)
    try:
        rows = connection.execute(ARTIFACT_METRICS_SQL, {"artifacts": artifact_ids}).fetchall()
    finally:
        connection.close()
    print_headline(rows, "metrics of this run")


def print_status(root: Path) -> int:
    if not (root / "lineage").exists():
        print(f"no store at {root} (nothing has run there yet)")
        return 1
    store = Store(root)
    reconcile(store, found_by="tok1d status")
    connection = lineage.connect(store)
    try:
        total, killed, failed, rerun = connection.execute(RUNS_SQL).fetchone()
        latest_run = connection.execute(LATEST_RUN_SQL).fetchone()
        run_id = latest_run[0] if latest_run else None
        this_run = connection.execute(RUN_STAGES_SQL, {"run": run_id}).fetchall()
        earlier = connection.execute(EARLIER_STAGES_SQL, {"run": run_id}).fetchall()
        headline = connection.execute(LATEST_METRICS_SQL).fetchall()
        failures = connection.execute(OPEN_FAILURES_SQL).fetchall()
        fixed = connection.execute(FIXED_FAILURES_SQL).fetchone()[0]
    finally:
        connection.close()
    print(f"store: {store.location}" + (f" (mirror {store.root})" if store.remote is not None else ""))
    print(f"runs: {total} ({failed} failed" + (f", {rerun} of them rerun to completion" if rerun else "")
          + (f", {killed} killed" if killed else "") + ")")
    if latest_run:
        _, flow, preset, status, started = latest_run
        when = started.strftime("%Y-%m-%d %H:%M:%S") if started else "-"
        print(f"latest run: {run_id} ({flow}, preset {preset or '-'}) {status}, started {when}")
    _print_stages("\nstages of the latest run", this_run)
    _print_stages("\nstages the latest run did not include (their latest attempt, from earlier runs)", earlier)
    print_headline(headline, "metrics of the latest outputs")
    states = [(stage, cache_state(store, manifest, complete), manifest)
              for stage, _slot_key, manifest, complete in store.cache_records()]
    intact = sum(state == "intact" for _, state, _ in states)
    print(f"\ncache: {intact} intact of {len(states)} recorded outputs")
    for stage, state, manifest in states:
        print(f"  {stage:<16}{state:<11}{manifest.rows:>8} rows  {manifest.root}")
    if any(state == "unverified" for _, state, _ in states):
        print("  (unverified: a file's stat differs from its fingerprint; the next run that hits it hashes it, "
              "`tok1d verify` hashes every file)")
    if failures:
        print("\nfailures no later attempt has fixed:")
        for stage, ended, error, failed_run in failures:
            print(f"  {stage} at {ended:%Y-%m-%d %H:%M:%S} (run {failed_run}): {error}")
    if fixed:
        print(f"\n{fixed} earlier failure(s) fixed since by a completed attempt of the same stage and inputs"
              " (history: `select * from stages where status = 'failed'`)")
    print(f"\nquery: duckdb {store.duckdb_path} -c \"select stage, status, cache_hit from stages\"")
    return 0
