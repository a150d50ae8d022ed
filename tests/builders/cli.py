"""Running the `tok1d` command in tests: a subprocess in the repository, its output parsed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOK1D = [sys.executable, "-m", "flows.cli"]
# The pipeline stages that need no trained model: fast enough to run many times in tests.
DATA_STAGES = "stages=[ingest,caption,embed-text]"


def tok1d(*args: str, env: dict | None = None, check: bool = True, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    result = subprocess.run([*TOK1D, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=environment)
    if check and result.returncode != 0:
        raise AssertionError(f"tok1d {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def stage_results(output: str) -> dict[str, str]:
    """stage -> computed|cached, from the table `tok1d run` prints."""
    results = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in ("computed", "cached"):
            results[parts[0]] = parts[1]
    return results
