"""One training process of the train-generator stage: a generator of the configured kind on the
train rows of a pretokenize token table, with its EMA and optimizer.

The generator never sees an image. Conditioning is the class label, or (kinds that support it)
the caption's text-embedding tokens. Every process builds identical initial weights from the
seed and draws its step's random numbers from (seed, step, rank).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.ema import EMA
from tasks.config import TrainGeneratorConfig
from tasks.embed_text.read import TextEmbeddings, load_text_embeddings
from tasks.pretokenize.read import token_meta
from tasks.stage import StageOutput
from tasks.train_generator.data import TRAIN_COLUMNS, TokenBatches, TrainRows, token_files
from tasks.train_generator.kinds import resolve_kind
from tasks.train_generator.read import Generator, save_generator
from tasks.training.data import EpochOrder
from tasks.training.distributed import Processes
from tasks.training.export import copy_file
from tasks.training.job import TrainingJob
from tasks.training.loop import TrainingResult, adamw, autocast, optimize, phase, plot_losses, step_seed
from tasks.training.trainer import Trainer

LOSS_PLOT = "losses.png"


class GeneratorTrainer(Trainer):
    """The generator (network, diffusion, token scale), its EMA, optimizer and token batches."""

    config_type = TrainGeneratorConfig

    @classmethod
    def check(cls, job: TrainingJob, world: int) -> None:
        super().check(job, world)
        resolve_kind(job.config, token_meta(job.inputs["pretokenize"], job.store))  # kind and conditioning fit

    def __init__(self, job: TrainingJob, processes: Processes):
        super().__init__(job, processes)
        config: TrainGeneratorConfig = job.config
        train_config = config.train
        store, pretokenize = job.store, job.inputs["pretokenize"]
        meta = token_meta(pretokenize, store)
        kind = resolve_kind(config, meta)
        device = processes.device
        texts = self._texts(job) if config.conditioning == "text" else None

        torch.manual_seed(train_config.seed)  # the same initial weights in every process
        fields = kind.model_fields(config, meta, texts.dim if texts is not None else 0)
        model = kind.build(fields).to(device)
        self.ema = EMA(model, decay=train_config.ema_decay)
        self.optimizer = adamw(model, train_config, device)
        self.info: dict[str, Any] = {
            "kind": kind.name,
            "conditioning": config.conditioning,
            "model": fields,
            **kind.settings(config, meta),
            "tokens": meta,
            "tokens_artifact": pretokenize.artifact_id,
            "text": {"dim": texts.dim, "max_tokens": texts.max_tokens} if texts is not None else None,
            "train": train_config.model_dump(mode="json"),
        }
        self.generator = Generator.from_info(kind, model, self.info)
        if train_config.compile:
            model.compile()  # in place: the state_dict keys (checkpoints, EMA) stay the same

        data = TrainRows(token_files(pretokenize, store), TRAIN_COLUMNS, max_shards=train_config.shuffle_group)
        self.order = EpochOrder(data.sizes, seed=train_config.seed, shuffle_group=train_config.shuffle_group)
        self.batches = TokenBatches(data, self.order, meta, self.generator.scale, texts, device)
        self.modules = {"model": model, "ema": self.ema.module}
        self.optimizers = {"model": self.optimizer}

    @staticmethod
    def _texts(job: TrainingJob) -> TextEmbeddings:
        texts = load_text_embeddings(job.inputs["embed-text"], job.store)
        if len(texts) == 0 or texts.dim == 0:
            raise ValueError("train_generator.conditioning=text needs caption embeddings, but the embed-text "
                             "artifact has none; set embed_text.backend (and caption.backend) to produce them")
        return texts

    def step(self, rows: np.ndarray, step: int) -> dict[str, torch.Tensor]:
        train_config, generator = self.config.train, self.generator
        torch.manual_seed(step_seed(train_config.seed, step, self.processes.rank))
        with phase("data"):
            batch = self.batches.tensors(rows)
        generator.model.train()
        with phase("forward"), autocast(self.processes.device, train_config.precision):
            loss, logs = generator.kind.training_loss(generator, batch)
        norm = optimize(loss, generator.model, self.optimizer, train_config.grad_clip, self.processes,
                        ddp_wrapped=False)
        with phase("ema"):
            self.ema.update(generator.model, step)
        return {**logs, "grad_norm": norm}

    def export(self, result: TrainingResult) -> StageOutput:
        """generator.safetensors (EMA), generator-raw.safetensors, generator.json, the loss log and plot."""
        out, generator, info = self.job.output_dir, self.generator, {**self.info, "steps": result.steps}
        save_generator(out, self.ema.state_dict(), generator.model.state_dict(), info)
        copy_file(result.loss_log, out / "losses.jsonl")
        plot_losses(result.history, out / LOSS_PLOT, f"train-generator ({generator.kind.name}, {generator.conditioning})")
        final = result.history[-1] if result.history else {}
        summary: dict[str, Any] = {
            "kind": generator.kind.name,
            "conditioning": generator.conditioning,
            "steps": result.steps,
            "final_loss": final.get("loss"),
            "parameters": sum(p.numel() for p in generator.model.parameters()),
            "seq_len": generator.seq_len,
            **({"token_scale": generator.scale} if generator.scale is not None else {}),
            "resumed_from": result.resumed_from,
            "train_rows": len(self.order),
            "processes": self.processes.world,
        }
        return StageOutput(tables={}, summary=summary)
