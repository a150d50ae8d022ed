"""A fully cached `tok1d run` against the cold run that filled the store, in one script.

Cold: `tok1d run --preset <preset>` into an empty store. Warm: the same command again,
`--warm-runs` times (every stage a verified cache hit, answered without starting Prefect), and
once with `--flow` (the same hits through the Prefect flow and its ephemeral server). Also timed:
the import of the config layer every run needs (`tasks.pipeline_config` imports the stage modules,
which import no torch: what a stage computes is imported when it runs), the floor of any `tok1d run`.

    .venv/bin/python bench/cached_run.py --preset smoke --warm-runs 3
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

REPO = Path(__file__).resolve().parent.parent


def timed(command: list[str]) -> tuple[float, str]:
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=dict(os.environ))
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return wall, result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--warm-runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tok1d-cached-run-") as tmp:
        run = [sys.executable, "-m", "flows.cli", "run", "--preset", args.preset, "--store", str(Path(tmp) / "store")]
        cold, _ = timed(run)
        warm = []
        for _ in range(args.warm_runs):
            wall, out = timed(run)
            if "answered from the store without starting Prefect" not in out:
                raise SystemExit(f"the warm run was not answered from the cache:\n{out[-2000:]}")
            warm.append(wall)
        flow, _ = timed([*run, "--flow"])
        imports = [timed([sys.executable, "-c", "import tasks.pipeline_config"])[0] for _ in range(2)]
    median = statistics.median(warm)
    print(f"preset {args.preset}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end")
    print(f"cold run (empty store)             {cold:8.1f} s")
    print(f"cached run, no Prefect (median/{len(warm)})  {median:8.1f} s   {100 * median / cold:5.1f}% of cold   "
          f"(runs: {', '.join(f'{w:.1f}' for w in warm)})")
    print(f"cached run through the flow (--flow) {flow:8.1f} s   {100 * flow / cold:5.1f}% of cold")
    print(f"python -c 'import tasks.pipeline_config' {min(imports):6.1f} s   (the floor: the config layer and stage declarations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
