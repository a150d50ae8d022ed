"""`tok1d sweep --jobs N`: the sweep's grid split over N processes, each with its share of the cores.

Small models on a few CPU cores are bound by per-op overhead, not arithmetic: a nano tokenizer
trains as fast on one thread as on two, and two torch threads of one process slow down badly
when anything else runs. So N processes of cores/N threads each finish a grid of small points
about N times sooner than one process with every core. Each child runs `tok1d sweep --part K/N`
(every N-th point of the grid, in grid order) with its own Prefect home, so no two ephemeral
Prefect servers migrate one database at once; the store's cache-slot locks keep children from
computing a shared stage (an ingest, a caption level's embeddings) twice. The parent then runs
the whole sweep in-process, which finds every finished point in the cache and writes the one
table, views and plot; a point a child failed on is tried again there and reported as usual.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tasks.config import ConfigError
from tasks.cores import available_cores

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = Path("sweeps") / "logs"
# Lines of the children's tok1d logger ("12:44:37 ingest: done in 3.7s ..."), not progress bars.
_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d \S")


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    return max(1, (cores or available_cores()) // jobs)


def parse_part(text: str | None) -> tuple[int, int] | None:
    """`K/N` (0 <= K < N) -> (K, N): this process runs grid points K, K+N, K+2N, ..."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise ConfigError(f"--part {text!r}: expected K/N with 0 <= K < N, e.g. 0/2")
    return int(match[1]), int(match[2])


def check_jobs(jobs: int) -> int:
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: expected a number of processes >= 1")
    return jobs


def child_command(args: Namespace, part: int, jobs: int, threads: int) -> list[str]:
    """The `tok1d sweep` command line of child `part`: the parent's arguments, one part of the
    grid, and its thread share (unless the user set runtime.threads themselves)."""
    command = [sys.executable, "-m", "flows.cli", "sweep", "--presets", args.presets, "--until", args.until,
               "--store", str(args.store), "--part", f"{part}/{jobs}"]
    for flag, value in (("--tokens", args.tokens), ("--text", args.text), ("--seeds", args.seeds)):
        if value is not None:
            command += [flag, value]
    for axis in args.axes or []:
        command += ["--axis", axis]
    overrides = list(args.overrides or [])
    if not any(o.split("=", 1)[0].strip().replace("-", "_") == "runtime.threads" for o in overrides):
        overrides.append(f"runtime.threads={threads}")
    for override in overrides:
        command += ["--set", override]
    return command


@dataclass
class Child:
    """One child sweep process and the log file its output goes to."""

    index: int
    process: subprocess.Popen
    log_path: Path
    log: IO[str]
    read_offset: int = 0

    def relay(self) -> None:
        """Print the child's new tok1d log lines, prefixed with its number."""
        with open(self.log_path, "rb") as handle:
            handle.seek(self.read_offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.read_offset += end
        for line in re.split(r"[\r\n]", data[:end].decode(errors="replace")):
            if _LOG_LINE.match(line):
                print(f"[job {self.index}] {line}", flush=True)


def _die_with_parent() -> None:
    # A killed `tok1d sweep` must not leave children training into the store.
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_jobs(args: Namespace, jobs: int, poll_seconds: float = 2.0) -> list[int]:
    """Run the grid as `jobs` child sweeps and wait for them; returns their exit codes."""
    store = Path(args.store)
    log_dir = store / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    threads = threads_per_job(jobs)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    print(f"sweep: {jobs} jobs x {threads} torch thread(s) on {available_cores()} cores; "
          f"logs in {log_dir}/{stamp}-job<K>.log", flush=True)
    children: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="tok1d-sweep-jobs-") as homes:
        try:
            for index in range(jobs):
                env = dict(os.environ)
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
                if not env.get("PREFECT_API_URL"):  # against a server, the children share it
                    env["PREFECT_HOME"] = str(Path(homes) / f"job{index}")
                log_path = log_dir / f"{stamp}-job{index}.log"
                log = open(log_path, "w")
                process = subprocess.Popen(child_command(args, index, jobs, threads), cwd=REPO_ROOT, env=env,
                                           stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
                children.append(Child(index, process, log_path, log))
            while any(child.process.poll() is None for child in children):
                time.sleep(poll_seconds)
                for child in children:
                    child.relay()
        finally:
            for child in children:
                if child.process.poll() is None:
                    child.process.terminate()
                    child.process.wait()
                child.relay()
                child.log.close()
    codes = [child.process.returncode for child in children]
    for child, code in zip(children, codes):
        if code != 0:
            print(f"sweep: job {child.index} exited with {code} (log: {child.log_path}); "
                  "its failed points are tried again below", flush=True)
    return codes
