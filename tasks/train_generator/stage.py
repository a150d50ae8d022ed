"""The `train-generator` stage: a pretokenize token table -> a MaskGIT or DiT generator.

The generator never sees an image: it trains on the train rows of the `tokens` table.
kind=auto picks MaskGIT for discrete (VQ) tokens and DiT + Gaussian diffusion for continuous
(KL) tokens; conditioning is the class label, or (DiT only) the caption's text-embedding tokens
through cross-attention. Continuous tokens are divided by the std of the train tokens (stored in
generator.json as `scale`) so the diffusion sees unit-scale data.

Training goes through the shared loop (tasks/training/loop.py): warmup + cosine schedule, grad
clipping, EMA, bf16 autocast on GPU, atomic checkpoints in the stage's work directory, so a
killed run resumes where its last checkpoint left off and ends with the same weights as an
uninterrupted one. With runtime.processes > 1 (default: one per visible GPU) the stage launches
torchrun on `tasks.train_generator.worker`.

Output: generator.safetensors (EMA weights), generator-raw.safetensors, generator.json,
losses.jsonl, losses.png.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import torch

from tasks.config import RuntimeConfig, TrainGeneratorConfig
from tasks.stage import Stage, StageContext, StageOutput
from tasks.store import read_json
from tasks.train_generator.worker import (
    SUMMARY_FILE,
    WorkerSpec,
    read_token_meta,
    resolve_kind,
    token_scale,
    train_generator,
)

log = logging.getLogger("tok1d")


def process_count(runtime: RuntimeConfig) -> int:
    """runtime.processes, or one process per visible GPU when training on CUDA (else one)."""
    if runtime.processes is not None:
        if runtime.processes < 1:
            raise ValueError(f"runtime.processes must be >= 1, got {runtime.processes}")
        return runtime.processes
    uses_cuda = runtime.device == "cuda" or (runtime.device == "auto" and torch.cuda.is_available())
    return max(1, torch.cuda.device_count()) if uses_cuda else 1


def run_train_generator(ctx: StageContext) -> StageOutput:
    config: TrainGeneratorConfig = ctx.config
    pretokenize = ctx.inputs["pretokenize"]
    meta = read_token_meta(pretokenize, ctx.store)
    kind = resolve_kind(config, meta)  # fail on a bad kind/conditioning before any work
    processes = process_count(ctx.runtime)
    if config.train.batch_size % processes:
        raise ValueError(f"train_generator.train.batch_size={config.train.batch_size} must be divisible by the "
                         f"{processes} training processes (runtime.processes)")
    scale = token_scale(meta) if kind == "dit" else None
    spec = WorkerSpec(
        store=str(ctx.store.root),
        inputs={name: manifest.model_dump(mode="json") for name, manifest in ctx.inputs.items()},
        config=config.model_dump(mode="json"),
        work_dir=str(ctx.work_dir),
        output_dir=str(ctx.output_dir),
        device=ctx.runtime.device,
        scale=scale,
        threads=ctx.runtime.threads,
    )
    if processes == 1:
        summary = train_generator(spec)
    else:
        summary = _run_torchrun(spec, processes, ctx)
    log.info("train-generator: %s (%s) trained for %d steps, final loss %s",
             summary["kind"], summary["conditioning"], summary["steps"], summary["final_loss"])
    return StageOutput(tables={}, summary=summary)


def _run_torchrun(spec: WorkerSpec, processes: int, ctx: StageContext) -> dict:
    spec_path = ctx.work_dir / "worker-spec.json"
    summary_path = ctx.work_dir / SUMMARY_FILE
    summary_path.unlink(missing_ok=True)
    spec.save(spec_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "tasks.train_generator.worker", str(spec_path)]
    log.info("train-generator: %s", " ".join(command))
    completed = subprocess.run(command)
    if completed.returncode != 0 or not summary_path.exists():
        raise RuntimeError(f"train-generator: torchrun with {processes} processes failed (exit code "
                           f"{completed.returncode}); its output above names the error. Rerunning resumes from the "
                           f"last checkpoint in {ctx.work_dir / 'checkpoints'}")
    return read_json(summary_path)


STAGE = Stage(
    name="train-generator",
    description="MaskGIT (discrete tokens) or DiT (continuous tokens) trained on the token table",
    inputs=("caption", "embed-text", "pretokenize"),
    code=("tasks.train_generator", "tasks.training", "tasks.pretokenize.read", "models.maskgit", "models.dit",
          "models.diffusion", "models.ema"),
    run=run_train_generator,
)
