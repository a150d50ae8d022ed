"""Time the smoke preset's sharded stages rerun on a local Ray (what tests/flows/test_cli_pipeline.py does).

A default smoke run fills a base store once; each repeat copies it, deletes one shard file of
ingest, pretokenize and evaluate (so exactly they recompute, the training stages are verified
hits) and reruns with `runtime.task_runner=ray runtime.ray_workers=1`. Prints the wall time of
each rerun, each recomputed stage's own time from the run's log and how many local Rays it started.

    .venv/bin/python bench/ray_rerun.py --repeats 2
    .venv/bin/python bench/ray_rerun.py --repo /path/to/other/checkout   # the same with that code
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARDED = ("ingest", "pretokenize", "evaluate")
ENV = {"HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}


def tok1d(repo: Path, *args: str) -> str:
    # `-m flows.cli` from the checkout's root runs that checkout's code with this venv's packages.
    result = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=repo, capture_output=True, text=True,
                            env={**os.environ, **ENV})
    if result.returncode != 0:
        sys.exit(f"tok1d {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose code runs (default: this one)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the stores (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tok1d-ray-rerun-"))
    base = work / "base"
    if not (base / "experiments.duckdb").exists():
        print(f"default smoke run into {base} ...", flush=True)
        tok1d(args.repo, "run", "--preset", "smoke", "--store", str(base))
    print(f"code: {args.repo} | load average before: {os.getloadavg()[0]:.2f}")
    for repeat in range(1, args.repeats + 1):
        copy = work / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(base, copy)
        for stage in SHARDED:
            min((copy / "artifacts" / stage).rglob("part-*.parquet")).unlink()
        start = time.perf_counter()
        output = tok1d(args.repo, "run", "--preset", "smoke", "--store", str(copy),
                       "--set", "runtime.task_runner=ray", "--set", "runtime.ray_workers=1")
        seconds = time.perf_counter() - start
        stages = ", ".join(f"{stage} {m.group(1)} s" for stage in SHARDED
                           for m in [re.search(rf"{stage}: done in ([\d.]+)s", output)] if m)
        starts = output.count("Started a local Ray instance")
        print(f"rerun {repeat}: {seconds:.1f} s | {stages} | local Ray starts: {starts}", flush=True)


if __name__ == "__main__":
    main()
