"""One training process of the train-tokenizer stage: a TiTok (VQ) or TexTok (KL + text)
tokenizer with its EMA, loss (and discriminator), optimizers and image batches.

Every rank builds identical initial weights from the seed and draws its step's random numbers
from (seed, step, rank); with several processes the model runs in DistributedDataParallel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from models.ema import EMA
from models.inception import InceptionFeatures
from models.tokenizer import Tokenizer
from models.tokenizer_config import TokenizerConfig
from tasks.config import TrainTokenizerConfig
from tasks.embed_text.read import TextSource
from tasks.features import FeatureCache, extractor_id
from tasks.ingest.read import image_resolution
from tasks.measurement import MEASUREMENTS_KEY, measurements
from tasks.progress import Progress
from tasks.stage import StageOutput
from tasks.store import TableRecord
from tasks.train_tokenizer.data import BatchLoader, TrainImages, iter_eval_batches
from tasks.train_tokenizer.losses import GanState, build_loss, uses_inception
from tasks.train_tokenizer.read import save_tokenizer
from tasks.train_tokenizer.reconstruction import Protocol, evaluate_reconstructions, write_report
from tasks.training.distributed import Processes
from tasks.training.export import copy_file
from tasks.training.job import TrainingJob
from tasks.training.loop import TrainingResult, adamw, autocast, optimize, phase, plot_losses, step_seed
from tasks.training.trainer import Trainer

LOSS_PLOT = "losses.png"
GRID_FILE = "reconstructions.png"


class TokenizerTrainer(Trainer):
    """Model, EMA, loss (with discriminator), optimizers and data of one training process."""

    config_type = TrainTokenizerConfig

    @classmethod
    def check(cls, job: TrainingJob, world: int) -> None:
        super().check(job, world)
        config: TrainTokenizerConfig = job.config
        if config.eval_images < 0 or config.eval_batch_size < 1 or config.grid_images < 0:
            raise ValueError("train_tokenizer.eval_images and grid_images must be >= 0, eval_batch_size >= 1")

    def __init__(self, job: TrainingJob, processes: Processes):
        super().__init__(job, processes)
        config: TrainTokenizerConfig = job.config
        train_config = config.train
        self.device = device = processes.device
        store, ingest = job.store, job.inputs["ingest"]

        self.text = TextSource(job.inputs["caption"], job.inputs["embed-text"], store) if config.use_text else None
        self.images = TrainImages(ingest, store, train_config.seed, train_config.shuffle_group, "train", self.text,
                                  config.hflip)
        if train_config.batch_size > len(self.images):
            raise ValueError(f"train_tokenizer.train.batch_size={train_config.batch_size} exceeds the "
                             f"{len(self.images)} training images")
        self.order = self.images.order
        self.model_config: TokenizerConfig = config.model.to_dataclass(
            image_size=image_resolution(ingest, store),
            channels=3,
            text_dim=self.text.dim if self.text else 0,
            max_text_tokens=self.text.max_tokens if self.text else 0,
        )
        torch.manual_seed(train_config.seed)  # identical initial weights on every rank
        self.model = Tokenizer(self.model_config).to(device)
        self.inception = InceptionFeatures(resize_to=config.loss.perceptual_resize).to(device) if uses_inception(config) else None
        self.loss = build_loss(config, self.inception).to(device)
        self.ema = EMA(self.model, train_config.ema_decay)

        self.optimizers = {"model": adamw(self.model, train_config, device)}
        # Checkpointed by name; the EMA copy is a plain module too.
        self.modules: dict[str, nn.Module] = {"model": self.model, "ema": self.ema.module}
        if self.loss.discriminator is not None:
            self.modules["gan"] = GanState(self.loss)
            self.optimizers["discriminator"] = adamw(self.loss.discriminator, train_config, device,
                                                     lr=config.discriminator_lr)
        self.forward: nn.Module = self.model
        if processes.distributed:
            self.forward = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if train_config.compile:
            self.forward = torch.compile(self.forward)
        self.loader = BatchLoader(self.images, train_config.batch_size, processes.rank, processes.world,
                                  job.runtime.data_workers)

    def step(self, rows: np.ndarray, step: int) -> dict[str, torch.Tensor]:
        """One generator step (and one discriminator step once the GAN is active); logs as tensors."""
        train_config, processes = self.config.train, self.processes
        torch.manual_seed(step_seed(train_config.seed, step, processes.rank))
        with phase("data"):
            batch = self.loader.get(rows, step).to(self.device)
        self.model.train()
        self.loss.train()
        with phase("forward"), autocast(self.device, train_config.precision):
            output = self.forward(batch.images, batch.text, batch.text_mask)
            generator_loss, logs = self.loss.generator_loss(batch.images, output, step)
        logs["grad_norm"] = optimize(generator_loss, self.model, self.optimizers["model"], train_config.grad_clip,
                                     processes, ddp_wrapped=processes.distributed)
        with phase("ema"):
            self.ema.update(self.model, step)
        if self.loss.gan_active(step):
            with autocast(self.device, train_config.precision):
                d_loss, d_logs = self.loss.discriminator_loss(batch.images, output.reconstruction, step)
            # A plain module: optimize() averages its gradients over processes itself.
            d_logs["d_grad_norm"] = optimize(d_loss, self.loss.discriminator, self.optimizers["discriminator"],
                                             train_config.grad_clip, processes, ddp_wrapped=False)
            logs.update(d_logs)
        return logs

    def close(self) -> None:
        self.loader.close()

    def export(self, result: TrainingResult) -> StageOutput:
        """Weights, tokenizer.json, loss log and plot, reconstruction scores: the artifact's files."""
        job, config, model_config = self.job, self.config, self.model_config
        out, store, ingest = job.output_dir, job.store, job.inputs["ingest"]
        extra = {"text": self._text_info(), "ingest_artifact": ingest.artifact_id, "steps": result.steps}
        save_tokenizer(out, model_config, self.ema.state_dict(), self.model.state_dict(), extra)
        copy_file(result.loss_log, out / "losses.jsonl")
        plot_losses(result.history, out / LOSS_PLOT,
                    f"train-tokenizer: {model_config.size} {model_config.bottleneck}, {model_config.num_latent_tokens} tokens")

        # Without a validation split (ingest.val_fraction: 0) the scores are on training images.
        split = "val" if next(iter_eval_batches(ingest, store, 1, 1, "val", self.text), None) else "train"
        scores_features = config.fid_images >= 0
        inception = self.inception if self.inception is not None else (
            InceptionFeatures().to(self.device) if scores_features else None)
        extractor = extractor_id(None)
        limit = "all" if config.eval_images == 0 else f"first {config.eval_images}"
        protocol = Protocol(
            reference=(f"ingest/{ingest.artifact_id} {split} split, {limit} images "
                       f"({self.model_config.image_size} px as ingested, no crop)"),
            extractor=extractor, seed=config.train.seed)
        total = ingest.summary.get(split)
        total = min(total, config.eval_images) if total and config.eval_images else (total or None)
        bar = Progress("train-tokenizer", total, "reconstruction metrics", unit="img")
        batches = iter_eval_batches(ingest, store, config.eval_batch_size, config.eval_images, split, self.text)
        with bar:
            report = evaluate_reconstructions(
                self.ema.module,
                bar.track(batches, lambda batch: len(batch.image_ids)),
                inception,
                config.train.precision,
                config.grid_images,
                features=FeatureCache(store, extractor) if inception is not None else None,
                fid_images=max(config.fid_images, 0),
                protocol=protocol,
            )
        table: TableRecord = write_report(report, out, GRID_FILE)
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
            MEASUREMENTS_KEY: measurements(**report.measurements),
            "loss_plot": LOSS_PLOT,
            "reconstruction_grid": GRID_FILE if report.grid is not None else None,
        }
        return StageOutput(tables={"reconstructions": table}, summary=summary)

    def _text_info(self) -> dict[str, Any]:
        """What tokenizer.json records of the text the tokenizer expects."""
        text, model = self.text, self.config.model
        if text is None:
            return {"uses_text": False}
        return {
            "uses_text": True,
            "encoder": text.embeddings.encoder,
            "dim": text.dim,
            "max_tokens": text.max_tokens,
            "dtype": text.embeddings.dtype,
            "in_encoder": model.text_in_encoder,
            "in_decoder": model.text_in_decoder,
            "caption_artifact": text.caption_artifact,
            "embed_text_artifact": text.embed_artifact,
        }
