"""Test-session settings: offline, isolated Prefect home, one thread per torch op pool; tests/ as
the import root of the shared test code (`builders.<stage>`: artifacts a test starts from)."""

import os
import sys
import tempfile
from pathlib import Path

# Tests are not a package (pytest's importlib mode): shared test code is imported from here, once.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Before Prefect is imported anywhere: its own home (ephemeral API database) per test session.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="tok1d-prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# A loaded 2-core machine needs longer than Prefect's 20 s to start the ephemeral server.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Under pytest-xdist (test.sh runs two workers) the workers share the cores: two torch threads
# per process with other load run up to 10x slower here, one thread each degrades gracefully.
# A fixed count (OMP_NUM_THREADS, seen by the `tok1d` subprocesses tests start too) also keeps
# tok1d's thread governor from changing it mid-run, which bitwise resume tests rely on.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, os.cpu_count() or 1) // _workers)
os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
torch.set_num_threads(_threads)
