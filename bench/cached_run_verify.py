"""How long a cache hit takes to verify its artifact: stat fingerprints against the full sha256.

For each artifact size, a throwaway store gets one artifact of random bytes from a bench stage
run through the real runner (write, hash once, commit, record fingerprints, cache record). Then:

- hit (fingerprints): `plan_stage_run`, the verification a cache hit does now (median of 5), and
  how many artifact bytes it read;
- full sha256: `Manifest.problems`, what every cache hit did before (twice per cached run under
  Prefect) and what `tok1d verify` does, with the page cache warm (just written) and after
  evicting the file's pages (`posix_fadvise(DONTNEED)`, no root needed; a VM's host may still
  cache them).

Each store is deleted before the next size is built, so the disk holds one artifact at a time.

    .venv/bin/python bench/cached_run_verify.py --sizes 16,64,256,64x256
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tasks.fingerprints as fingerprints  # noqa: E402
import tasks.registry as registry  # noqa: E402
from tasks.config import IngestConfig  # noqa: E402
from tasks.runner import execute_stage, plan_stage_run  # noqa: E402
from tasks.stage import Stage, StageOutput, fixed_inputs  # noqa: E402
from tasks.store import Manifest, Store  # noqa: E402

STAGE = "bench-blob"
_CHUNK = 8 << 20
# (total bytes, files) of the artifact the bench stage writes next.
_PLAN = {"bytes": 0, "files": 1}


def _write_blobs(ctx) -> StageOutput:
    total, files = _PLAN["bytes"], _PLAN["files"]
    for index in range(files):
        remaining = total // files + (1 if index < total % files else 0)
        with open(ctx.output_dir / f"blob-{index:05d}.bin", "wb") as handle:
            while remaining:
                chunk = os.urandom(min(_CHUNK, remaining))
                handle.write(chunk)
                remaining -= len(chunk)
    return StageOutput(tables={}, summary={"bytes": total, "files": files})


registry.stages()[STAGE] = Stage(STAGE, "bench: random bytes", IngestConfig, fixed_inputs(), _write_blobs,
                               code="tasks.hashing")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'16,64x256' -> [(16 MB, 1 file), (64 MB, 256 files)]."""
    sizes = []
    for item in text.split(","):
        megabytes, _, files = item.partition("x")
        sizes.append((int(megabytes), int(files or 1)))
    return sizes


def evict(store: Store, manifest: Manifest) -> None:
    for record in manifest.files:
        fd = os.open(manifest.path(store, record.path), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(root: Path, megabytes: int, files: int) -> dict:
    store = Store(root)
    _PLAN.update(bytes=megabytes * 10**6, files=files)
    section = IngestConfig()
    manifest = execute_stage(STAGE, section, {}, store).manifest
    assert not manifest.problems(store)

    read: list[int] = []  # sizes of the artifact files a hit hashed
    original = fingerprints.sha256_file

    def counting_sha256(path: Path) -> str:
        read.append(os.path.getsize(path))
        return original(path)

    fingerprints.sha256_file = counting_sha256
    try:
        hits = []
        for _ in range(5):
            start = time.perf_counter()
            plan = plan_stage_run(STAGE, section, {}, store)
            hits.append(time.perf_counter() - start)
            assert plan.slot.manifest is not None, "expected a cache hit"
    finally:
        fingerprints.sha256_file = original

    warm = min(timed(lambda: manifest.problems(store)) for _ in range(2))
    evict(store, manifest)
    cold = timed(lambda: manifest.problems(store))
    return dict(megabytes=megabytes, files=files, hit_ms=1000 * statistics.median(hits), hit_read=sum(read),
                warm_s=warm, cold_s=cold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256,64x256",
                        help="artifact sizes in MB (10^6 bytes), MBxFILES to split one into files (default: %(default)s)")
    parser.add_argument("--dir", default=None, help="where the throwaway stores go (default: the system temp dir)")
    args = parser.parse_args()

    print(f"{'artifact':>10}{'files':>7}{'hit, fingerprints':>19}{'bytes read':>12}"
          f"{'full sha256, warm':>19}{'cold':>11}{'cold MB/s':>11}{'speed-up (cold)':>17}")
    rates = []
    for megabytes, files in parse_sizes(args.sizes):
        root = Path(tempfile.mkdtemp(prefix="tok1d-bench-verify-", dir=args.dir))
        try:
            row = measure(root / "store", megabytes, files)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        rate = megabytes / row["cold_s"]
        rates.append(rate)
        print(f"{megabytes:>7} MB{files:>7}{row['hit_ms']:>16.2f} ms{row['hit_read']:>12}"
              f"{1000 * row['warm_s']:>16.0f} ms{1000 * row['cold_s']:>8.0f} ms{rate:>11.0f}"
              f"{row['cold_s'] * 1000 / row['hit_ms']:>16.0f}x")
    rate = statistics.median(rates)
    print(f"\nat the median cold rate ({rate:.0f} MB/s), one full sha256 of a 138 GB ingest table takes "
          f"{138e3 / rate / 60:.0f} min; a cached run under Prefect did it twice")


if __name__ == "__main__":
    main()
