"""Lineage and results: append-only Parquet records + DuckDB views in `<store>/experiments.duckdb`.

Each event is its own small Parquet file, written under a temporary name and renamed, so any
number of processes can record stage runs at once without ever contending for DuckDB's
single-writer lock. The DuckDB file only holds views over those files; it is written once per
store (under a file lock, retried if a user holds the file open) and read-only afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.leases import DeadLease, reconcile
from tasks.measurement import read_measurements
from tasks.secrets import redact
from tasks.store import Manifest, Store, exclusive_lock
from tasks.tables import write_parquet_atomic

VIEWS_VERSION = "5"
# Damaged lineage files go here, outside the views' globs (`tok1d gc`).
QUARANTINE_DIR = "lineage-quarantine"
log = logging.getLogger("tok1d")

_TS = pa.timestamp("us", tz="UTC")
SCHEMAS: dict[str, pa.Schema] = {
    "run_events": pa.schema(
        [
            ("run_id", pa.string()),
            ("flow_run_id", pa.string()),
            ("flow", pa.string()),
            ("preset", pa.string()),
            ("config_hash", pa.string()),
            ("status", pa.string()),
            ("git_revision", pa.string()),
            ("started_at", _TS),
            ("ended_at", _TS),
            ("error", pa.string()),
            # The whole resolved configuration as JSON: `config->>'$.train_tokenizer.use_text'`.
            ("config", pa.string()),
            ("event_time", _TS),
            # The run's `--set key=value` list as given (what it changed from its preset).
            ("overrides", pa.list_(pa.string())),
        ]
    ),
    "stage_events": pa.schema(
        [
            ("stage_run_id", pa.string()),
            ("run_id", pa.string()),
            ("flow_run_id", pa.string()),
            ("stage", pa.string()),
            ("status", pa.string()),
            ("cache_hit", pa.bool_()),
            ("cache_key", pa.string()),
            ("config_hash", pa.string()),
            ("code_version", pa.string()),
            ("git_revision", pa.string()),
            ("output_artifact", pa.string()),
            ("started_at", _TS),
            ("ended_at", _TS),
            ("error", pa.string()),
            ("host", pa.string()),
            ("pid", pa.int64()),
            ("event_time", _TS),
        ]
    ),
    "artifacts": pa.schema(
        [
            ("artifact_id", pa.string()),
            ("stage", pa.string()),
            ("path", pa.string()),
            ("file", pa.string()),
            ("sha256", pa.string()),
            ("bytes", pa.int64()),
            ("rows", pa.int64()),
            ("config_hash", pa.string()),
            ("created_at", pa.string()),
        ]
    ),
    "lineage": pa.schema(
        [
            ("stage_run_id", pa.string()),
            ("run_id", pa.string()),
            ("stage", pa.string()),
            ("input_name", pa.string()),
            ("input_artifact", pa.string()),
            ("output_artifact", pa.string()),
            ("event_time", _TS),
        ]
    ),
    # Every logged training quantity of every training run, one row per (step, name): the loss
    # curves in SQL. Taken from the artifact's losses.jsonl when its stage run completes.
    "train_steps": pa.schema(
        [
            ("stage_run_id", pa.string()),
            ("run_id", pa.string()),
            ("stage", pa.string()),
            ("artifact_id", pa.string()),
            ("step", pa.int64()),
            ("name", pa.string()),
            ("value", pa.float64()),
            ("event_time", _TS),
        ]
    ),
    "metrics": pa.schema(
        [
            ("stage_run_id", pa.string()),
            ("run_id", pa.string()),
            ("stage", pa.string()),
            ("artifact_id", pa.string()),
            ("name", pa.string()),
            ("value", pa.float64()),
            # The protocol (tasks/measurement.py); null for plain summary numbers (step counts...).
            ("n", pa.int64()),
            ("implementation", pa.string()),
            ("reference", pa.string()),
            ("seed", pa.int64()),
            ("std", pa.float64()),
            ("ci_low", pa.float64()),
            ("ci_high", pa.float64()),
            ("event_time", _TS),
        ]
    ),
}

# Views users query. `stages` and `runs` show the latest event of each stage run / run.
VIEW_SQL = {
    "stages": """
        select * exclude (rn) from (
            select *, row_number() over (partition by stage_run_id order by event_time desc, status = 'running') as rn
            from stage_events) where rn = 1""",
    "runs": """
        select * exclude (rn) from (
            select *, row_number() over (partition by run_id order by event_time desc, status = 'running') as rn
            from run_events) where rn = 1""",
    # One row per metric of each artifact, with everything that produced it: the stage run that
    # computed the artifact (its config hash, code version, git revision; its run's preset and
    # overrides) and the nearest artifact of every stage upstream of it, found through `lineage`
    # (the tokenizer and generator with the sha256 of their weights).
    "provenance": """
        with recursive
        edges as (select distinct output_artifact, input_name, input_artifact from lineage),
        producers as (
            select * from stages where status = 'completed' and output_artifact is not null
            qualify row_number() over (partition by output_artifact order by cache_hit, event_time) = 1),
        measured as (
            select * from metrics
            qualify row_number() over (partition by artifact_id, name order by event_time) = 1),
        ancestry(artifact_id, of_stage, ancestor, depth) as (
            select distinct artifact_id, stage, artifact_id, 0 from measured
            union all
            select a.artifact_id, e.input_name, e.input_artifact, a.depth + 1
            from ancestry a join edges e on e.output_artifact = a.ancestor),
        upstream as (
            select artifact_id,
                   any_value(ancestor) filter (where of_stage = 'ingest') as ingest_artifact,
                   any_value(ancestor) filter (where of_stage = 'caption') as caption_artifact,
                   any_value(ancestor) filter (where of_stage = 'embed-text') as embed_text_artifact,
                   any_value(ancestor) filter (where of_stage = 'train-tokenizer') as tokenizer_artifact,
                   any_value(ancestor) filter (where of_stage = 'pretokenize') as pretokenize_artifact,
                   any_value(ancestor) filter (where of_stage = 'train-generator') as generator_artifact
            from (select * from ancestry
                  qualify row_number() over (partition by artifact_id, of_stage order by depth) = 1)
            group by artifact_id),
        weights as (
            select artifact_id, file, sha256 from artifacts
            where file in ('tokenizer.safetensors', 'generator.safetensors')
            qualify row_number() over (partition by artifact_id, file order by created_at desc) = 1)
        select m.stage, m.name as metric, m.value, m.n, m.std, m.ci_low, m.ci_high, m.implementation,
               m.reference, m.seed, m.artifact_id,
               u.ingest_artifact, u.caption_artifact, u.embed_text_artifact,
               u.tokenizer_artifact, tw.sha256 as tokenizer_sha256,
               u.pretokenize_artifact, u.generator_artifact, gw.sha256 as generator_sha256,
               r.preset, r.overrides, r.config_hash as run_config_hash, p.config_hash as stage_config_hash,
               p.code_version, coalesce(p.git_revision, r.git_revision) as git_revision,
               p.stage_run_id, p.run_id, r.flow_run_id, p.ended_at as produced_at
        from measured m
        left join producers p on p.output_artifact = m.artifact_id
        left join runs r on r.run_id = p.run_id
        left join upstream u on u.artifact_id = m.artifact_id
        left join weights tw on tw.artifact_id = u.tokenizer_artifact and tw.file = 'tokenizer.safetensors'
        left join weights gw on gw.artifact_id = u.generator_artifact and gw.file = 'generator.safetensors'""",
}


def now() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


def _table_dir(store: Store, table: str) -> Path:
    return store.root / "lineage" / table


def append(store: Store, table: str, rows: list[dict[str, Any]]) -> None:
    """Write `rows` as one new Parquet file of `table` (atomic rename, never a shared file)."""
    if not rows:
        return
    schema = SCHEMAS[table]
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    arrow = pa.table(columns, schema=schema)
    path = _table_dir(store, table) / f"{time.time_ns()}-{uuid.uuid4().hex[:12]}.parquet"
    write_parquet_atomic(arrow, path)
    try:
        store.publish(path)
    except OSError as error:  # the record is safe in the mirror; `sync_folder` uploads it later
        log.warning("lineage: could not upload %s to %s (%s); the next tok1d command on this machine uploads it",
                    path.name, store.location, error)


def _ensure_seed_files(store: Store) -> None:
    # A view over an empty glob fails to bind; a zero-row file per table keeps it valid. It also
    # holds every column of the current schema, so views naming a column added since (runs'
    # `overrides`) bind in a store whose records all predate it.
    for table, schema in SCHEMAS.items():
        seed = _table_dir(store, table) / "_schema.parquet"
        if not _holds_columns(seed, schema):
            write_parquet_atomic(schema.empty_table(), seed)


def _holds_columns(path: Path, schema: pa.Schema) -> bool:
    try:
        return set(schema.names) <= set(pq.read_schema(path).names)
    except (OSError, pa.ArrowException):  # missing, or cut: written anew
        return False


def _intact(path: Path) -> bool:
    """Whether a lineage file is a whole Parquet file (magic at both ends, a footer that fits).

    Records are renamed into place whole, so only outside damage (a full disk under a copy, a
    crashed file system) leaves a cut file; its end, where Parquet keeps the footer, is gone.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
            size = handle.seek(0, os.SEEK_END)
            if size < 12:
                return False
            handle.seek(size - 8)
            tail = handle.read(8)
    except OSError:
        return False
    return head == b"PAR1" and tail[4:] == b"PAR1" and int.from_bytes(tail[:4], "little") <= size - 12


def damaged_files(store: Store) -> list[Path]:
    """Lineage files that are not whole Parquet files: each breaks every query over its table."""
    return [path for table in SCHEMAS for path in sorted(_table_dir(store, table).glob("*.parquet")) if not _intact(path)]


def _sql_path(path: Path) -> str:
    return "'" + path.as_posix().replace("'", "''") + "'"


def define_views(connection: duckdb.DuckDBPyConnection, store: Store, temporary: bool = False,
                 skip: frozenset[Path] = frozenset()) -> None:
    """The lineage views; tables with a file in `skip` list their other files instead of a glob
    (only for temporary views: a stored view must keep seeing the files written after it)."""
    kind = "temp view" if temporary else "view"
    for table in SCHEMAS:
        folder = _table_dir(store, table)
        damaged = [path for path in skip if path.parent == folder]
        if damaged:
            files = ", ".join(_sql_path(p) for p in sorted(folder.glob("*.parquet")) if p not in skip)
            source = f"[{files}]"
        else:
            source = _sql_path(folder / "*.parquet")
        connection.execute(f"create or replace {kind} {table} as select * from read_parquet({source}, union_by_name = true)")
    for view, sql in VIEW_SQL.items():
        connection.execute(f"create or replace {kind} {view} as {sql}")


def database_lock(store: Store):
    """The lock every writer of `experiments.duckdb` takes (views here, sweep views in flows/sweep.py)."""
    return exclusive_lock(store.root / "lineage" / ".duckdb.lock")


def ensure_database(store: Store, attempts: int = 20) -> bool:
    """Create `experiments.duckdb` with its views once; True if it is (now) up to date.

    If another process (say a user's `duckdb` shell) holds the file, retry for a while and then
    give up quietly: the records are safe in Parquet and the views are created on a later run.
    """
    _ensure_seed_files(store)
    store.sync_folder("lineage")
    warn_damaged(store)
    # The views hold absolute paths: redefine them if the store moved or the views changed.
    marker = store.root / "lineage" / ".views"
    expected = f"{VIEWS_VERSION} {store.root.as_posix()}"

    def up_to_date() -> bool:
        return store.duckdb_path.exists() and marker.exists() and marker.read_text() == expected

    if up_to_date():
        return True
    with database_lock(store):
        if up_to_date():
            return True
        for attempt in range(attempts):
            try:
                # An older storage format so the `duckdb` CLI (duckdb-cli, 1.x) can open the file too.
                connection = duckdb.connect(
                    str(store.duckdb_path), config={"storage_compatibility_version": "v1.0.0"}
                )
            except duckdb.IOException:
                time.sleep(min(0.1 * 2**attempt, 2.0))
                continue
            try:
                define_views(connection, store)
            finally:
                connection.close()
            marker.write_text(expected)
            return True
    return False


def warn_damaged(store: Store) -> list[Path]:
    """Log one warning per damaged lineage file (see `damaged_files`) and return them."""
    damaged = damaged_files(store)
    for path in damaged:
        log.warning("lineage: %s is not a whole Parquet file: skipped here; queries of experiments.duckdb "
                    "fail until `tok1d gc --store %s` moves it to %s", path, store.root, QUARANTINE_DIR)
    return damaged


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the lineage views: never locks the experiments file; damaged
    lineage files are skipped with a warning. On a remote store, the records other machines wrote
    are pulled into the mirror first (and any this one could not upload, pushed)."""
    _ensure_seed_files(store)
    store.sync_folder("lineage")
    connection = duckdb.connect()
    define_views(connection, store, temporary=True, skip=frozenset(warn_damaged(store)))
    return connection


def quarantine_damaged(store: Store, dry_run: bool = False) -> list[tuple[Path, Path]]:
    """Move damaged lineage files to `<store>/lineage-quarantine/<table>/` (kept, never deleted)."""
    moves = []
    for path in damaged_files(store):
        target = store.root / QUARANTINE_DIR / path.parent.name / path.name
        if not dry_run:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        moves.append((path, target))
    return moves


# ---------------------------------------------------------------------------- records


def record_run(
    store: Store,
    *,
    run_id: str,
    flow_run_id: str | None,
    flow: str,
    preset: str,
    config_hash: str,
    status: str,
    git_revision: str | None,
    started_at: datetime,
    ended_at: datetime | None = None,
    error: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
) -> None:
    append(
        store,
        "run_events",
        [
            dict(
                run_id=run_id,
                flow_run_id=flow_run_id,
                flow=flow,
                preset=preset,
                config_hash=config_hash,
                status=status,
                git_revision=git_revision,
                started_at=started_at,
                ended_at=ended_at,
                error=redact(error) if error else None,
                config=redact(config) if config else None,
                overrides=[redact(item) for item in overrides] if overrides is not None else None,
                event_time=now(),
            )
        ],
    )


LOSS_LOG = "losses.jsonl"


def record_train_steps(store: Store, stage_run_id: str, run_id: str | None, manifest: Manifest) -> int:
    """The `train_steps` rows of an artifact with a loss log (the training stages'); how many."""
    if not any(f.path == LOSS_LOG for f in manifest.files):
        return 0
    rows = []
    for line in (store.root / manifest.root / LOSS_LOG).read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = int(entry.pop("step"))
        rows += [dict(stage_run_id=stage_run_id, run_id=run_id, stage=manifest.stage, artifact_id=manifest.artifact_id,
                      step=step, name=name, value=float(value))
                 for name, value in entry.items() if isinstance(value, (int, float))]
    event_time = now()
    append(store, "train_steps", [{**row, "event_time": event_time} for row in rows])
    return len(rows)


def record_stage_event(
    store: Store,
    *,
    stage_run_id: str,
    run_id: str | None,
    flow_run_id: str | None,
    stage: str,
    status: str,
    cache_hit: bool,
    cache_key: str,
    config_hash: str,
    code_version: str,
    git_revision: str | None,
    started_at: datetime,
    ended_at: datetime | None = None,
    output: Manifest | None = None,
    inputs: dict[str, Manifest] | None = None,
    error: str | None = None,
    host: str | None = None,
    pid: int | None = None,
) -> None:
    """One event of a stage run; `host`/`pid` default to this process (a `killed` event names
    the dead process instead)."""
    event_time = now()
    append(
        store,
        "stage_events",
        [
            dict(
                stage_run_id=stage_run_id,
                run_id=run_id,
                flow_run_id=flow_run_id,
                stage=stage,
                status=status,
                cache_hit=cache_hit,
                cache_key=cache_key,
                config_hash=config_hash,
                code_version=code_version,
                git_revision=git_revision,
                output_artifact=output.artifact_id if output else None,
                started_at=started_at,
                ended_at=ended_at,
                error=redact(error) if error else None,
                host=host or socket.gethostname(),
                pid=pid or os.getpid(),
                event_time=event_time,
            )
        ],
    )
    if output is None:
        return
    append(
        store,
        "lineage",
        [
            dict(
                stage_run_id=stage_run_id,
                run_id=run_id,
                stage=stage,
                input_name=name,
                input_artifact=manifest.artifact_id,
                output_artifact=output.artifact_id,
                event_time=event_time,
            )
            for name, manifest in sorted((inputs or {}).items())
        ],
    )
    if not cache_hit:
        append(
            store,
            "artifacts",
            [
                dict(
                    artifact_id=output.artifact_id,
                    stage=stage,
                    path=output.root,
                    file=record.path,
                    sha256=record.sha256,
                    bytes=record.bytes,
                    rows=output.rows,
                    config_hash=output.config_hash,
                    created_at=output.created_at,
                )
                for record in output.files
            ],
        )
    rows = {
        name: dict(name=name, value=float(value))
        for name, value in output.summary.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    for name, measured in read_measurements(output.summary).items():
        # A measured metric replaces the bare number of the same name: one row, with its protocol.
        rows[name] = dict(name=name, value=measured.value, n=measured.n, implementation=measured.implementation,
                          reference=measured.reference, seed=measured.seed, std=measured.std,
                          ci_low=measured.low, ci_high=measured.high)
    common = dict(stage_run_id=stage_run_id, run_id=run_id, stage=stage, artifact_id=output.artifact_id,
                  event_time=event_time)
    append(store, "metrics", [{**common, **row} for _, row in sorted(rows.items())])


def _latest_status(store: Store, kind: str, record_id: str) -> str | None:
    view, key = ("stages", "stage_run_id") if kind == "stage" else ("runs", "run_id")
    connection = connect(store)
    try:
        row = connection.execute(f"select status from {view} where {key} = ?", [record_id]).fetchone()
    finally:
        connection.close()
    return row[0] if row else None


def record_killed(store: Store, lease: DeadLease, error: str) -> bool:
    """The `killed` end event of a run or stage run whose process died holding its lease; none
    (False) if it had written its end after all (it died between that and dropping the lease)."""
    if _latest_status(store, lease.kind, lease.record_id) in ("completed", "failed", "killed"):
        return False
    if lease.kind == "stage":
        record_stage_event(store, status="killed", ended_at=now(), error=error, host=lease.host, pid=lease.pid,
                           **lease.fields)
    else:
        record_run(store, status="killed", ended_at=now(), error=error, **lease.fields)
    return True


def reconcile_store(store: Store, found_by: str) -> list[DeadLease]:
    """Record every run and stage run whose process died (see tasks/leases.py) as killed."""
    found = reconcile(store, found_by, lambda lease, error: record_killed(store, lease, error))
    for lease in found:
        log.warning("%s %s recorded as killed: %s", lease.kind, lease.record_id, lease.reason)
    return found
