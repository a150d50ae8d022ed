"""`tok1d export-mlflow`: the store's computed stage runs (tasks/export/tracked_runs.py) as runs of
one MLflow experiment, in a file store (default `<store>/mlruns`) or any tracking URI.

Each MLflow run carries the stage's config section as params (`config.<key>`), the preset,
artifact id, code version and inputs; its metrics rows at step 0 (the protocol of a measured
metric as params `metric.<name>.<n|implementation|reference|seed>`, its spread as metrics
`<name>.<std|ci_low|ci_high>`); each train_steps quantity as the metric history `train/<name>`;
and the lineage ids as `tok1d.*` tags. Re-exporting adds only what is new: a run is keyed by its
`tok1d.stage_run_id` tag, and one left unfinished by a killed export is replaced.

mlflow is an optional extra (`pip install 'tok1d[mlflow]'`, the mlflow-skinny client) imported
here only, so no other command pays for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, TypeVar

from tasks.export.tracked_runs import TrackedRun, flatten, tracked_runs
from tasks.store import Store

STAGE_RUN_TAG = "tok1d.stage_run_id"
CURVE_PREFIX = "train/"
T = TypeVar("T")


@dataclass(frozen=True)
class MlflowTarget:
    """Where to export: a tracking URI, and the experiment that holds this store's runs."""

    tracking_uri: str
    experiment: str

    @classmethod
    def of(cls, store: Store, to: str | Path | None = None, experiment: str | None = None) -> "MlflowTarget":
        """`to`: a directory (a file store; default `<store>/mlruns`) or a tracking URI
        (`file:...`, `sqlite:///...`, `http://...`); `experiment` defaults to one per store."""
        text = str(to) if to is not None else ""
        if "://" in text or text.startswith(("file:", "sqlite:")):
            uri = text
        else:
            uri = (Path(text).expanduser() if text else store.root / "mlruns").resolve().as_uri()
        return cls(uri, experiment or f"tok1d {store.root}")


@dataclass
class ExportReport:
    """What one export did: the experiment, and the stage run ids exported, skipped and replaced."""

    target: MlflowTarget
    experiment_id: str
    exported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the experiment, finished
    replaced: list[str] = field(default_factory=list)  # left unfinished by an earlier, killed export


def _mlflow():
    """mlflow's MlflowClient, or one line that says how to install it."""
    try:
        from mlflow import MlflowClient
    except ImportError as error:
        raise ImportError(f"MLflow export needs the mlflow client ({error}): pip install 'tok1d[mlflow]' "
                          "(installs mlflow-skinny)") from None
    return MlflowClient


def export_mlflow(store: Store, target: MlflowTarget) -> ExportReport:
    """Write every computed stage run of `store` not yet in `target`'s experiment."""
    if target.tracking_uri.startswith("file:"):
        # MLflow 3 keeps the file store in maintenance mode and refuses it unless asked: this
        # export is the one thing here that writes one (a user's explicit `false` still wins).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    MlflowClient = _mlflow()
    client = MlflowClient(tracking_uri=target.tracking_uri)
    experiment = client.get_experiment_by_name(target.experiment)
    experiment_id = (experiment.experiment_id if experiment is not None else
                     client.create_experiment(target.experiment, tags={"tok1d.store": str(store.root)}))
    existing = _existing_runs(client, experiment_id)
    report = ExportReport(target, experiment_id)
    for run in tracked_runs(store):
        found = existing.get(run.stage_run_id, [])
        if any(r.info.status == "FINISHED" for r in found):
            report.skipped.append(run.stage_run_id)
            continue
        if found:
            for unfinished in found:
                client.delete_run(unfinished.info.run_id)
            report.replaced.append(run.stage_run_id)
        _write_run(client, experiment_id, run, store)
        report.exported.append(run.stage_run_id)
    return report


def _existing_runs(client, experiment_id: str) -> dict[str, list[Any]]:
    """This experiment's live runs by their stage run id (every page of the search)."""
    found: dict[str, list[Any]] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        for run in page:
            if STAGE_RUN_TAG in run.data.tags:
                found.setdefault(run.data.tags[STAGE_RUN_TAG], []).append(run)
        token = page.token
        if not token:
            return found


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _param_value(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) <= limit:
        return text
    # MLflow rejects longer params; the whole value stays in `runs.config` of experiments.duckdb.
    marker = f" ... [{len(text)} chars, cut; whole value in runs.config]"
    return text[: limit - len(marker)] + marker


def run_params(run: TrackedRun, limit: int = 6000) -> dict[str, str]:
    """The params of `run`'s MLflow run (values as MLflow stores them: strings)."""
    params: dict[str, Any] = {f"config.{key}": value for key, value in flatten(run.section).items()}
    params.update(preset=run.preset, artifact_id=run.artifact_id, code_version=run.code_version)
    params.update({f"input.{name}": artifact for name, artifact in run.inputs.items()})
    for metric in run.metrics:
        params.update({f"metric.{metric.name}.{key}": value for key, value in metric.protocol.items()})
    return {key: _param_value(value, limit) for key, value in params.items() if value is not None}


def run_tags(run: TrackedRun, store: Store) -> dict[str, str]:
    """The lineage ids of `run` as tags (`tok1d.*`; the git revision also as MLflow's own tag)."""
    tags = {STAGE_RUN_TAG: run.stage_run_id, "tok1d.run_id": run.run_id, "tok1d.flow_run_id": run.flow_run_id,
            "tok1d.stage": run.stage, "tok1d.artifact_id": run.artifact_id, "tok1d.cache_key": run.cache_key,
            "tok1d.config_hash": run.config_hash, "tok1d.code_version": run.code_version,
            "tok1d.preset": run.preset, "tok1d.store": str(store.root),
            "tok1d.artifact_path": str(store.root / "artifacts" / run.stage / run.artifact_id),
            "mlflow.source.git.commit": run.git_revision}
    tags.update({f"tok1d.input.{name}": artifact for name, artifact in run.inputs.items()})
    return {key: str(value) for key, value in tags.items() if value is not None}


def run_metrics(run: TrackedRun) -> list[tuple[str, float, int]]:
    """(key, value, step) of every metric point: summary rows at step 0, curves at their steps."""
    points = []
    for metric in run.metrics:
        points.append((metric.name, metric.value, 0))
        points += [(f"{metric.name}.{key}", value, 0) for key, value in metric.spread.items()]
    for name, steps in run.curves.items():
        points += [(f"{CURVE_PREFIX}{name}", value, step) for step, value in steps]
    return points


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _write_run(client, experiment_id: str, run: TrackedRun, store: Store) -> None:
    from mlflow.entities import Metric, Param
    from mlflow.utils import validation

    params = run_params(run, validation.MAX_PARAM_VAL_LENGTH)
    # Tags first (with create_run) so that even a run cut short by a kill carries its stage run
    # id: the next export finds it unfinished and replaces it.
    created = client.create_run(experiment_id, start_time=_ms(run.started_at), tags=run_tags(run, store),
                                run_name=f"{run.stage}-{run.artifact_id[:8]}-{run.stage_run_id[:8]}")
    run_id = created.info.run_id
    stamp = _ms(run.ended_at)
    for batch in _chunks([Param(k, v) for k, v in sorted(params.items())], validation.MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=batch)
    metrics = [Metric(key, float(value), stamp, step) for key, value, step in run_metrics(run)]
    for batch in _chunks(metrics, validation.MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch)
    client.set_terminated(run_id, "FINISHED", end_time=stamp)
