"""Helpers shared by the stage tests. Tests are not a package, so test files import this module
after putting this folder on sys.path (as they do for fake_gemini)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from tasks.stage import StageContext, StageOutput
from tasks.store import Manifest, Store

REPO = Path(__file__).resolve().parents[2]


def commit_output(store: Store, ctx: StageContext, output: StageOutput) -> Manifest:
    """Commit a stage run's output folder as execute_stage would, with fixed test hashes."""
    return store.commit_artifact(
        ctx.stage,
        ctx.output_dir,
        tables=output.tables,
        config_hash="h" * 64,
        cache_key="k" * 64,
        code_version="test",
        summary=output.summary,
    )


def kill_when_ready(tmp_path: Path, script: str, args: list[str], ready: Callable[[], bool], what: str,
                    timeout_s: int) -> None:
    """Run `script` as a child Python process of this repository and SIGKILL it once `ready()` holds.

    The child writes to tmp_path/kill.log, whose tail is the failure message if the child exits
    before `ready()`, or "no <what> within <timeout_s> s" if `ready()` takes longer.
    """
    (tmp_path / "kill.py").write_text(script)
    log = open(tmp_path / "kill.log", "wb")
    child = subprocess.Popen(
        [sys.executable, str(tmp_path / "kill.py"), *args],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert child.poll() is None, (tmp_path / "kill.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        log.close()
