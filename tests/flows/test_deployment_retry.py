"""A real local Prefect server + process worker: a failed deployment run retried as the UI does.

The UI's Retry button sets the flow run to Scheduled/AwaitingRetry (force); the worker reruns
the flow with the same flow-run id, and stages completed before the failure come back Cached.
The run's page then shows what the UI is for: a name with the overrides, tok1d's own log lines,
summary tables with units and N, and the sample grid as an image.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import os
import subprocess
import time
from pathlib import Path

import duckdb
import pytest

from builders.pipeline import TINY
from builders.processes import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def local_prefect(tmp_path):
    port = free_port()
    fault_file = tmp_path / "faults"
    env = {
        **os.environ,
        "TOK1D_PORT": str(port),
        "TOK1D_PREFECT_HOME": str(tmp_path / "prefect-home"),
        "TOK1D_STORE": str(tmp_path / "store"),
        "TOK1D_PYTHON": str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "python"),
        "TOK1D_FAULT_FILE": str(fault_file),
    }
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_HOME", None)
    script = REPO / "deployments" / "local.sh"
    started = subprocess.run(["bash", str(script), "start"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"api": f"http://127.0.0.1:{port}/api", "store": tmp_path / "store", "fault_file": fault_file, "env": env}
    finally:
        subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True, timeout=120)


async def _wait_final(client, flow_run_id, timeout: float = 400):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = await client.read_flow_run(flow_run_id)
        if run.state and run.state.is_final():
            return run
        await asyncio.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} did not finish; last state {run.state}")


# Every stage of the smoke preset at the tiny sizes (a few seconds each): evaluate makes the sample grid.
OVERRIDES = TINY


async def _logs_with(client, flow_run_id, needle: str, timeout: float = 30) -> list:
    """The flow run's logs once one holds `needle`: a flow process sends its last lines as it exits,
    just after its final state."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    while True:
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        if any(needle in log.message for log in logs) or time.monotonic() > deadline:
            return logs
        await asyncio.sleep(1)


async def _scenario(api: str, store: Path, fault_file: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
    from prefect.states import State, StateType

    async with get_client() as client:
        deployment = await client.read_deployment_by_name("full-pipeline/smoke")
        flow_run = await client.create_flow_run_from_deployment(deployment.id, parameters={"overrides": OVERRIDES})
        failed = await _wait_final(client, flow_run.id)
        assert failed.state.is_failed(), failed.state

        fault_file.unlink()
        # Exactly what the UI's Retry button sends.
        await client.set_flow_run_state(
            flow_run.id, State(type=StateType.SCHEDULED, name="AwaitingRetry", message="Retry from the UI"), force=True
        )
        retried = await _wait_final(client, flow_run.id)
        assert retried.state.is_completed(), retried.state
        task_runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        logs = await _logs_with(client, flow_run.id, "evaluate: done in")
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
        ui = {"name": retried.name, "logs": logs, "artifacts": artifacts,
              "task_run_ids": {t.id for t in task_runs}}
        return flow_run.id, [(t.name, t.state.name) for t in task_runs], ui


async def _running_flow_run(client) -> str:
    from prefect.states import Running

    deployment = await client.read_deployment_by_name("full-pipeline/smoke")
    # Created Running, as a worker's flow run is once it started: no worker picks it up.
    flow_run = await client.create_flow_run_from_deployment(deployment.id, state=Running())
    return str(flow_run.id)


async def _state_name(client, flow_run_id: str) -> str:
    return (await client.read_flow_run(flow_run_id)).state.name


def test_ui_retry_reuses_completed_stages(local_prefect, monkeypatch):
    # evaluate fails on the first attempt; the stages before it complete.
    local_prefect["fault_file"].write_text("evaluate\n")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Settings are read once per process: point this test's client at the local server explicitly.
    with temporary_settings({PREFECT_API_URL: local_prefect["api"]}):
        flow_run_id, task_runs, ui = asyncio.run(
            _scenario(local_prefect["api"], local_prefect["store"], local_prefect["fault_file"])
        )
    states = {}
    for name, state in task_runs:
        states.setdefault(name, []).append(state)
    upstream = ("ingest", "train-tokenizer", "pretokenize", "train-generator")
    assert all("Cached" in states[stage] for stage in upstream), states
    assert "Completed" in states["evaluate"], states

    connection = duckdb.connect(str(local_prefect["store"] / "experiments.duckdb"), read_only=True)
    events = connection.execute(
        "select stage, status, cache_hit from stage_events where flow_run_id = ? order by event_time",
        [str(flow_run_id)],
    ).fetchall()
    overrides = connection.execute("select overrides from runs where flow_run_id = ?", [str(flow_run_id)]).fetchall()
    connection.close()
    # First attempt: computed the stages before evaluate, evaluate failed; the retry: cache hits, evaluate ran.
    assert ("evaluate", "failed", False) in events
    assert all((stage, "completed", True) in events for stage in upstream)
    assert events[-1] == ("evaluate", "completed", False)
    assert overrides == [(OVERRIDES,), (OVERRIDES,)]  # both attempts recorded what they changed

    _check_run_page(ui)
    # A killed run's flow run stays Running in Prefect (#16746): reconciling its dead lease sets it
    # to Crashed, so the UI tells the truth. The lease is the one a killed worker's run leaves.
    from prefect.client.orchestration import get_client

    from flows.reconcile import reconcile
    from tasks.store import Store

    async def crash_check():
        async with get_client() as client:
            flow_run_id = await _running_flow_run(client)
            store = Store(local_prefect["store"])
            lease = store.root / "leases" / "run-dead1.json"
            lease.write_text(json.dumps({"kind": "run", "id": "dead1", "host": "a-lost-node", "pid": 1,
                                         "process_start": None, "fields": {"run_id": "dead1", "flow_run_id": flow_run_id,
                                         "flow": "full-pipeline", "preset": "smoke", "config_hash": "c",
                                         "git_revision": None, "started_at": None, "config": None}}))
            old = time.time() - 3600
            os.utime(lease, (old, old))
            assert await _state_name(client, flow_run_id) == "Running"
            found = await asyncio.to_thread(reconcile, store, "a test")
            assert [lease.record_id for lease in found] == ["dead1"]
            return await _state_name(client, flow_run_id)

    monkeypatch.setenv("PREFECT_API_URL", local_prefect["api"])
    with temporary_settings({PREFECT_API_URL: local_prefect["api"]}):
        assert asyncio.run(crash_check()) == "Crashed"


def _check_run_page(ui: dict) -> None:
    """What the retried run's page in the UI shows."""
    from PIL import Image

    # Its name says the run is not the smoke preset as such.
    assert ui["name"].startswith("smoke +ingest.source.max_images=48 +ingest.shard_rows=64 "), ui["name"]
    # tok1d's own lines from the worker's flow process, both attempts, under their stage's task run.
    lines = {log.message: log for log in ui["logs"] if log.name == "tok1d"}
    assert any(re.fullmatch(r"ingest: done in \d+\.\ds -> artifacts/ingest/\w+", line) for line in lines), sorted(lines)
    assert any(line.startswith("train-generator: cache hit") for line in lines), sorted(lines)
    # Training losses as they go, in the first attempt.
    assert any(re.match(r"train-tokenizer: step \d+/\d+ \S+=\S+", line) for line in lines), sorted(lines)
    [done] = [log for line, log in lines.items() if line.startswith("evaluate: done in")]
    assert done.task_run_id in ui["task_run_ids"]
    assert any(re.match(r"evaluate: gfid \S+ N=8, gkid \S+ ± \S+ \(std\) N=8", line) for line in lines), sorted(lines)

    artifacts = {}
    for artifact in ui["artifacts"]:
        artifacts.setdefault(artifact.key, []).append(artifact)
    # Summaries rounded, with units and N (a cached stage's too: the retry's hits show theirs).
    for artifact in artifacts["train-tokenizer-summary"]:  # computed, then its cache hit
        rows = {row["metric"]: row for row in json.loads(artifact.data)}
        psnr = rows["psnr"]
        assert re.fullmatch(r"\d+\.\d{1,3} dB \[\S+, \S+\] \(95%\)", psnr["value"]) and psnr["N"] == "3", psnr
        assert "vs ingest/" in psnr["protocol"] and "final_l2" in rows and "psnr_low" not in rows
    assert len(artifacts["train-tokenizer-summary"]) == 2
    [metrics] = [{row["metric"]: row for row in json.loads(artifact.data)} for artifact in artifacts["run-metrics"]]
    assert metrics["gfid"]["N"] == "8" and metrics["psnr"]["value"].endswith(" dB"), metrics
    # The sample grid, embedded as a PNG: the evaluate artifact's samples.png, enlarged for the page.
    [images] = artifacts["evaluate-images"]
    assert images.type == "markdown" and "**samples.png**" in images.data
    [encoded] = re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", images.data)
    grid = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert grid.format == "PNG" and min(grid.size) >= 256, grid.size
    assert len(images.data) < 1_000_000
    assert {"train-tokenizer-images", "train-generator-images"} <= set(artifacts)
