"""How well a trained tokenizer reconstructs held-out images: PSNR, SSIM, rFID, rKID, codebook
use, and a grid of originals above their reconstructions.

Reconstructions are clamped and quantized to uint8 levels before scoring, i.e. scored as the
PNG files they would be saved as. rFID and rKID compare clean-fid Inception features of the
first `fid_images` originals (cached store-wide by content: tasks/features.py) with those of their
reconstructions. Every metric comes with its protocol (tasks/measurement.py): N, implementation,
reference, seed, and a spread (KID: std over subsets; PSNR/SSIM: bootstrap 95% interval).
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
from models.metrics import bootstrap_interval, extract_features, psnr, ssim
from models.quantizers import codebook_stats
from models.tokenizer import Tokenizer
from tasks.features import FeatureCache, frechet, kid
from tasks.measurement import Measurement
from tasks.store import TableRecord
from tasks.tables import write_parquet_atomic
from tasks.train_tokenizer.data import Batch
from tasks.training.loop import autocast

# Grid cells are upscaled (nearest) to at least this many pixels so small images stay visible.
GRID_MIN_CELL = 64


@dataclass(frozen=True)
class Protocol:
    """How the reconstruction metrics are measured, for their `Measurement`s."""

    reference: str  # e.g. "ingest/<id> val, first 1000 images, 32 px as ingested (no crop)"
    extractor: str  # feature network name and file hash
    seed: int = 0  # of the KID subsets and the bootstrap


@dataclass
class ReconstructionReport:
    metrics: dict[str, float]
    measurements: dict[str, Measurement] = field(default_factory=dict)
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
    features: FeatureCache | None = None,
    fid_images: int = 0,
    protocol: Protocol | None = None,
) -> ReconstructionReport:
    """Metrics of `model` (in eval mode: the KL mean, no dropout) over every batch given.

    rFID/rKID use the first `fid_images` images (0 = every image), with `inception`; None skips them.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, labels, psnrs, ssims, tokens = [], [], [], [], []
    real_features, fake_features = [], []
    grid_real, grid_fake = [], []
    scored = 0  # images whose features went into rFID/rKID
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
            take = len(real) if not fid_images else max(0, min(len(real), fid_images - scored))
            if inception is not None and take:
                batch_ids = list(batch.image_ids[:take])
                if features is not None:
                    real_features.append(features.features(batch_ids, real[:take].cpu(), inception, len(real)))
                else:
                    real_features.append(extract_features([real[:take]], inception, batch_size=len(real))["pool"])
                fake_features.append(extract_features([fake[:take]], inception, batch_size=len(fake))["pool"])
                scored += take
            have = sum(len(x) for x in grid_real)
            if have < grid_images:
                grid_real.append(real[: grid_images - have].cpu())
                grid_fake.append(fake[: grid_images - have].cpu())
    finally:
        model.train(was_training)
    if not ids:
        raise ValueError("no images to evaluate the tokenizer on")
    psnr_values = np.concatenate(psnrs)
    ssim_values = np.concatenate(ssims) if ssims else None
    protocol = protocol or Protocol(reference="the images given", extractor="inception")
    metrics, measured = _pixel_metrics(psnr_values, ssim_values, protocol)
    metrics["eval_images"] = float(len(ids))
    if tokens:
        stats = codebook_stats(torch.cat(tokens), model.config.codebook_size)
        metrics["codebook_usage"] = float(stats["codebook_usage"])
        metrics["perplexity"] = float(stats["perplexity"])
    if inception is not None and scored >= 2:
        fid_metrics, fid_measured = _feature_metrics(np.concatenate(real_features), np.concatenate(fake_features),
                                                     protocol)
        metrics.update(fid_metrics)
        measured.update(fid_measured)
    grid = reconstruction_grid(torch.cat(grid_real), torch.cat(grid_fake)) if grid_images > 0 else None
    return ReconstructionReport(metrics, measured, ids, np.concatenate(labels), psnr_values, ssim_values, grid)


def _pixel_metrics(psnr_values: np.ndarray, ssim_values: np.ndarray | None,
                   protocol: Protocol) -> tuple[dict[str, float], dict[str, Measurement]]:
    """PSNR (identical images, whose PSNR is infinite, left out) and SSIM with bootstrap intervals."""
    metrics: dict[str, float] = {}
    measured: dict[str, Measurement] = {}
    for name, values, code in (("psnr", psnr_values, "tok1d psnr (uint8-quantized, per image, mean)"),
                               ("ssim", ssim_values, "tok1d ssim (gaussian 11x11, sigma 1.5, per image, mean)")):
        if values is None:
            continue
        values = values[np.isfinite(values)]
        if len(values) == 0:
            continue
        metrics[name] = float(values.mean())
        low = high = None
        if len(values) >= 2:
            interval = bootstrap_interval(values, seed=protocol.seed)
            low, high = interval.low, interval.high
            metrics[f"{name}_low"], metrics[f"{name}_high"] = low, high
        measured[name] = Measurement(metrics[name], n=len(values), implementation=f"{code}; 95% percentile bootstrap, "
                                     "1000 resamples", reference=protocol.reference, seed=protocol.seed, low=low, high=high)
    return metrics, measured


def _feature_metrics(real: np.ndarray, fake: np.ndarray,
                     protocol: Protocol) -> tuple[dict[str, float], dict[str, Measurement]]:
    n = len(real)
    rfid, fid_code = frechet(real, fake)
    distance, kid_code = kid(real, fake, protocol.seed)
    metrics = {"rfid": rfid, "rfid_n": float(n), "rkid": distance.mean, "rkid_std": distance.std}
    measured = {
        "rfid": Measurement(rfid, n=n, implementation=f"{protocol.extractor} / {fid_code}",
                            reference=protocol.reference),
        "rkid": Measurement(distance.mean, n=n, implementation=f"{protocol.extractor} / {kid_code}",
                            reference=protocol.reference, seed=protocol.seed, std=distance.std),
    }
    return metrics, measured


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
