"""The `train-tokenizer` stage: a TiTok (VQ) or TexTok (KL, text-conditioned) 1D tokenizer
trained on the ingested train split with the shared loop, then scored on the validation split.

One process trains in the stage's own process; several (`runtime.processes`, or one per GPU)
run as torchrun workers (`tasks.train_tokenizer.worker`) calling the same `fit`, with the
model in DistributedDataParallel. Every rank derives its random numbers from (seed, step,
rank), and the loop checkpoints weights, EMA, discriminator, optimizers and the data position,
so a killed run resumes from `work_dir` and ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from models.ema import EMA, param_groups_for_adamw
from models.inception import InceptionFeatures
from models.tokenizer import Tokenizer, TokenizerConfig
from models.tokenizer_loss import TokenizerLoss, load_lpips_if_available
from tasks.config import RuntimeConfig, TrainTokenizerConfig
from tasks.stage import Stage, StageContext, StageOutput
from tasks.store import Manifest, Store, TableRecord, read_json, temporary_path, write_json
from tasks.train_tokenizer.data import BatchLoader, TextSource, TrainImages, image_resolution, iter_eval_batches
from tasks.train_tokenizer.load import save_tokenizer
from tasks.train_tokenizer.reconstruction import evaluate_reconstructions, write_report
from tasks.training.distributed import Processes, barrier, setup
from tasks.training.loop import TrainingResult, TrainingRun, autocast, optimize, plot_losses, train

log = logging.getLogger("tok1d")

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULT_FILE = "result.json"
JOB_FILE = "job.json"
LOSS_PLOT = "losses.png"
GRID_FILE = "reconstructions.png"


@dataclass
class TrainJob:
    """What one training process needs; travels to torchrun workers as JSON."""

    stage: str
    config: TrainTokenizerConfig
    inputs: dict[str, Manifest]
    store_root: str
    runtime: RuntimeConfig
    work_dir: str

    @classmethod
    def from_context(cls, ctx: StageContext) -> "TrainJob":
        return cls(ctx.stage, ctx.config, ctx.inputs, str(ctx.store.root), ctx.runtime, str(ctx.work_dir))

    @property
    def store(self) -> Store:
        return Store(self.store_root)

    @property
    def output_dir(self) -> Path:
        path = Path(self.work_dir) / "output"  # = StageContext.output_dir
        path.mkdir(parents=True, exist_ok=True)
        return path

    def to_json(self) -> str:
        return json.dumps(
            {
                "stage": self.stage,
                "config": self.config.model_dump(mode="json"),
                "inputs": {name: manifest.model_dump(mode="json") for name, manifest in self.inputs.items()},
                "store_root": self.store_root,
                "runtime": self.runtime.model_dump(mode="json"),
                "work_dir": self.work_dir,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "TrainJob":
        raw = json.loads(text)
        return cls(
            stage=raw["stage"],
            config=TrainTokenizerConfig.model_validate_json(json.dumps(raw["config"])),
            inputs={name: Manifest.model_validate(value) for name, value in raw["inputs"].items()},
            store_root=raw["store_root"],
            runtime=RuntimeConfig.model_validate_json(json.dumps(raw["runtime"])),
            work_dir=raw["work_dir"],
        )


class GanState(nn.Module):
    """The discriminator and LeCAM anchors of a `TokenizerLoss`, for checkpoints.

    Holds the loss's own discriminator and buffer tensors (not copies): loading a checkpoint
    into this module restores them in the loss, and the frozen perceptual network (which
    never changes) stays out of every checkpoint.
    """

    def __init__(self, loss: TokenizerLoss):
        super().__init__()
        self.discriminator = loss.discriminator
        self.register_buffer("ema_real_logits", loss.ema_real_logits)
        self.register_buffer("ema_fake_logits", loss.ema_fake_logits)


class InceptionMaps(nn.Module):
    """Inception feature maps as the list-of-maps network `PerceptualLoss` expects."""

    def __init__(self, inception: InceptionFeatures):
        super().__init__()
        self.inception = inception

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.inception.feature_maps(images)


# ---------------------------------------------------------------------------- training


def check_config(config: TrainTokenizerConfig, world: int) -> None:
    train_config = config.train
    if train_config.steps < 1:
        raise ValueError(f"train_tokenizer.train.steps must be >= 1, got {train_config.steps}")
    if train_config.batch_size < 1 or train_config.batch_size % world:
        raise ValueError(
            f"train_tokenizer.train.batch_size={train_config.batch_size} must be a positive multiple of "
            f"the {world} training processes (runtime.processes)"
        )
    if train_config.checkpoint_every < 1 or train_config.log_every < 1:
        raise ValueError("train_tokenizer.train.checkpoint_every and log_every must be >= 1")
    if len(train_config.betas) != 2:
        raise ValueError(f"train_tokenizer.train.betas must hold two numbers, got {train_config.betas}")
    if config.eval_images < 0 or config.eval_batch_size < 1 or config.grid_images < 0:
        raise ValueError("train_tokenizer.eval_images and grid_images must be >= 0, eval_batch_size >= 1")


def build_loss(config: TrainTokenizerConfig, inception: InceptionFeatures | None) -> TokenizerLoss:
    """Generator/discriminator objectives with the configured perceptual network."""
    loss_config = config.loss.to_dataclass(channels=3)
    if config.perceptual == "none" or loss_config.perceptual_weight == 0:
        return TokenizerLoss(dataclasses.replace(loss_config, perceptual_weight=0.0), None)
    if config.perceptual == "lpips":
        distance = load_lpips_if_available(config.lpips_path, loss_config.perceptual_resize)
        if distance is None:
            raise FileNotFoundError(
                f"train_tokenizer.perceptual=lpips needs the `lpips` package and a full LPIPS(vgg) state dict at "
                f"train_tokenizer.lpips_path (got {config.lpips_path!r}); or use perceptual: inception"
            )
        return TokenizerLoss(loss_config, distance)
    return TokenizerLoss(loss_config, InceptionMaps(inception))


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step on one rank: randomness independent of where a run resumed."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


class TokenizerTrainer:
    """Model, EMA, loss (with discriminator), optimizers and data of one training process."""

    def __init__(self, job: TrainJob, processes: Processes):
        config, train_config = job.config, job.config.train
        check_config(config, processes.world)
        self.job, self.config, self.processes = job, config, processes
        self.device = device = processes.device
        store, ingest = job.store, job.inputs["ingest"]

        self.text = TextSource(job.inputs["caption"], job.inputs["embed-text"], store) if config.use_text else None
        self.images = TrainImages(ingest, store, train_config.seed, train_config.shuffle_group, "train", self.text,
                                  config.hflip)
        if train_config.batch_size > len(self.images):
            raise ValueError(f"train_tokenizer.train.batch_size={train_config.batch_size} exceeds the "
                             f"{len(self.images)} training images")
        self.model_config: TokenizerConfig = config.model.to_dataclass(
            image_size=image_resolution(ingest, store),
            channels=3,
            text_dim=self.text.dim if self.text else 0,
            max_text_tokens=self.text.max_tokens if self.text else 0,
        )
        torch.manual_seed(train_config.seed)  # identical initial weights on every rank
        self.model = Tokenizer(self.model_config).to(device)
        uses_inception = config.perceptual == "inception" and config.loss.perceptual_weight > 0
        self.inception = InceptionFeatures(resize_to=config.loss.perceptual_resize).to(device) if uses_inception else None
        self.loss = build_loss(config, self.inception).to(device)
        self.ema = EMA(self.model, train_config.ema_decay)

        betas = (train_config.betas[0], train_config.betas[1])
        groups = param_groups_for_adamw(self.model, train_config.weight_decay)
        self.optimizers = {"model": torch.optim.AdamW(groups, lr=train_config.lr, betas=betas)}
        # Checkpointed by name; the EMA copy is a plain module too.
        self.modules: dict[str, nn.Module] = {"model": self.model, "ema": self.ema.module}
        if self.loss.discriminator is not None:
            self.modules["gan"] = GanState(self.loss)
            self.optimizers["discriminator"] = torch.optim.AdamW(
                param_groups_for_adamw(self.loss.discriminator, train_config.weight_decay),
                lr=config.discriminator_lr or train_config.lr,
                betas=betas,
            )
        self.forward: nn.Module = self.model
        if processes.distributed:
            self.forward = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if train_config.compile:
            self.forward = torch.compile(self.forward)
        self.loader = BatchLoader(self.images, train_config.batch_size, processes.rank, processes.world,
                                  job.runtime.data_workers)

    def step(self, rows: np.ndarray, step: int) -> dict[str, float]:
        """One generator step (and one discriminator step once the GAN is active)."""
        train_config, processes = self.config.train, self.processes
        torch.manual_seed(step_seed(train_config.seed, step, processes.rank))
        batch = self.loader.get(rows, step).to(self.device)
        self.model.train()
        self.loss.train()
        with autocast(self.device, train_config.precision):
            output = self.forward(batch.images, batch.text, batch.text_mask)
            generator_loss, logs = self.loss.generator_loss(batch.images, output, step)
        logs["grad_norm"] = optimize(generator_loss, self.model, self.optimizers["model"], train_config.grad_clip,
                                     processes, ddp_wrapped=processes.distributed)
        self.ema.update(self.model)
        if self.loss.gan_active(step):
            with autocast(self.device, train_config.precision):
                d_loss, d_logs = self.loss.discriminator_loss(batch.images, output.reconstruction, step)
            # A plain module: optimize() averages its gradients over processes itself.
            d_logs["d_grad_norm"] = optimize(d_loss, self.loss.discriminator, self.optimizers["discriminator"],
                                             train_config.grad_clip, processes, ddp_wrapped=False)
            logs.update(d_logs)
        if not np.isfinite(logs["total"]):
            raise FloatingPointError(f"train-tokenizer: the loss is {logs['total']} at step {step}; lower "
                                     "train_tokenizer.train.lr or raise warmup_steps")
        return logs

    def run(self) -> TrainingResult:
        train_config = self.config.train
        run = TrainingRun(
            stage=self.job.stage,
            work_dir=Path(self.job.work_dir),
            total_steps=train_config.steps,
            batch_size=train_config.batch_size,
            warmup_steps=train_config.warmup_steps,
            min_lr_ratio=train_config.min_lr_ratio,
            checkpoint_every=train_config.checkpoint_every,
            log_every=train_config.log_every,
            modules=self.modules,
            optimizers=self.optimizers,
            processes=self.processes,
            order=self.images.order,
            step_fn=self.step,
        )
        try:
            return train(run)
        finally:
            self.loader.close()

    def export(self, result: TrainingResult) -> dict[str, Any]:
        """Weights, tokenizer.json, loss log and plot, reconstruction scores: the artifact files."""
        job, config, model_config = self.job, self.config, self.model_config
        out, store, ingest = job.output_dir, job.store, job.inputs["ingest"]
        extra = {"text": _text_info(self.text, config), "ingest_artifact": ingest.artifact_id, "steps": result.steps}
        save_tokenizer(out, model_config, self.ema.state_dict(), self.model.state_dict(), extra)
        _copy(Path(job.work_dir) / "losses.jsonl", out / "losses.jsonl")
        plot_losses(result.history, out / LOSS_PLOT,
                    f"train-tokenizer: {model_config.size} {model_config.bottleneck}, {model_config.num_latent_tokens} tokens")

        # Without a validation split (ingest.val_fraction: 0) the scores are on training images.
        split = "val" if next(iter_eval_batches(ingest, store, 1, 1, "val", self.text), None) else "train"
        report = evaluate_reconstructions(
            self.ema.module,
            iter_eval_batches(ingest, store, config.eval_batch_size, config.eval_images, split, self.text),
            self.inception if self.inception is not None else InceptionFeatures().to(self.device),
            config.train.precision,
            config.grid_images,
        )
        table = write_report(report, out, GRID_FILE)
        final = result.history[-1] if result.history else {}
        summary: dict[str, Any] = {
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "processes": self.processes.world,
            "train_images": len(self.images),
            "skipped_no_caption": self.images.skipped_no_caption,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "seq_len": model_config.num_latent_tokens,
            "discrete": self.model.is_discrete,
            "eval_split": split,
            **{f"final_{k}": v for k, v in final.items() if k not in ("step", "lr_factor")},
            **report.metrics,
            "loss_plot": LOSS_PLOT,
            "reconstruction_grid": GRID_FILE if report.grid is not None else None,
        }
        return {"tables": {"reconstructions": table.model_dump()}, "summary": summary}


def fit(job: TrainJob, processes: Processes) -> dict[str, Any] | None:
    """Train (or resume) and, on the main process, write the artifact files.

    Returns {"tables": ..., "summary": ...} on the main process, None on the others.
    """
    trainer = TokenizerTrainer(job, processes)
    result = trainer.run()
    barrier(processes)
    return trainer.export(result) if processes.is_main else None


def _text_info(text: TextSource | None, config: TrainTokenizerConfig) -> dict[str, Any]:
    if text is None:
        return {"uses_text": False}
    return {
        "uses_text": True,
        "encoder": text.embeddings.encoder,
        "dim": text.dim,
        "max_tokens": text.max_tokens,
        "dtype": text.embeddings.dtype,
        "in_encoder": config.model.text_in_encoder,
        "in_decoder": config.model.text_in_decoder,
        "caption_artifact": text.caption_artifact,
        "embed_text_artifact": text.embed_artifact,
    }


def _copy(source: Path, target: Path) -> None:
    tmp = temporary_path(target)
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


# ---------------------------------------------------------------------------- processes


def process_count(runtime: RuntimeConfig, device: str) -> int:
    if runtime.processes is not None:
        if runtime.processes < 1:
            raise ValueError(f"runtime.processes must be >= 1, got {runtime.processes}")
        return runtime.processes
    return max(1, torch.cuda.device_count()) if device == "cuda" else 1


# Resolved before any fork: between fork and exec the child may only make plain C calls.
_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # The torchrun agent gets SIGTERM (and stops its workers) when the stage process dies, so a
    # killed stage never leaves workers writing into the work dir that a rerun resumes from.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def launch_workers(job: TrainJob, processes: int) -> dict[str, Any]:
    """Run `fit` in `processes` torchrun workers and return the main worker's result."""
    work_dir = Path(job.work_dir)
    job_path, result_path = work_dir / JOB_FILE, work_dir / RESULT_FILE
    write_json(job_path, json.loads(job.to_json()))
    result_path.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
        "-m", "tasks.train_tokenizer.worker", str(job_path),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    log.info("train-tokenizer: starting %d workers: %s", processes, " ".join(command))
    child = subprocess.Popen(command, cwd=REPO_ROOT, env=env, preexec_fn=_die_with_parent)
    try:
        code = child.wait()
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
    if code != 0 or not result_path.exists():
        raise RuntimeError(
            f"train-tokenizer: the {processes} torchrun workers failed (exit code {code}); their output is above. "
            f"Rerunning resumes from the last checkpoint in {work_dir / 'checkpoints'}"
        )
    return read_json(result_path)


def run_train_tokenizer(ctx: StageContext) -> StageOutput:
    job = TrainJob.from_context(ctx)
    count = process_count(ctx.runtime, ctx.device)
    check_config(ctx.config, count)  # before starting workers that would all fail on it
    if count > 1:
        result = launch_workers(job, count)
    else:
        result = fit(job, setup(ctx.runtime.device))
    tables = {name: TableRecord.model_validate(record) for name, record in result["tables"].items()}
    return StageOutput(tables=tables, summary=result["summary"])


STAGE = Stage(
    name="train-tokenizer",
    description=(
        "Train a TiTok (VQ) or TexTok (KL, caption-conditioned) 1D image tokenizer with L2, perceptual and "
        "GAN losses, EMA and resumable checkpoints (DDP with several processes); report PSNR, SSIM, rFID and "
        "codebook use on the validation split."
    ),
    inputs=("ingest", "caption", "embed-text"),
    code=(
        "tasks.train_tokenizer",
        "tasks.training",
        "models.tokenizer",
        "models.quantizers",
        "models.tokenizer_loss",
        "models.discriminator",
        "models.ema",
        "models.inception",
        "models.metrics",
        "tasks.caption.read",
        "tasks.embed_text.read",
        "tasks.ingest.read",
    ),
    run=run_train_tokenizer,
)
