"""`tok1d status` tells a stage whose process was killed from one still running."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from flows.status import shown_status


def test_running_stage_of_a_dead_process_shows_as_killed():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    here = socket.gethostname()
    assert shown_status("running", here, child.pid) == "killed"
    assert shown_status("running", here, os.getpid()) == "running"
    # Another host's process cannot be checked from here; finished stages keep their status.
    assert shown_status("running", "elsewhere", child.pid) == "running"
    assert shown_status("completed", here, child.pid) == "completed"
    assert shown_status("running", here, None) == "running"
