"""`tok1d export-mlflow`: a tiny pipeline run's lineage (tests/builders/pipeline.py) written to an
MLflow file store and read back with MLflow's own client: runs, params, metrics and training
curves equal what DuckDB holds; a second export adds nothing; a run a killed export left
unfinished is replaced; without mlflow the command fails in one line."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from mlflow import MlflowClient

from builders.pipeline import tiny_run
from flows.cli import main
from tasks import lineage


def export(capsys, *args: str) -> tuple[int, str, str]:
    """`tok1d export-mlflow ARGS` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main(["export-mlflow", *args])
    out, err = capsys.readouterr()
    return status, out, err


def duckdb_rows(store, sql: str, *params: Any) -> list[dict[str, Any]]:
    connection = lineage.connect(store)
    try:
        cursor = connection.execute(sql, list(params))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]
    finally:
        connection.close()


def leaves(section: dict, prefix: str = "") -> dict[str, Any]:
    found = {}
    for key, value in section.items():
        if isinstance(value, dict) and value:
            found.update(leaves(value, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found


def live_runs(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    return client.search_runs([found.experiment_id], max_results=1000)


@pytest.fixture
def file_store(tmp_path, monkeypatch):
    # MLflow 3.18 opens a file store only with this set (the exporter sets it for its own writes).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return tmp_path / "mlruns"


def test_export_matches_duckdb_and_a_second_export_adds_nothing(file_store, capsys):
    run = tiny_run("smoke")
    store = run.store
    status, out, err = export(capsys, "--store", str(store.root), "--to", str(file_store))
    assert status == 0, err
    assert out.strip() == file_store.resolve().as_uri()
    computed = duckdb_rows(store, """select stage_run_id, stage, output_artifact, code_version, config_hash, cache_key,
                                            started_at, ended_at from stages
                                     where status = 'completed' and not cache_hit and output_artifact is not null""")
    assert sorted(r["stage"] for r in computed) == sorted(run.manifests)  # one computed stage run per stage
    assert f"{len(computed)} stage runs exported, 0 already there" in err

    client = MlflowClient(tracking_uri=file_store.resolve().as_uri())
    experiment = f"tok1d {store.root}"
    by_stage_run = {r.data.tags["tok1d.stage_run_id"]: r for r in live_runs(client, experiment)}
    assert sorted(by_stage_run) == sorted(r["stage_run_id"] for r in computed)
    config = json.loads(duckdb_rows(store, "select config from runs where run_id = ?", run.run_id)[0]["config"])

    with_curves = set()
    for row in computed:
        exported = by_stage_run[row["stage_run_id"]]
        tags, params, metrics = exported.data.tags, exported.data.params, exported.data.metrics
        assert exported.info.status == "FINISHED"
        assert exported.info.start_time == int(row["started_at"].timestamp() * 1000)
        assert exported.info.end_time == int(row["ended_at"].timestamp() * 1000)
        assert tags["tok1d.run_id"] == run.run_id and tags["tok1d.stage"] == row["stage"]
        assert tags["tok1d.artifact_id"] == row["output_artifact"] == run.manifests[row["stage"]].artifact_id
        assert tags["tok1d.cache_key"] == row["cache_key"] and tags["tok1d.config_hash"] == row["config_hash"]

        # Params: the stage's config section, leaf for leaf, then what identifies the run.
        section = leaves(config[row["stage"].replace("-", "_")])
        assert {k[len("config."):]: v for k, v in params.items() if k.startswith("config.")} == {
            key: value if isinstance(value, str) else json.dumps(value)
            for key, value in section.items() if value is not None}
        assert params["preset"] == "smoke" and params["artifact_id"] == row["output_artifact"]
        assert params["code_version"] == row["code_version"]
        inputs = duckdb_rows(store, "select input_name, input_artifact from lineage where stage_run_id = ?",
                             row["stage_run_id"])
        assert {k: v for k, v in params.items() if k.startswith("input.")} == {
            f"input.{r['input_name']}": r["input_artifact"] for r in inputs}
        assert {r["input_name"] for r in inputs} == {
            name for name in run.manifests if tags.get(f"tok1d.input.{name}") is not None}

        # Metrics: every metrics row's value, its protocol as params, its spread as metrics.
        rows = duckdb_rows(store, "select * from metrics where stage_run_id = ?", row["stage_run_id"])
        assert rows, f"{row['stage']} recorded no metrics"
        for metric in rows:
            assert metrics[metric["name"]] == pytest.approx(metric["value"], rel=1e-12, nan_ok=True)
            for key in ("n", "seed", "implementation", "reference"):
                if metric[key] is not None:
                    assert params[f"metric.{metric['name']}.{key}"] == (
                        metric[key] if isinstance(metric[key], str) else json.dumps(metric[key]))
            for key in ("std", "ci_low", "ci_high"):
                if metric[key] is not None:
                    assert metrics[f"{metric['name']}.{key}"] == pytest.approx(metric[key], rel=1e-12, nan_ok=True)

        # Curves: each train_steps quantity is the metric history train/<name>, step for step.
        steps = duckdb_rows(store, "select name, step, value from train_steps where stage_run_id = ? order by name, step",
                            row["stage_run_id"])
        names = sorted({s["name"] for s in steps})
        assert sorted(k[len("train/"):] for k in metrics if k.startswith("train/")) == names
        for name in names:
            history = sorted((m.step, m.value) for m in client.get_metric_history(exported.info.run_id, f"train/{name}"))
            assert history == [(s["step"], s["value"]) for s in steps if s["name"] == name]
            if len(history) >= 2:
                with_curves.add(row["stage"])
    assert with_curves == {"train-tokenizer", "train-generator"}  # both logged curves of two steps or more

    # A second export finds every run and writes nothing: same runs, same history lengths.
    histories = {sid: len(client.get_metric_history(r.info.run_id, "train/" + name))
                 for sid, r in by_stage_run.items() for name in r.data.metrics if name.startswith("train/")}
    status, _, err = export(capsys, "--store", str(store.root), "--to", str(file_store))
    assert status == 0 and f"0 stage runs exported, {len(computed)} already there" in err
    again = {r.data.tags["tok1d.stage_run_id"]: r for r in live_runs(client, experiment)}
    assert {sid: r.info.run_id for sid, r in again.items()} == {sid: r.info.run_id for sid, r in by_stage_run.items()}
    assert {sid: len(client.get_metric_history(r.info.run_id, "train/" + name))
            for sid, r in again.items() for name in r.data.metrics if name.startswith("train/")} == histories


def test_a_run_left_unfinished_by_a_killed_export_is_replaced(file_store, capsys):
    run = tiny_run("smoke")
    store = run.store
    client = MlflowClient(tracking_uri=file_store.resolve().as_uri())
    experiment = "killed export"
    tokenizer = duckdb_rows(store, """select stage_run_id from stages where stage = 'train-tokenizer'
                                      and status = 'completed' and not cache_hit""")[0]["stage_run_id"]
    # What an export killed right after creating the run leaves: the tagged run, still RUNNING.
    left = client.create_run(client.create_experiment(experiment), tags={"tok1d.stage_run_id": tokenizer})

    status, _, err = export(capsys, "--store", str(store.root), "--to", str(file_store), "--experiment", experiment)
    assert status == 0 and "1 unfinished replaced" in err
    runs = live_runs(client, experiment)
    assert len(runs) == len(run.manifests) and all(r.info.status == "FINISHED" for r in runs)
    assert left.info.run_id not in {r.info.run_id for r in runs}
    assert client.get_run(left.info.run_id).info.lifecycle_stage == "deleted"
    replaced = next(r for r in runs if r.data.tags["tok1d.stage_run_id"] == tokenizer)
    assert replaced.data.tags["tok1d.stage"] == "train-tokenizer" and any(k.startswith("train/") for k in replaced.data.metrics)


def test_without_mlflow_the_command_fails_in_one_line(tmp_path, capsys, monkeypatch):
    store = tiny_run("smoke").store
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets when it is not installed
    status, out, err = export(capsys, "--store", str(store.root), "--to", str(tmp_path / "mlruns"))
    assert status == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "pip install 'tok1d[mlflow]'" in err
    assert not (tmp_path / "mlruns").exists()


def test_a_folder_without_lineage_is_named(tmp_path, capsys):
    status, _, err = export(capsys, "--store", str(tmp_path / "nowhere"))
    assert status == 1 and f"no tok1d lineage at {tmp_path / 'nowhere'}" in err
    assert not (tmp_path / "nowhere").exists()
