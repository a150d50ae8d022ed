"""A real local Prefect server + process worker: a failed deployment run retried as the UI does.

The UI's Retry button sets the flow run to Scheduled/AwaitingRetry (force); the worker reruns
the flow with the same flow-run id, and stages completed before the failure come back Cached.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import duckdb
import pytest

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


async def _scenario(api: str, store: Path, fault_file: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import State, StateType

    async with get_client() as client:
        deployment = await client.read_deployment_by_name("full-pipeline/smoke")
        flow_run = await client.create_flow_run_from_deployment(
            deployment.id, parameters={"overrides": ["stages=[ingest,caption,embed-text]"]}
        )
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
        return flow_run.id, [(t.name, t.state.name) for t in task_runs]


async def _running_flow_run(client) -> str:
    from prefect.states import Running

    deployment = await client.read_deployment_by_name("full-pipeline/smoke")
    # Created Running, as a worker's flow run is once it started: no worker picks it up.
    flow_run = await client.create_flow_run_from_deployment(deployment.id, state=Running())
    return str(flow_run.id)


async def _state_name(client, flow_run_id: str) -> str:
    return (await client.read_flow_run(flow_run_id)).state.name


def test_ui_retry_reuses_completed_stages(local_prefect, monkeypatch):
    # embed-text fails on the first attempt; ingest and caption complete before it.
    local_prefect["fault_file"].write_text("embed-text\n")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Settings are read once per process: point this test's client at the local server explicitly.
    with temporary_settings({PREFECT_API_URL: local_prefect["api"]}):
        flow_run_id, task_runs = asyncio.run(
            _scenario(local_prefect["api"], local_prefect["store"], local_prefect["fault_file"])
        )
    states = {}
    for name, state in task_runs:
        states.setdefault(name, []).append(state)
    assert "Cached" in states["ingest"] and "Cached" in states["caption"], states
    assert "Completed" in states["embed-text"], states

    connection = duckdb.connect(str(local_prefect["store"] / "experiments.duckdb"), read_only=True)
    events = connection.execute(
        "select stage, status, cache_hit from stage_events where flow_run_id = ? order by event_time",
        [str(flow_run_id)],
    ).fetchall()
    connection.close()
    # First attempt: computed ingest + caption, embed-text failed; the retry: two cache hits, embed-text ran.
    assert ("embed-text", "failed", False) in events
    assert ("ingest", "completed", True) in events and ("caption", "completed", True) in events
    assert events[-1] == ("embed-text", "completed", False)

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
