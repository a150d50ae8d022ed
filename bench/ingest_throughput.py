"""Ingest throughput at ImageNet shape: a generated folder of JPEGs of 256-500 px (random sizes,
smooth content, 10 class folders) ingested at 256 px (centre crop) with 1 and 2 worker
processes per storage policy: images/s, CPU ms/image, stored bytes/image, decode ms/image (the
reader's `decode_stored`, one thread), peak RSS of the stage process and of its largest worker,
and the projected time for 1.28M images (at the measured rate; and per worker core from the
CPU time per image).

Policies: png (lossless, the default), jpeg (quality 95), and source on a second folder of
JPEGs already at 256x256 (where it applies: every file's bytes are kept). Each ingest runs in a
fresh process (the stage itself, without Prefect), so peak RSS is its own; a last pair of runs
at a quarter of the images and at all of them shows whether peak RSS grows with the count.

Images are a pure function of their index, generated once and cached (default
/tmp/tok1d-bench/ingest-jpegs), so any --images prefix is the same set.

    .venv/bin/python bench/ingest_throughput.py --images 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

IMAGENET_TRAIN = 1_281_167
RESOLUTION = 256
CLASSES = 10


def picture(index: int, square: bool):
    """Image `index`: 256-500 px per side (or 256x256), smooth colour fields plus mild noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([index, square])
    width, height = (RESOLUTION, RESOLUTION) if square else tuple(int(v) for v in rng.integers(256, 501, 2))
    grid = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    smooth = np.asarray(grid.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = smooth + rng.integers(-6, 7, smooth.shape, dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def generate(folder: Path, count: int, square: bool) -> Path:
    """The first `count` images in `folder/<class>/<index>.jpg` (JPEG quality 90), made if missing."""
    made = 0
    for index in range(count):
        path = folder / f"class{index % CLASSES}" / f"{index:07d}.jpg"
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        picture(index, square).save(tmp, format="JPEG", quality=90)
        os.replace(tmp, path)
        made += 1
    if made:
        print(f"generated {made} images in {folder}", file=sys.stderr)
    return folder


def subset(folder: Path, count: int, view: Path) -> Path:
    """A folder of hard links to the first `count` images (the cache may hold more; a symlink out
    of the source folder would be rejected as outside-source)."""
    for index in range(count):
        link = view / f"class{index % CLASSES}" / f"{index:07d}.jpg"
        link.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(folder / link.parent.name / link.name, link)
        except OSError:  # another file system
            shutil.copyfile(folder / link.parent.name / link.name, link)
    return view


def peak_rss_mib(pid: int | str = "self") -> float:
    """The process's own peak RSS (VmHWM: per address space, so not inherited through fork/exec
    as getrusage's ru_maxrss is)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass  # it exited between listing and reading
    return 0.0


class ChildPeaks(threading.Thread):
    """Samples the peak RSS of this process's children (the pool workers) every 0.2 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks: dict[int, float] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        me = str(os.getpid())
        while not self.stopped.wait(0.2):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                except (OSError, IndexError):
                    continue
                if parent == me:
                    pid = int(entry.name)
                    self.peaks[pid] = max(self.peaks.get(pid, 0.0), peak_rss_mib(pid))


def run_one(folder: str, policy: str, workers: int, work: str) -> None:
    """One ingest in this process; prints its figures as JSON (the --one mode)."""
    from tasks.config import IngestConfig, RuntimeConfig, SourceConfig, StorageConfig
    from tasks.ingest.stage import run_ingest
    from tasks.stage import StageContext
    from tasks.store import Store

    config = IngestConfig(
        source=SourceConfig(kind="folder", path=folder), resolution=RESOLUTION, val_fraction=0.0,
        storage=StorageConfig(policy=policy, quality=95),
    )
    ctx = StageContext(stage="ingest", config=config, inputs={}, store=Store(Path(work) / "store"),
                       runtime=RuntimeConfig(threads=workers), cache_key="b" * 64, work_dir=Path(work) / "work")
    baseline = peak_rss_mib()  # the imports, before the stage runs
    children = ChildPeaks()
    children.start()
    start, cpu = time.perf_counter(), os.times()
    output = run_ingest(ctx)
    wall, after = time.perf_counter() - start, os.times()
    children.stopped.set()
    children.join()
    used = (after.user - cpu.user) + (after.system - cpu.system)
    used += (after.children_user - cpu.children_user) + (after.children_system - cpu.children_system)
    print(json.dumps({
        "wall_s": wall, "cpu_s": used, "images": output.summary["images"], "rejected": output.summary["rejected"],
        "kept": output.summary.get("stored_source", 0), "output": str(ctx.output_dir),
        "rss_base_mib": baseline, "rss_main_mib": peak_rss_mib(), "rss_worker_mib": max(children.peaks.values(), default=0.0),
    }))


def measure(folder: Path, policy: str, workers: int, decode_sample: int) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from tasks.ingest.read import decode_stored

    with tempfile.TemporaryDirectory(prefix="tok1d-ingest-bench-") as work:
        command = [sys.executable, __file__, "--one", str(folder), policy, str(workers), work]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        if result.returncode != 0:
            raise SystemExit(f"ingest {policy} x{workers} failed:\n{result.stderr[-3000:]}")
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        tables = [pq.read_table(path, columns=["image", "image_format"])
                  for path in sorted(Path(figures["output"], "images").glob("*.parquet"))]
        stored = [t.column("image").to_pylist() for t in tables]
        formats = [t.column("image_format").to_pylist() for t in tables]
        data = [d for chunk in stored for d in chunk]
        kinds = [f for chunk in formats for f in chunk]
        sample = np.linspace(0, len(data) - 1, min(decode_sample, len(data))).astype(int)
        passes = []
        for _ in range(3):  # the best of three passes: the machine is shared
            start = time.perf_counter()
            for index in sample:
                decode_stored(data[index], kinds[index])
            passes.append((time.perf_counter() - start) / len(sample) * 1e3)
        decode_ms = min(passes)
    images = figures["images"]
    return {
        "policy": policy, "workers": workers, "images": images, "kept": figures["kept"],
        "img_s": images / figures["wall_s"], "cpu_ms": figures["cpu_s"] / images * 1e3,
        "cores": figures["cpu_s"] / figures["wall_s"], "rss_base": figures["rss_base_mib"],
        "bytes": sum(len(d) for d in data) / images, "decode_ms": decode_ms,
        "rss_main": figures["rss_main_mib"], "rss_worker": figures["rss_worker_mib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--policies", default="png,jpeg,source")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "tok1d-bench" / "ingest-jpegs")
    parser.add_argument("--decode-sample", type=int, default=1000)
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        folder, policy, workers, work = args.one
        run_one(folder, policy, int(workers), work)
        return

    mixed = generate(args.cache / "mixed", args.images, square=False)
    square = generate(args.cache / "square256", args.images, square=True) if "source" in args.policies else None
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {os.cpu_count()} CPU(s)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tok1d-ingest-views-") as views:
        views = Path(views)
        folders = {"mixed": subset(mixed, args.images, views / "mixed")}
        if square is not None:
            folders["square"] = subset(square, args.images, views / "square")
        for policy in args.policies.split(","):
            folder = folders["square" if policy == "source" else "mixed"]
            for workers in (int(w) for w in args.workers.split(",")):
                rows.append(measure(folder, policy, workers, args.decode_sample))
                print(f"  done: {policy} x{workers}", file=sys.stderr)
        # Peak RSS against the image count: jpeg with 1 worker at a quarter of the images and at all.
        full = next((r for r in rows if (r["policy"], r["workers"]) == ("jpeg", 1)), None)
        full = full or measure(folders["mixed"], "jpeg", 1, 1)
        flat = [measure(subset(mixed, max(1, args.images // 4), views / "quarter"), "jpeg", 1, 1), full]
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    print(f"\n{args.images} JPEGs (256-500 px; source: 256x256 JPEGs) -> {RESOLUTION} px, centre crop")
    # cores: CPU seconds of the stage and its workers per wall second (what the machine gave it).
    header = (f"{'policy':<8}{'workers':>8}{'kept':>7}{'img/s':>9}{'cores':>7}{'CPU ms/img':>12}{'KB/img':>9}"
              f"{'decode ms':>11}{'RSS main':>10}{'RSS wkr':>9}{'1.28M (h)':>11}")
    print(header)
    print("-" * len(header))
    for row in rows:
        projected = IMAGENET_TRAIN / row["img_s"] / 3600
        print(f"{row['policy']:<8}{row['workers']:>8}{row['kept'] / row['images']:>7.0%}{row['img_s']:>9.1f}{row['cores']:>7.2f}{row['cpu_ms']:>12.1f}"
              f"{row['bytes'] / 1024:>9.1f}{row['decode_ms']:>11.2f}{row['rss_main']:>9.0f}M{row['rss_worker']:>8.0f}M"
              f"{projected:>11.2f}")
    for policy in dict.fromkeys(row["policy"] for row in rows):
        by_workers = {row["workers"]: row for row in rows if row["policy"] == policy}
        if 1 in by_workers and 2 in by_workers:
            one, two = by_workers[1], by_workers[2]
            print(f"{policy}: 2 workers {two['img_s'] / one['img_s']:.2f}x 1 worker; 1.28M images at "
                  f"{one['cpu_ms']:.1f} CPU ms/img = {IMAGENET_TRAIN * one['cpu_ms'] / 3.6e6:.1f} worker-core hours, "
                  f"{IMAGENET_TRAIN * one['bytes'] / 1e9:.1f} GB stored")
    slope = (flat[1]["rss_main"] - flat[0]["rss_main"]) / max(1, flat[1]["images"] - flat[0]["images"]) * 1024
    print(f"peak RSS (jpeg, 1 worker): {flat[0]['rss_main']:.0f} MiB at {flat[0]['images']} images, "
          f"{flat[1]['rss_main']:.0f} MiB at {flat[1]['images']} images ({slope:.2f} KiB per further image; "
          f"{flat[1]['rss_base']:.0f} MiB after imports, before the stage)")


if __name__ == "__main__":
    main()
