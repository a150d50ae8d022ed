"""Wall time and peak memory of the quick `tok1d` commands: `presets`, `status`, `--help`.

These commands only read YAML files or the lineage tables, so they should answer in well under
2 s and 300 MB; importing torch (through the stage modules) costs seconds and about 1 GB. Each
run is a fresh `python -m flows.cli` process; its peak RSS comes from the kernel's accounting of
that child (`os.wait4`, the per-child form of getrusage(RUSAGE_CHILDREN).ru_maxrss, which would
otherwise report the largest child so far). Medians of `--runs` runs are printed. This script
imports nothing of tok1d itself, so that its own memory does not show in its children's figures.

    .venv/bin/python bench/cli_latency.py --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Run in a child, because this process must stay small: Linux counts in a child's peak RSS the
# memory it had before exec, a copy of (or, with vfork, the same as) this process's; importing
# duckdb and pyarrow here set a floor of ~140 MB under every figure.
LINEAGE_STORE = """
import sys
from tasks import lineage
from tasks.store import Store

store = Store(sys.argv[1])
started = lineage.now()
lineage.record_run(store, run_id="bench", flow_run_id=None, flow="full-pipeline", preset="smoke",
                   config_hash="0", status="failed", git_revision=None, started_at=started, ended_at=started)
lineage.record_stage_event(store, stage_run_id="bench-ingest", run_id="bench", flow_run_id=None, stage="ingest",
                           status="failed", cache_hit=False, cache_key="0", config_hash="0", code_version="0",
                           git_revision=None, started_at=started, ended_at=started, error="bench")
lineage.ensure_database(store)  # as a stage run does: the views' seed files exist before any `status`
"""


def lineage_store(root: Path) -> Path:
    """A store with one run and one failed stage in its lineage, so `status` queries DuckDB."""
    subprocess.run([sys.executable, "-c", LINEAGE_STORE, str(root)], cwd=REPO_ROOT, check=True)
    return root


def measure(args: list[str]) -> tuple[float, float, float, int]:
    """(wall seconds, CPU seconds, peak RSS in MiB, exit status) of one fresh `python -m flows.cli <args>`."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = lineage_store(Path(tmp) / "store")
        commands = {
            "presets": ["presets"],
            "status": ["status", "--store", str(store)],
            "--help": ["--help"],
            "run --help": ["run", "--help"],
            "sweep --help": ["sweep", "--help"],
        }
        # CPU seconds (user + system) do not grow with other jobs' load the way wall time does.
        print(f"{'command':<14}{'wall s':>8}{'CPU s':>8}{'max RSS MiB':>13}  wall of each run (s)")
        for name, command in commands.items():
            runs = [measure(command) for _ in range(args.runs)]
            failed = [code for *_, code in runs if code != 0]
            if failed:
                raise SystemExit(f"tok1d {name} exited with {failed[0]}")
            walls = [wall for wall, *_ in runs]
            cpu = statistics.median(run[1] for run in runs)
            rss = statistics.median(run[2] for run in runs)
            print(f"{name:<14}{statistics.median(walls):>8.2f}{cpu:>8.2f}{rss:>13.0f}  {', '.join(f'{w:.2f}' for w in walls)}")


if __name__ == "__main__":
    main()
