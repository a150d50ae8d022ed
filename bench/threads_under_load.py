"""The default preset's tokenizer stage with and without a concurrent CPU-bound process, with
tok1d's automatic thread count and with every core's thread fixed (`runtime.threads=<cores>`).

Two torch threads on a 2-core machine with any other load run up to 10x slower; the automatic
count (tasks/cores.py) takes one thread per free core and follows the load while training. Each
trial trains a fresh tokenizer (its own `train.seed`, so no cache hit; the work is the same) in
a store whose ingest was built once (and whose originals' Inception features an untimed first
trial cached), and reports the stage's own time from its log line. The load is one busy-looping
Python process, started before the stage and killed after it.

    .venv/bin/python bench/threads_under_load.py --steps 200
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks.cores import available_cores  # noqa: E402

SPIN = "while True: pass\n"
DONE = re.compile(r"train-tokenizer: done in ([\d.]+)s")
THREADS = re.compile(r"train-tokenizer: (\d+) torch thread\(s\) \((.*)\)$", re.MULTILINE)
CHANGES = re.compile(r"train-tokenizer: torch threads (\d+) -> (\d+)")


def tok1d(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"tok1d {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def trial(store: Path, seed: int, steps: int, eval_images: int, fixed: int | None, loaded: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    overrides = [f"train_tokenizer.train.steps={steps}", f"train_tokenizer.train.seed={seed}",
                 f"train_tokenizer.eval_images={eval_images}", f"train_tokenizer.fid_images={eval_images}"]
    if fixed is not None:
        overrides.append(f"runtime.threads={fixed}")
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if loaded else None
    try:
        if spinner is not None:
            time.sleep(1.0)  # the load is running before the stage looks at it
        started = time.monotonic()
        log = tok1d(["stage", "train-tokenizer", "--store", str(store), *sum((["--set", o] for o in overrides), [])], env)
        wall = time.monotonic() - started
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    done, threads = DONE.search(log), THREADS.search(log)
    if done is None:
        raise SystemExit(f"no 'train-tokenizer: done in' line in the log:\n{log[-3000:]}")
    return {
        "stage_s": float(done[1]),
        "wall_s": wall,
        "threads": f"{threads[1]} ({threads[2]})" if threads else "?",
        "changes": ", ".join(f"{a}->{b}" for a, b in CHANGES.findall(log)) or "none",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="tokenizer training steps per trial")
    parser.add_argument("--eval-images", type=int, default=100, help="validation images of the stage's metrics")
    parser.add_argument("--store", type=Path, default=None, help="store to use (default: a temporary one)")
    args = parser.parse_args()
    cores = available_cores()
    with tempfile.TemporaryDirectory(prefix="tok1d-threads-") as tmp:
        store = args.store or Path(tmp) / "store"
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        tok1d(["stage", "ingest", "--store", str(store)], env)
        # A first, untimed trial fills the store's Inception feature cache with the validation
        # originals, which every later trial then reads instead of recomputing.
        trial(store, 99, args.steps, args.eval_images, None, False)
        print(f"default preset, train-tokenizer: {args.steps} steps, metrics on {args.eval_images} images; "
              f"{cores} core(s) available; load = one busy-looping process")
        print(f"{'threads':<28}{'load':<8}{'stage s':>9}{'slowdown':>10}  chosen (log)  / changes")
        seed = 100
        for label, fixed in (("auto (tok1d default)", None), (f"fixed runtime.threads={cores}", cores)):
            quiet = None
            for loaded in (False, True):
                seed += 1
                result = trial(store, seed, args.steps, args.eval_images, fixed, loaded)
                quiet = quiet or result["stage_s"]
                print(f"{label:<28}{'busy' if loaded else 'quiet':<8}{result['stage_s']:>9.1f}"
                      f"{result['stage_s'] / quiet:>9.2f}x  {result['threads']}  / {result['changes']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
