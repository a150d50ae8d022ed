"""The `tok1d` command end to end: real Prefect runs, a real store, the real DuckDB file; the
smoke preset also on a local Ray and on a store in a real S3 server, with the same artifacts."""

from __future__ import annotations

import asyncio
import re
import shutil

import duckdb
import pytest

from builders.cli import DATA_STAGES, artifact_ids, stage_results, tok1d, tok1d_imports
from builders.s3_server import BUCKET, s3_server
from tasks.remote_store import RemoteStore


def test_run_twice_then_everything_is_cached_and_status_agrees_with_duckdb(tmp_path):
    store = tmp_path / "store"
    first = tok1d("run", "--preset", "smoke", "--store", str(store), "--set", DATA_STAGES)
    assert stage_results(first.stdout) == {"ingest": "computed", "caption": "computed", "embed-text": "computed"}
    # No Prefect server can be reached at this address: the fully cached run must not need one.
    offline = {"PREFECT_API_URL": "http://127.0.0.1:9/api"}
    second = tok1d("run", "--preset", "smoke", "--store", str(store), "--set", DATA_STAGES, env=offline)
    assert stage_results(second.stdout) == {"ingest": "cached", "caption": "cached", "embed-text": "cached"}
    assert "every stage of full-pipeline is cached: answered from the store without starting Prefect" in second.stdout
    third = tok1d("run", "--preset", "smoke", "--store", str(store), "--set", DATA_STAGES, "--flow")
    assert stage_results(third.stdout) == {"ingest": "cached", "caption": "cached", "embed-text": "cached"}
    assert "without starting Prefect" not in third.stdout

    status = tok1d("status", "--store", str(store)).stdout
    connection = duckdb.connect(str(store / "experiments.duckdb"), read_only=True)
    latest = connection.execute(
        "select stage, status, cache_hit from stages qualify row_number() over (partition by stage order by event_time desc) = 1"
    ).fetchall()
    runs = connection.execute("select count(*), count(*) filter (where status = 'completed') from runs").fetchone()
    flow_runs = connection.execute("select flow_run_id, overrides from runs where flow_run_id is not null "
                                   "order by started_at").fetchall()
    connection.close()
    assert sorted(latest) == [("caption", "completed", True), ("embed-text", "completed", True), ("ingest", "completed", True)]
    assert runs == (3, 3)
    # The two runs through the flow, as the UI shows them: named with the override, tok1d's lines in
    # their logs (sent by the `tok1d` process to its ephemeral API before it exited).
    assert [overrides for _, overrides in flow_runs] == [[DATA_STAGES], [DATA_STAGES]]
    pages = asyncio.run(_flow_run_pages([flow_run_id for flow_run_id, _ in flow_runs]))
    assert [name for name, _ in pages] == [f"smoke +{DATA_STAGES}"] * 2
    assert any(re.fullmatch(r"embed-text: done in \d+\.\ds -> artifacts/embed-text/\w+", line) for line in pages[0][1]), pages
    assert any(line.startswith("embed-text: cache hit") for line in pages[1][1]), pages
    assert "runs: 3 (0 failed)" in status
    for stage, state, cache_hit in latest:
        line = next(l for l in status.splitlines() if l.startswith(stage + " "))
        assert state in line and ("yes" if cache_hit else "no") in line


async def _flow_run_pages(flow_run_ids: list[str]) -> list[tuple[str, list[str]]]:
    """(name, tok1d log lines) of each flow run, from the ephemeral API of this test session's
    PREFECT_HOME, which the `tok1d` processes used."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    pages = []
    async with get_client() as client:
        for flow_run_id in flow_run_ids:
            flow_run = await client.read_flow_run(flow_run_id)
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            pages.append((flow_run.name, [log.message for log in logs if log.name == "tok1d"]))
    return pages


def test_deleting_one_output_file_recomputes_that_stage_only(tmp_path):
    store = tmp_path / "store"
    tok1d("run", "--preset", "smoke", "--store", str(store), "--set", DATA_STAGES)
    victim = next((store / "artifacts" / "caption").glob("*/captions/*.parquet"))
    victim.unlink()
    rerun = tok1d("run", "--preset", "smoke", "--store", str(store), "--set", DATA_STAGES)
    # caption's content is deterministic, so its artifact comes back identical and embed-text hits.
    assert stage_results(rerun.stdout) == {"ingest": "cached", "caption": "computed", "embed-text": "cached"}
    assert victim.exists()
    assert "damaged" not in tok1d("status", "--store", str(store)).stdout


def test_bad_override_is_a_clear_error_before_anything_runs(tmp_path):
    result = tok1d("run", "--preset", "smoke", "--store", str(tmp_path / "s"), "--set", "ingest.resolutoin=8", check=False)
    assert result.returncode == 2
    assert "ingest.resolutoin: unknown key" in result.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("preset", ["smoke"])
def test_presets_listed(preset):
    assert preset in tok1d("presets").stdout


ALL_STAGES = ["ingest", "caption", "embed-text", "train-tokenizer", "pretokenize", "train-generator", "evaluate"]


TEXT_FREE_STAGES = [stage for stage in ALL_STAGES if stage not in ("caption", "embed-text")]


@pytest.mark.parametrize("preset, generator, stages, other_engines", [("smoke", "maskgit", TEXT_FREE_STAGES, True),
                                                                      ("smoke-textok", "dit", ALL_STAGES, False)])
def test_smoke_runs_every_stage_and_records_every_metric(tmp_path, preset, generator, stages, other_engines):
    # A text-free tokenizer and a class-conditional generator read no captions: no text stage runs.
    store = tmp_path / "store"
    first = tok1d("run", "--preset", preset, "--store", str(store))
    assert stage_results(first.stdout) == {stage: "computed" for stage in stages}
    # The run ends with its headline metrics and what they are on.
    headline = first.stdout.split("metrics of this run", 1)[1]
    for name in ("psnr", "rfid", "gfid", "gkid"):
        assert re.search(rf"^  \S+ +{name} .* N=\d+$", headline, re.M), (name, headline)
    # Answered from the store and recorded in lineage without torch or Prefect (issue 11 item 4).
    second, heavy = tok1d_imports("run", "--preset", preset, "--store", str(store))
    assert second.returncode == 0, second.stderr
    assert stage_results(second.stdout) == {stage: "cached" for stage in stages}
    assert heavy == []

    connection = duckdb.connect(str(store / "experiments.duckdb"), read_only=True)
    runs = connection.execute("select run_id, status from runs order by started_at").fetchall()
    hits = connection.execute("select stage, status, cache_hit from stages where run_id = ?", [runs[-1][0]]).fetchall()
    assert [status for _, status in runs] == ["completed", "completed"]
    assert sorted(hits) == sorted((stage, "completed", True) for stage in stages)
    metrics = dict(connection.execute("select name, value from metrics where stage in ('train-tokenizer', 'evaluate')").fetchall())
    # Every FID and KID row says what it was measured on, and every FID has its KID beside it.
    protocol = connection.execute(
        "select name, n, implementation, reference from metrics where name in ('rfid', 'rkid', 'gfid', 'gkid')"
    ).fetchall()
    connection.close()
    for name in ("rfid", "rkid", "psnr", "ssim", "gfid", "gkid", "inception_score", "precision", "recall"):
        assert name in metrics, f"{name} missing from metrics: {sorted(metrics)}"
    assert {row[0] for row in protocol} == {"rfid", "rkid", "gfid", "gkid"}
    for name, n, implementation, reference in protocol:
        assert n and n > 1 and ".pt:" in implementation, (name, implementation)  # the network file and its hash
        assert "ingest/" in reference, (name, reference)
    assert metrics["gfid"] > 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    generator_json = next((store / "artifacts" / "train-generator").glob("*/generator.json")).read_text()
    assert f'"{generator}"' in generator_json
    assert next((store / "artifacts" / "evaluate").glob("*/samples.png")).stat().st_size > 0
    if other_engines:  # the default run is what the same preset on Ray and on S3 must reproduce
        _sharded_stages_on_ray_give_the_same_artifacts(tmp_path, store, preset, artifact_ids(first.stdout))
        _a_store_on_s3_gives_the_same_artifacts_to_every_machine(tmp_path, preset, artifact_ids(first.stdout))


SHARDED_STAGES = ("ingest", "pretokenize", "evaluate")


def _sharded_stages_on_ray_give_the_same_artifacts(tmp_path, store, preset: str, expected: dict[str, str]) -> None:
    """The same preset with runtime.task_runner=ray on a copy of the default run's store with one
    file of each sharded stage's artifact deleted: their cache hits fail verification, so exactly
    those stages run again, their shards on a local Ray (the training stages between them are
    verified hits on the same input ids), and every artifact id equals the default run's."""
    copy = tmp_path / "ray-store"
    shutil.copytree(store, copy)
    for stage in SHARDED_STAGES:
        artifact = copy / "artifacts" / stage / expected[stage]
        min(artifact.rglob("part-*.parquet")).unlink()
    ray = tok1d("run", "--preset", preset, "--store", str(copy), "--set", "runtime.task_runner=ray",
                "--set", "runtime.ray_workers=1")
    assert stage_results(ray.stdout) == {stage: "computed" if stage in SHARDED_STAGES else "cached" for stage in expected}
    assert artifact_ids(ray.stdout) == expected
    for stage in SHARDED_STAGES:
        assert re.search(rf"{stage}: \d+ shards on Ray \(local\)", ray.stdout + ray.stderr), stage
    # One local Ray for the run: the later fan-outs reuse the first one's (and its warm workers).
    assert (ray.stdout + ray.stderr).count("started a local Ray on 127.0.0.1 for this run") == 1


def _a_store_on_s3_gives_the_same_artifacts_to_every_machine(tmp_path, preset: str, expected: dict[str, str]) -> None:
    """The preset with `--store s3://...` on a real S3 server on 127.0.0.1 (moto's server mode)
    computes the default run's artifacts; then another machine (its own, empty mirror) gets every
    stage as a verified hit pulled from the bucket, and its DuckDB file holds both runs."""
    with s3_server() as env:
        url = f"s3://{BUCKET}/{preset}"
        first = tok1d("run", "--preset", preset, "--store", url, env={**env, "TOK1D_STORE_MIRROR": str(tmp_path / "a")})
        assert set(stage_results(first.stdout).values()) == {"computed"}
        assert artifact_ids(first.stdout) == expected

        listed = RemoteStore(url).list_files("")
        for stage, artifact in expected.items():
            assert f"artifacts/{stage}/{artifact}/manifest.json" in listed
        assert [path for path in listed if path.startswith("cache/")], listed
        assert [path for path in listed if path.startswith("lineage/stage_events/")], listed
        assert not [path for path in listed if path.endswith(".tmp") or path.startswith(("work/", "locks/"))]

        other = {**env, "TOK1D_STORE_MIRROR": str(tmp_path / "b")}
        second = tok1d("run", "--preset", preset, "--store", url, env=other)
        assert set(stage_results(second.stdout).values()) == {"cached"}
        assert artifact_ids(second.stdout) == expected
        status = tok1d("status", "--store", url, env=other).stdout
        assert f"store: {url} (mirror {tmp_path / 'b'})" in status and "runs: 2 (0 failed)" in status

    connection = duckdb.connect(str(tmp_path / "b" / "experiments.duckdb"), read_only=True)
    runs = connection.execute("select count(*) from runs where status = 'completed'").fetchone()[0]
    gfid = connection.execute("select count(*) from metrics where name = 'gfid'").fetchone()[0]
    connection.close()
    assert runs == 2 and gfid >= 1

