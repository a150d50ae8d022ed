"""What an experiment tracker receives from a store: one record per stage run that computed an
artifact, read from the lineage views (tasks/lineage.py) — its config section, its metrics with
their protocol, its training curves, and the ids that trace it. No tracker library here: the
MLflow writer (tasks/export/mlflow.py) turns these records into runs."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tasks import lineage
from tasks.store import Store

# The protocol columns of a measured metric (README "metrics"): the ones that describe how it was
# measured, and the ones that are numbers about its spread.
PROTOCOL_COLUMNS = ("n", "implementation", "reference", "seed")
SPREAD_COLUMNS = ("std", "ci_low", "ci_high")


@dataclass(frozen=True)
class MetricRow:
    """One row of the `metrics` view: a value and, for measured metrics, its protocol."""

    name: str
    value: float
    protocol: dict[str, Any] = field(default_factory=dict)  # n, implementation, reference, seed (non-null ones)
    spread: dict[str, float] = field(default_factory=dict)  # std, ci_low, ci_high (non-null ones)


@dataclass(frozen=True)
class TrackedRun:
    """A completed, computed (not cache-hit) stage run with everything a tracker shows of it."""

    stage_run_id: str
    run_id: str | None
    flow_run_id: str | None
    stage: str
    artifact_id: str
    preset: str | None
    cache_key: str
    config_hash: str
    code_version: str
    git_revision: str | None
    started_at: datetime
    ended_at: datetime
    section: dict[str, Any]  # the stage's config section from its run's resolved config ({} without a run)
    inputs: dict[str, str]  # input name -> artifact id
    metrics: list[MetricRow]
    curves: dict[str, list[tuple[int, float]]]  # train_steps name -> (step, value) in step order


def tracked_runs(store: Store) -> list[TrackedRun]:
    """Every stage run of `store` that computed an artifact, oldest first."""
    connection = lineage.connect(store)
    try:
        def rows(sql: str) -> list[dict[str, Any]]:
            cursor = connection.execute(sql)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

        # A cache hit computed nothing: the stage run that wrote the artifact is the one to track.
        computed = rows("""
            select s.stage_run_id, s.run_id, s.flow_run_id, s.stage, s.output_artifact, s.cache_key, s.config_hash,
                   s.code_version, s.git_revision, s.started_at, s.ended_at, r.preset, r.config
            from stages s left join runs r on r.run_id = s.run_id
            where s.status = 'completed' and not s.cache_hit and s.output_artifact is not null
            order by s.started_at, s.stage_run_id""")
        inputs: dict[str, dict[str, str]] = defaultdict(dict)
        for row in rows("select distinct stage_run_id, input_name, input_artifact from lineage"):
            inputs[row["stage_run_id"]][row["input_name"]] = row["input_artifact"]
        metrics: dict[str, list[MetricRow]] = defaultdict(list)
        for row in rows(f"""select distinct stage_run_id, name, value, {', '.join(PROTOCOL_COLUMNS + SPREAD_COLUMNS)}
                            from metrics order by stage_run_id, name"""):
            metrics[row["stage_run_id"]].append(MetricRow(
                row["name"], row["value"],
                {k: row[k] for k in PROTOCOL_COLUMNS if row[k] is not None},
                {k: row[k] for k in SPREAD_COLUMNS if row[k] is not None}))
        curves: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
        for row in rows("select stage_run_id, name, step, value from train_steps order by stage_run_id, name, step"):
            curves[row["stage_run_id"]][row["name"]].append((row["step"], row["value"]))
    finally:
        connection.close()

    found = []
    for row in computed:
        config = json.loads(row["config"]) if row["config"] else {}
        sid = row["stage_run_id"]
        found.append(TrackedRun(
            stage_run_id=sid, run_id=row["run_id"], flow_run_id=row["flow_run_id"], stage=row["stage"],
            artifact_id=row["output_artifact"], preset=row["preset"], cache_key=row["cache_key"],
            config_hash=row["config_hash"], code_version=row["code_version"], git_revision=row["git_revision"],
            started_at=row["started_at"], ended_at=row["ended_at"] or row["started_at"],
            section=config.get(row["stage"].replace("-", "_"), {}), inputs=dict(sorted(inputs[sid].items())),
            metrics=metrics.get(sid, []), curves={name: steps for name, steps in sorted(curves[sid].items())}))
    return found


def flatten(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config section as dotted keys (`model.patch_size`); lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
