"""How well a trained tokenizer reconstructs held-out images: PSNR, SSIM, rFID, codebook use,
and a grid of originals above their reconstructions.

Reconstructions are clamped and quantized to uint8 levels before scoring, i.e. scored as the
PNG files they would be saved as; rFID uses clean-fid's Inception features of those images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from models.inception import InceptionFeatures
from models.metrics import extract_features, feature_statistics, fid_from_statistics, low_rank_frechet_distance, psnr, ssim
from models.quantizers import codebook_stats
from models.tokenizer import Tokenizer
from tasks.store import TableRecord
from tasks.tables import write_parquet_atomic
from tasks.train_tokenizer.data import Batch
from tasks.training.loop import autocast

# Grid cells are upscaled (nearest) to at least this many pixels so small images stay visible.
GRID_MIN_CELL = 64


@dataclass
class ReconstructionReport:
    metrics: dict[str, float]
    image_ids: list[str] = field(default_factory=list)
    label_ids: np.ndarray | None = None
    psnr: np.ndarray | None = None
    ssim: np.ndarray | None = None
    grid: torch.Tensor | None = None  # [3, H, W] in [0, 1]


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float images -> the float values of their uint8 PNG encoding."""
    return (images.float().clamp(0, 1) * 255).round() / 255


@torch.no_grad()
def evaluate_reconstructions(
    model: Tokenizer,
    batches: Iterable[Batch],
    inception: InceptionFeatures | None,
    precision: str = "auto",
    grid_images: int = 8,
) -> ReconstructionReport:
    """Metrics of `model` (in eval mode: the KL mean, no dropout) over every batch given."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, labels, psnrs, ssims, tokens = [], [], [], [], []
    real_features, fake_features = [], []
    grid_real, grid_fake = [], []
    try:
        for batch in batches:
            batch = batch.to(device)
            with autocast(device, precision):
                output = model(batch.images, batch.text, batch.text_mask)
            real, fake = batch.images.float(), quantize(output.reconstruction)
            ids.extend(batch.image_ids)
            labels.append(batch.label_ids)
            psnrs.append(psnr(fake, real).cpu().numpy())
            if min(real.shape[-2:]) >= 11:
                ssims.append(ssim(fake, real).cpu().numpy())
            if model.is_discrete:
                tokens.append(output.tokens.flatten().cpu())
            if inception is not None:
                real_features.append(extract_features([real], inception, batch_size=len(real))["pool"])
                fake_features.append(extract_features([fake], inception, batch_size=len(fake))["pool"])
            have = sum(len(x) for x in grid_real)
            if have < grid_images:
                grid_real.append(real[: grid_images - have].cpu())
                grid_fake.append(fake[: grid_images - have].cpu())
    finally:
        model.train(was_training)
    if not ids:
        raise ValueError("no images to evaluate the tokenizer on")
    psnr_values = np.concatenate(psnrs)
    metrics = {"eval_images": float(len(ids)), "psnr": float(np.mean(psnr_values[np.isfinite(psnr_values)]))}
    ssim_values = np.concatenate(ssims) if ssims else None
    if ssim_values is not None:
        metrics["ssim"] = float(ssim_values.mean())
    if tokens:
        stats = codebook_stats(torch.cat(tokens), model.config.codebook_size)
        metrics["codebook_usage"] = float(stats["codebook_usage"])
        metrics["perplexity"] = float(stats["perplexity"])
    if inception is not None and len(ids) >= 2:
        metrics["rfid"] = frechet_distance(np.concatenate(real_features), np.concatenate(fake_features))
    grid = reconstruction_grid(torch.cat(grid_real), torch.cat(grid_fake)) if grid_images > 0 else None
    return ReconstructionReport(metrics, ids, np.concatenate(labels), psnr_values, ssim_values, grid)


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """rFID between two feature sets [N, D]: clean-fid's routine when both sets fill the feature space,
    otherwise the exact low-rank form (the usual case for a validation set scored on CPU).
    """
    if min(len(real), len(fake)) > real.shape[1]:
        return fid_from_statistics(*feature_statistics(real), *feature_statistics(fake))
    return low_rank_frechet_distance(real, fake)


def reconstruction_grid(real: torch.Tensor, fake: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """Originals in the top row(s), their reconstructions in the row(s) below, same columns."""
    per_row = max(1, min(per_row, len(real)))
    scale = max(1, math.ceil(GRID_MIN_CELL / real.shape[-1]))
    if scale > 1:
        real = F.interpolate(real.float(), scale_factor=scale, mode="nearest")
        fake = F.interpolate(fake.float(), scale_factor=scale, mode="nearest")
    top = make_grid(real, nrow=per_row, padding=2, pad_value=1.0)
    bottom = make_grid(fake, nrow=per_row, padding=2, pad_value=1.0)
    return torch.cat([top, torch.ones(3, 4, top.shape[-1]), bottom], dim=1)


def save_grid(grid: torch.Tensor, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_image(grid, tmp)
    tmp.replace(path)


RECONSTRUCTIONS_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("label_id", pa.int64()), ("psnr", pa.float32()), ("ssim", pa.float32())]
)


def write_report(report: ReconstructionReport, directory: Path, grid_name: str) -> TableRecord:
    """The grid PNG and the per-image `reconstructions` table (image_id, label_id, psnr, ssim)."""
    if report.grid is not None:
        save_grid(report.grid, directory / grid_name)
    count = len(report.image_ids)
    table = pa.table(
        {
            "image_id": report.image_ids,
            "label_id": report.label_ids,
            "psnr": report.psnr.astype(np.float32),
            "ssim": (report.ssim if report.ssim is not None else np.full(count, np.nan)).astype(np.float32),
        },
        schema=RECONSTRUCTIONS_SCHEMA,
    )
    write_parquet_atomic(table, directory / "reconstructions" / "part-00000.parquet")
    return TableRecord(glob="reconstructions/*.parquet", rows=count,
                       columns={f.name: str(f.type) for f in RECONSTRUCTIONS_SCHEMA})
