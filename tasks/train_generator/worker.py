"""The generator's training process: token table -> MaskGIT or DiT, through the shared loop.

Runs in the stage's own process, or once per GPU under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node N -m tasks.train_generator.worker SPEC.json

Every process reads the train rows of the pretokenize artifact's `tokens` table itself (an
`EpochOrder` over its shards, rows fetched through a `ShardCache`), computes its slice of each
global batch, and averages gradients with the others; the main process writes checkpoints and
the outputs.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

from models.ema import EMA, param_groups_for_adamw
from tasks.config import TrainGeneratorConfig
from tasks.pretokenize.read import META_FILE, TABLE, decode_tokens
from tasks.store import Manifest, Store, atomic_write_text, read_json, temporary_path, write_json
from tasks.train_generator.load import EMA_WEIGHTS, INFO_FILE, RAW_WEIGHTS, build_model
from tasks.training.data import EpochOrder, ShardCache
from tasks.training.distributed import setup, teardown
from tasks.training.loop import TrainingRun, autocast, optimize, plot_losses, train

if TYPE_CHECKING:
    from tasks.embed_text.read import TextEmbeddings

TRAIN_SPLIT = "train"
SUMMARY_FILE = "summary.json"
TRAIN_COLUMNS = ("tokens", "label_id", "caption_id")


# ---------------------------------------------------------------------------- token table


def read_token_meta(manifest: Manifest, store: Store) -> dict[str, Any]:
    """The pretokenize artifact's tokens.json (discrete, seq_len, codebook_size, token_dim, ...)."""
    if manifest.stage != "pretokenize":
        raise ValueError(f"expected a pretokenize artifact, got one of stage {manifest.stage!r} ({manifest.artifact_id})")
    path = manifest.path(store, META_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"pretokenize artifact {manifest.artifact_id} has no {META_FILE} at {path}; rerun pretokenize")
    meta = read_json(path)
    required = ("discrete", "seq_len", "num_classes") + (("codebook_size",) if meta.get("discrete") else ("token_dim",))
    missing = [key for key in required if key not in meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}; rerun the pretokenize stage with the current code")
    return meta


def token_files(manifest: Manifest, store: Store) -> list[Path]:
    manifest.table_glob(store, TABLE)  # a clear KeyError if the table is absent
    files = manifest.table_files(store, TABLE)
    if not files:
        raise FileNotFoundError(f"pretokenize artifact {manifest.artifact_id} has no shards for table {TABLE!r}")
    return files


class TrainRows(ShardCache):
    """The train rows of a token table's shards, read by global train-row index.

    A shard may hold both splits; `sizes` counts its train rows and `shard` returns only those,
    so an `EpochOrder` over `sizes` never sees a validation row.
    """

    def __init__(self, files: Sequence[Path], columns: Sequence[str], max_shards: int = 8):
        super().__init__(files, [*columns, "split"], max_shards)
        self.sizes = [_train_count(path) for path in self.files]

    def shard(self, index: int) -> pa.Table:
        if index not in self._cache:
            table = pq.read_table(self.files[index], columns=self.columns)
            self._cache[index] = table.filter(pc.equal(table["split"], TRAIN_SPLIT))
            if len(self._cache) > self.max_shards:
                self._cache.popitem(last=False)
        self._cache.move_to_end(index)
        return self._cache[index]


def _train_count(path: Path) -> int:
    split = pq.read_table(path, columns=["split"])["split"]
    return int(pc.sum(pc.equal(split, TRAIN_SPLIT)).as_py() or 0)


def token_array(column: pa.ChunkedArray | pa.Array, meta: dict[str, Any]) -> np.ndarray:
    """The `tokens` column as int64 ids [B, N] (discrete) or float32 vectors [B, N, D] (continuous)."""
    return decode_tokens(column, bool(meta["discrete"]), int(meta["seq_len"]), int(meta["token_dim"] or 0))


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay at (0-based) `step`: warmed up as (1 + step) / (10 + step), at most `decay`.

    A fixed decay keeps decay**steps of the initial weights in the EMA: 22% after 1500 steps at
    0.999. A DiT's noise prediction shrunk that much diverges when sampled (the Fashion-MNIST
    DiT's EMA gave tokens 10x their real scale, its raw weights the right one). With the warm-up
    (as in TensorFlow's and timm's EMA) the EMA follows the weights early and reaches `decay`
    after ~10 / (1 - decay) steps; it depends on the step only, so resumed runs match.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


def token_scale(meta: dict[str, Any]) -> float:
    """Std of every value of the continuous train tokens, from pretokenize's per-channel statistics.

    The DiT trains on tokens / scale, so the diffusion's unit-variance noise matches the data;
    samples are multiplied back before decoding. Every channel has the same count, so the overall
    variance is mean_c(std_c^2 + mean_c^2) - mean_c(mean_c)^2.
    """
    if "token_std" not in meta or "token_mean" not in meta:
        raise ValueError("tokens.json has no token_mean/token_std (the table has no continuous train tokens, or "
                         "was written by older code); rerun the pretokenize stage")
    mean, std = np.asarray(meta["token_mean"], np.float64), np.asarray(meta["token_std"], np.float64)
    scale = math.sqrt(max(float(np.mean(std**2 + mean**2) - np.mean(mean) ** 2), 0.0))
    if not scale > 0:
        raise ValueError("every train token value is the same; the tokenizer's bottleneck has collapsed")
    return scale


# ---------------------------------------------------------------------------- model


def resolve_kind(config: TrainGeneratorConfig, meta: dict[str, Any]) -> str:
    discrete = bool(meta["discrete"])
    kind = config.kind if config.kind != "auto" else ("maskgit" if discrete else "dit")
    if kind == "maskgit" and not discrete:
        raise ValueError("train_generator.kind=maskgit needs discrete (VQ) tokens, but the tokenizer's tokens are "
                         "continuous (KL); use kind=dit or auto, or train_tokenizer.model.bottleneck=vq")
    if kind == "dit" and discrete:
        raise ValueError("train_generator.kind=dit needs continuous (KL) tokens, but the tokenizer's tokens are "
                         "discrete (VQ); use kind=maskgit or auto, or train_tokenizer.model.bottleneck=kl")
    if kind == "maskgit" and config.conditioning == "text":
        raise ValueError("MaskGIT supports only class conditioning; use train_generator.conditioning=class, or a KL "
                         "tokenizer (train_tokenizer.model.bottleneck=kl) with the DiT for text conditioning")
    return kind


def model_fields(kind: str, config: TrainGeneratorConfig, meta: dict[str, Any], text_dim: int) -> dict[str, Any]:
    """The MaskGITConfig / DiTConfig fields for this token table and generator section."""
    common = dict(seq_len=int(meta["seq_len"]), width=config.width, depth=config.depth, heads=config.heads,
                  mlp_ratio=config.mlp_ratio, class_dropout=config.class_dropout)
    if kind == "maskgit":
        return dict(common, vocab_size=int(meta["codebook_size"]), num_classes=int(meta["num_classes"]),
                    dropout=config.dropout, label_smoothing=config.label_smoothing)
    text = config.conditioning == "text"
    return dict(common, token_dim=int(meta["token_dim"]), num_classes=0 if text else int(meta["num_classes"]),
                learn_sigma=config.learn_sigma, text_dim=text_dim if text else 0)


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class TokenBatches:
    """Rows of the train split -> the tensors a training step needs, on the training device."""

    def __init__(self, data: TrainRows, order: EpochOrder, meta: dict[str, Any], scale: float | None,
                 texts: TextEmbeddings | None, device: torch.device):
        self.data, self.order, self.meta, self.scale, self.texts, self.device = data, order, meta, scale, texts, device
        self.num_classes = int(meta["num_classes"])

    def tensors(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """tokens (ids, or vectors divided by the scale), labels, and text/text_mask when conditioning on text."""
        table = self.data.take(self.order, rows)
        tokens = torch.from_numpy(token_array(table["tokens"], self.meta))
        if self.scale is not None:
            tokens = tokens / self.scale
        labels = table["label_id"].to_numpy(zero_copy_only=False).astype(np.int64)
        if self.num_classes == 0:
            labels = np.zeros_like(labels)  # unconditional: every row gets the null class
        elif labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"token table labels span [{labels.min()}, {labels.max()}] but tokens.json says "
                             f"num_classes={self.num_classes}; rerun pretokenize")
        batch = {"tokens": tokens.to(self.device), "labels": torch.from_numpy(labels).to(self.device)}
        if self.texts is not None:
            caption_ids = table["caption_id"].to_pylist()
            if any(cid is None for cid in caption_ids):
                raise ValueError("train_generator.conditioning=text, but some train images have no caption "
                                 "(caption_id is null); use caption.backend=label, dataset or gemini")
            text, mask = self.texts.lookup(caption_ids)
            batch["text"], batch["text_mask"] = text.to(self.device).float(), mask.to(self.device)
        return batch


# ---------------------------------------------------------------------------- the process


@dataclass
class WorkerSpec:
    """Everything a training process needs, as JSON (torchrun starts it with this file)."""

    store: str
    inputs: dict[str, dict[str, Any]]  # stage -> manifest (JSON)
    config: dict[str, Any]  # TrainGeneratorConfig
    work_dir: str
    output_dir: str
    device: str  # "auto" | "cpu" | "cuda"
    scale: float | None  # continuous tokens: std of the train tokens
    threads: int | None = None

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> WorkerSpec:
        return cls(**read_json(path))


def train_generator(spec: WorkerSpec) -> dict[str, Any]:
    """Train (or resume) in this process; the main process writes the outputs. Returns the summary."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    store = Store(spec.store)
    inputs = {name: Manifest.model_validate(m) for name, m in spec.inputs.items()}
    config = TrainGeneratorConfig.model_validate(spec.config)
    train_config = config.train
    pretokenize = inputs["pretokenize"]
    meta = read_token_meta(pretokenize, store)
    kind = resolve_kind(config, meta)
    processes = setup(spec.device)
    try:
        texts = None
        text_dim = 0
        if config.conditioning == "text":
            from tasks.embed_text.read import load_text_embeddings

            texts = load_text_embeddings(inputs["embed-text"], store)
            text_dim = texts.dim if len(texts) else 0
            if text_dim == 0:
                raise ValueError("train_generator.conditioning=text needs caption embeddings, but the embed-text "
                                 "artifact has none; set embed_text.backend (and caption.backend) to produce them")

        torch.manual_seed(train_config.seed)  # the same initial weights in every process
        fields = model_fields(kind, config, meta, text_dim)
        model = build_model(kind, fields).to(processes.device)
        ema = EMA(model, decay=train_config.ema_decay)
        optimizer = torch.optim.AdamW(
            param_groups_for_adamw(model, train_config.weight_decay), lr=train_config.lr,
            betas=tuple(train_config.betas), fused=processes.device.type == "cuda",
        )
        diffusion = None
        if kind == "dit":
            from models.diffusion import GaussianDiffusion

            diffusion = GaussianDiffusion.linear(config.diffusion_steps, learn_sigma=config.learn_sigma)
            if spec.scale is None:
                raise ValueError("a DiT needs the token scale (std of the train tokens) in its worker spec")
        if train_config.compile:
            model.compile()  # in place: the state_dict keys (checkpoints, EMA) stay the same

        data = TrainRows(token_files(pretokenize, store), TRAIN_COLUMNS, max_shards=train_config.shuffle_group)
        order = EpochOrder(data.sizes, seed=train_config.seed, shuffle_group=train_config.shuffle_group)
        batches = TokenBatches(data, order, meta, spec.scale if kind == "dit" else None, texts, processes.device)
        device = processes.device

        def step_fn(rows: np.ndarray, step: int) -> dict[str, float]:
            # Seeded per (step, rank): every process draws its own masks and noise, and a resumed
            # run draws exactly what the uninterrupted run drew, whatever RNG state it restored.
            torch.manual_seed(step_seed(train_config.seed, step, processes.rank))
            batch = batches.tensors(rows)
            model.train()
            with autocast(device, train_config.precision):
                if kind == "maskgit":
                    loss, logs = model.training_loss(batch["tokens"], batch["labels"])
                else:
                    kwargs = ({"text": batch["text"], "text_mask": batch["text_mask"]} if texts is not None
                              else {"labels": batch["labels"]} if fields["num_classes"] > 0 else {})
                    loss, logs = diffusion.training_loss(model, batch["tokens"], model_kwargs=kwargs)
            norm = optimize(loss, model, optimizer, train_config.grad_clip, processes, ddp_wrapped=False)
            ema.decay = ema_decay_at(step, train_config.ema_decay)
            ema.update(model)
            return {**logs, "grad_norm": norm}

        run = TrainingRun(
            stage="train-generator",
            work_dir=Path(spec.work_dir),
            total_steps=train_config.steps,
            batch_size=train_config.batch_size,
            warmup_steps=train_config.warmup_steps,
            min_lr_ratio=train_config.min_lr_ratio,
            checkpoint_every=train_config.checkpoint_every,
            log_every=train_config.log_every,
            modules={"model": model, "ema": ema.module},
            optimizers={"model": optimizer},
            processes=processes,
            order=order,
            step_fn=step_fn,
        )
        result = train(run)
        if not processes.is_main:
            return {}
        info = {
            "kind": kind,
            "conditioning": config.conditioning,
            "model": fields,
            "diffusion": {"steps": config.diffusion_steps, "learn_sigma": config.learn_sigma} if kind == "dit" else None,
            "scale": spec.scale if kind == "dit" else None,
            "tokens": meta,
            "tokens_artifact": pretokenize.artifact_id,
            "text": {"dim": texts.dim, "max_tokens": texts.max_tokens} if texts is not None else None,
            "train": train_config.model_dump(mode="json"),
            "steps": result.steps,
        }
        summary = write_outputs(Path(spec.output_dir), run, result.history, model, ema, info)
        summary.update(resumed_from=result.resumed_from, train_rows=len(order), processes=processes.world)
        return summary
    finally:
        teardown()


def _save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = temporary_path(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def write_outputs(output: Path, run: TrainingRun, history: list[dict[str, float]], model: torch.nn.Module,
                  ema: EMA, info: dict[str, Any]) -> dict[str, Any]:
    output.mkdir(parents=True, exist_ok=True)
    _save_weights(ema.state_dict(), output / EMA_WEIGHTS)
    _save_weights(model.state_dict(), output / RAW_WEIGHTS)
    write_json(output / INFO_FILE, info)
    atomic_write_text(output / "losses.jsonl", run.loss_log.read_text() if run.loss_log.exists() else "")
    plot_losses(history, output / "losses.png", f"train-generator ({info['kind']}, {info['conditioning']})")
    final = history[-1] if history else {}
    return {
        "kind": info["kind"],
        "conditioning": info["conditioning"],
        "steps": info["steps"],
        "final_loss": final.get("loss"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seq_len": info["model"]["seq_len"],
        **({"token_scale": info["scale"]} if info["scale"] is not None else {}),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tasks.train_generator.worker SPEC.json", file=sys.stderr)
        return 2
    spec_path = Path(args[0])
    spec = WorkerSpec(**json.loads(args[0])) if args[0].lstrip().startswith("{") else WorkerSpec.load(spec_path)
    summary = train_generator(spec)
    if summary:  # the main process hands its summary to the stage that launched torchrun
        write_json(Path(spec.work_dir) / SUMMARY_FILE, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
