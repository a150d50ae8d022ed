"""Peak memory (max RSS) of the pretokenize stage on 10% and 100% of Fashion-MNIST.

The stage streams ingest shards and writes token parts as it goes, so its peak memory should
not grow with the dataset (target: the 100% run within 20% of the 10% run). Each measured run
is a fresh child process; its peak RSS comes from the kernel's accounting of that child
(`os.wait4`, the per-child form of getrusage(RUSAGE_CHILDREN).ru_maxrss).

    .venv/bin/python bench/pretokenize_memory.py --preset fashion-mnist-titok --fractions 0.1 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FASHION_MNIST_IMAGES = 70_000


def child(store_root: str, manifests_path: str, preset: str) -> None:
    """Run pretokenize once (in this fresh process) and print its summary as JSON."""
    import torch

    from pretokenize_throughput import run_stage
    from tasks.store import Manifest, Store

    torch.set_num_threads(2)
    manifests = {k: Manifest.model_validate(v) for k, v in json.loads(Path(manifests_path).read_text()).items()}
    print(json.dumps(run_stage(Store(store_root), manifests, preset)))


def measure(store_root: Path, manifests: dict, preset: str) -> tuple[float, dict]:
    """(peak RSS in MiB, summary) of one pretokenize run in a child process."""
    path = store_root / "manifests.json"
    path.write_text(json.dumps({k: m.model_dump(mode="json") for k, m in manifests.items()}))
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", str(store_root), str(path), preset],
        stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)},
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"pretokenize child failed with exit code {process.returncode}")
    return usage.ru_maxrss / 1024, json.loads(output.decode().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fashion-mnist-titok")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--child", nargs=3, metavar=("STORE", "MANIFESTS", "PRESET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from pretokenize_throughput import prepare
    from tasks.store import Store

    rows = []
    for fraction in args.fractions:
        images = round(FASHION_MNIST_IMAGES * fraction)
        root = Path(tempfile.mkdtemp(prefix="tok1d-bench-memory-"))
        try:
            manifests = prepare(Store(root), args.preset, images)
            peak, summary = measure(root, manifests, args.preset)
            rows.append((fraction, summary["rows"], peak, summary["seconds"]))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\npeak RSS of pretokenize ({args.preset}), each run in a fresh process")
    print(f"{'fraction':>8} {'images':>8} {'peak MiB':>9} {'seconds':>8} {'vs first':>9}")
    for fraction, images, peak, seconds in rows:
        print(f"{fraction:>8.0%} {images:>8} {peak:>9.1f} {seconds:>8.1f} {peak / rows[0][2]:>8.2f}x")


if __name__ == "__main__":
    main()
