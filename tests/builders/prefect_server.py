"""A real Prefect API server on 127.0.0.1 for tests that start many `tok1d` processes: each
process then talks to it (PREFECT_API_URL) instead of starting an ephemeral server of its own,
about 13 s per process on 2 cores.

It is the server Prefect's own ephemeral mode starts (uvicorn on `create_app`, the services an
ephemeral server runs, no UI), shared: about 6 s to start on a database already migrated (the
test session's PREFECT_HOME, once any test has used Prefect), 20 s on a new one. `prefect server
start` takes 5 s longer on top (its CLI process) for nothing a test needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from builders.processes import free_port, stop_group


@dataclass(frozen=True)
class PrefectServer:
    """A started server: its API address (what PREFECT_API_URL takes)."""

    api: str

    def flow_run_states(self, ids: list[str]) -> dict[str, str]:
        """flow run id -> state type (RUNNING, COMPLETED, CRASHED, ...) of these flow runs."""
        query = {"flow_runs": {"id": {"any_": ids}}}
        request = urllib.request.Request(f"{self.api}/flow_runs/filter", data=json.dumps(query).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            runs = json.loads(response.read())
        return {run["id"]: (run.get("state") or {}).get("type") for run in runs}


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2):
            return True
    except OSError:
        return False


@contextmanager
def prefect_server(home: Path, log_path: Path, timeout_s: float = 180.0) -> Iterator[PrefectServer]:
    """Serve the Prefect API (its database under `home`) for the block, then stop it."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"}
    env.pop("PREFECT_API_URL", None)
    log = open(log_path, "w")
    # Its own session: stopped as a group, and never hit by a test's killpg.
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                               "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(api):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prefect server did not answer on {api}: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield PrefectServer(api)
    finally:
        stop_group(server)
        log.close()
