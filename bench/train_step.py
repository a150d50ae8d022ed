"""Steps/s of a preset's tokenizer and generator training step on this machine, where the time
goes, and the fraction of the fp32 matrix-multiply rate (measured in the same run) it reaches.

The stages' own trainers run (the same `step` the pipeline calls), on the preset's data: the
script first runs the preset up to pretokenize in a bench store (a short tokenizer run: the
generator's step cost does not depend on the tokenizer's quality; cached after the first time).
FLOPs per step are counted with torch's FlopCounterMode (forward + backward); the phases are
the `record_function` labels of the trainers and `tasks.training.loop.optimize`, summed by
torch.profiler; minor page faults per step come from getrusage.

    .venv/bin/python bench/train_step.py --preset default --steps 60
"""

from __future__ import annotations

import argparse
import itertools
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.inception_throughput import MATMUL_N, best_seconds, matmul_fn  # noqa: E402
from flows.run_plan import plan_cached_run  # noqa: E402
from tasks.allocator import reuse_freed_memory  # noqa: E402
from tasks.config import RuntimeConfig  # noqa: E402
from tasks.presets import load_config  # noqa: E402
from tasks.stage import StageContext  # noqa: E402
from tasks.store import Store  # noqa: E402
from tasks.train_generator.trainer import GeneratorTrainer  # noqa: E402
from tasks.train_tokenizer.trainer import TokenizerTrainer  # noqa: E402
from tasks.training.distributed import setup  # noqa: E402
from tasks.training.data import Position, global_batches  # noqa: E402
from tasks.training.job import TrainingJob  # noqa: E402
from tasks.training.loop import PHASES  # noqa: E402

# A short tokenizer for the generator's tokens: its quality does not change the generator's step.
PREPARE = ["--set", "train_tokenizer.train.steps=20", "--set", "train_tokenizer.fid_images=-1",
           "--set", "train_tokenizer.eval_images=16", "--set", "pretokenize.decode_check_images=1"]


def prepare_store(preset: str, store: Path, overrides: list[str]) -> dict:
    """Run the preset up to pretokenize (cached after the first time); the stages' manifests."""
    command = [sys.executable, "-m", "flows.cli", "stage", "pretokenize", "--preset", preset, "--store", str(store),
               *PREPARE, *overrides]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    config = load_config(preset, [*PREPARE[1::2], *overrides[1::2]])
    cached = plan_cached_run(config, Store(store), until="pretokenize")
    if cached is None:
        raise SystemExit("bench: the prepared store has no cached run up to pretokenize")
    return {"config": config, "manifests": {stage.name: stage.manifest for stage in cached}}


def build_trainer(trainer_type: type, stage: str, section, manifests: dict, store: Path, work: Path):
    inputs = {name: manifests[name] for name in manifests if name != stage}
    ctx = StageContext(stage=stage, config=section, inputs=inputs, store=Store(store),
                       runtime=RuntimeConfig(device="cpu"), cache_key="bench", work_dir=work)
    return trainer_type(TrainingJob.from_context(trainer_type, ctx), setup("cpu"))


def step_flops(trainer, rows) -> float:
    """FLOPs of one step's forward and backward (the optimizer's elementwise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        trainer.step(rows, 0)
    return float(counter.get_total_flops())


def measure(name: str, trainer, steps: int, matmul_rate: float) -> None:
    batch = trainer.config.train.batch_size
    batches = [rows for rows, _ in itertools.islice(global_batches(trainer.order, batch, Position()), steps + 5)]
    rows_of = batches.__getitem__
    flops = step_flops(trainer, rows_of(0))
    for s in range(5):  # warm-up: allocator, oneDNN primitives
        trainer.step(rows_of(s), s)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for s in range(steps):
        trainer.step(rows_of(s), s)
    seconds = (time.perf_counter() - start) / steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in range(min(steps, 20)):
            trainer.step(rows_of(s), s)
    profiled = min(steps, 20)
    phases = {e.key: e.cpu_time_total / 1e3 / profiled for e in prof.key_averages() if e.key in PHASES}
    rate = flops / seconds / 1e9
    print(f"\n{name}: batch {batch}, {flops / 1e9:.2f} GFLOP/step (forward + backward)")
    print(f"  {1 / seconds:.2f} steps/s ({seconds * 1e3:.1f} ms/step), {rate:.1f} GFLOP/s = "
          f"{rate / matmul_rate:.0%} of the {matmul_rate:.0f} GFLOP/s fp32 matmul rate; "
          f"{faults:.0f} minor page faults/step")
    accounted = sum(phases.values())
    print("  phase (ms/step, profiled): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
          + f"; other {max(0.0, seconds * 1e3 - accounted):.1f} (profiler adds its own overhead)")
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    print("  top ops by self time (ms/step): " + ", ".join(
        f"{e.key} {e.self_cpu_time_total / 1e3 / profiled:.1f}" for e in top if e.key not in PHASES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--store", type=Path, default=Path(tempfile.gettempdir()) / "tok1d-bench-train-step")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--glibc-default-malloc", action="store_true",
                        help="leave glibc's allocator as it is (the pipeline reuses freed memory: tasks/allocator.py)")
    args = parser.parse_args()
    reused = False if args.glibc_default_malloc else reuse_freed_memory()
    overrides = [item for value in args.overrides for item in ("--set", value)]
    torch.set_num_threads(args.threads)
    prepared = prepare_store(args.preset, args.store, overrides)
    config, manifests = prepared["config"], prepared["manifests"]
    matmul = matmul_fn()
    matmul_rate = 2 * MATMUL_N ** 3 / best_seconds({"matmul": matmul}, 5)["matmul"] / 1e9
    print(f"{args.preset}: torch {torch.__version__}, {args.threads} thread(s), fp32 matmul "
          f"{MATMUL_N}^2 at {matmul_rate:.0f} GFLOP/s, freed memory {'reused' if reused else 'unmapped (glibc default)'}")
    with tempfile.TemporaryDirectory() as work:
        tokenizer = build_trainer(TokenizerTrainer, "train-tokenizer", config.section("train-tokenizer"),
                                  manifests, args.store, Path(work) / "tok")
        measure("train-tokenizer", tokenizer, args.steps, matmul_rate)
        tokenizer.close()
        generator = build_trainer(GeneratorTrainer, "train-generator", config.section("train-generator"),
                                  manifests, args.store, Path(work) / "gen")
        measure("train-generator", generator, args.steps, matmul_rate)
    matmul_after = 2 * MATMUL_N ** 3 / best_seconds({"matmul": matmul}, 5)["matmul"] / 1e9
    print(f"\nfp32 matmul after the runs: {matmul_after:.0f} GFLOP/s (a drop means other load)")


if __name__ == "__main__":
    main()
