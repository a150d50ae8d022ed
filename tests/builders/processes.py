"""Child processes of the tests: a free local port for a server, a script of this repository
killed at a chosen moment, a process group stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group `process` leads (started with start_new_session), SIGKILL after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


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
