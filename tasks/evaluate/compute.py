"""What the `evaluate` stage computes: sample the generator, decode with the tokenizer, score the
images. Declared, without torch, in tasks/evaluate/stage.py.

Samples have balanced class labels (sample i has class i mod K). When the generator is text-
conditioned or the tokenizer decodes with text (TexTok), every sample gets a caption drawn
deterministically from its class's caption pool, as in the TexTok paper, and its text embedding
goes to the generator and/or the detokenizer.

Metrics, on Inception features computed clean-fid style (models/metrics.py):
  gfid             FID against the cached reference statistics (evaluate/reference.py) of
                   `reference_images` images of `reference_split`
  gkid, gkid_std   unbiased KID against the same reference features, std over 100 subsets
  (each metric's N, feature network, reference and seed go to `metrics` as columns)
  inception_score  exp(E KL(p(y|x) || p(y))) over min(10, N) splits, with
                   is_classifier = "inception-2015-12-05" when `inception_classifier_path` gives
                   the original network with its 1008-way classifier, else
                   "dataset-linear-probe": a logistic regression on the reference images' pool
                   features and dataset labels (the offline Inception has no classifier head)
  precision/recall k-NN manifolds (k = precision_recall_k) against the reference features
  clip_score       with `clip_path` set and a text-conditioned run (generator or tokenizer)

Sampling and the samples' features run in shards of `shard_rows` samples on the attached
fan-out (tasks/evaluate/samples.py); everything random in shard K comes from one torch.Generator
seeded from (`seed`, K) (shard 0: `seed` itself), so a rerun, a resumed run and a run on Ray give
the same samples, grid and metrics. Outputs: samples.png (rows = classes where possible) and the
`samples` table (sample_index, label_id, caption_id, image PNG), one part per shard.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from models.metrics import inception_score, precision_recall
from tasks.config import EvaluateConfig
from tasks.evaluate.reference import reference_statistics
from tasks.evaluate.reference_batch import reference_from_npz
from tasks.evaluate.samples import (
    FEATURES_DIR,
    SAMPLES_SCHEMA,
    SAMPLES_TABLE,
    SampleJob,
    load_setup,
    read_scores,
)
from tasks.features import extractor_id, frechet, kid
from tasks.ingest.read import decode_stored
from tasks.measurement import MEASUREMENTS_KEY, Measurement, measurements
from tasks.shards import RangeShard, fan_out, plan_range_shards
from tasks.stage import StageContext, StageOutput
from tasks.store import TableRecord, atomic_write_bytes

log = logging.getLogger("tok1d")

GRID_FILE = "samples.png"


class GridCollector:
    """Keeps the samples of the grid: row r holds the first `columns` samples of class r."""

    def __init__(self, grid_images: int, num_classes: int, num_samples: int):
        per_class = num_samples // max(1, num_classes)
        if 1 < num_classes <= grid_images and per_class >= 1:
            self.rows = num_classes
            self.columns = min(grid_images // num_classes, per_class)
        else:  # no classes, or too many to give each a row: the first samples, in a square
            self.rows = 0
            self.columns = max(1, math.ceil(math.sqrt(min(grid_images, num_samples))))
        self.limit = min(grid_images, num_samples)
        self.images: dict[tuple[int, int], np.ndarray] = {}
        self.count: dict[int, int] = {}

    @property
    def full(self) -> bool:
        if self.rows:
            return all(self.count.get(label, 0) >= self.columns for label in range(self.rows))
        return len(self.images) >= self.limit

    def offer(self, index: int, label: int, image: np.ndarray) -> None:
        if self.rows:
            column = self.count.get(label, 0)
            if label < self.rows and column < self.columns:
                self.images[(label, column)] = image
                self.count[label] = column + 1
        elif index < self.limit:
            self.images[(index // self.columns, index % self.columns)] = image

    def png(self) -> bytes | None:
        """The grid as PNG bytes; None when it holds no image (grid_images = 0)."""
        from torchvision.utils import make_grid

        if not self.images:
            return None
        cells = [self.images[key] for key in sorted(self.images)]
        tensor = torch.from_numpy(np.stack(cells)).permute(0, 3, 1, 2).float() / 255
        grid = make_grid(tensor, nrow=self.columns, padding=2, pad_value=1.0)
        buffer = io.BytesIO()
        Image.fromarray((grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(buffer, format="PNG")
        return buffer.getvalue()


def grid_png(samples_dir: Path, shards: list[RangeShard], config: EvaluateConfig, num_classes: int) -> bytes | None:
    """The grid of the first samples of each class, read back from the samples table (PNG is
    lossless: the very pixels that were scored); reading stops once the grid is full."""
    grid = GridCollector(config.grid_images, num_classes, config.num_samples)
    for shard in shards:
        if grid.full:
            break
        parquet = pq.ParquetFile(samples_dir / f"{shard.name}.parquet")
        for batch in parquet.iter_batches(batch_size=256, columns=["sample_index", "label_id", "image"]):
            for index, label, image in zip(*(batch.column(n).to_pylist() for n in ("sample_index", "label_id", "image"))):
                grid.offer(index, label, decode_stored(image, "png"))
            if grid.full:
                break
    return grid.png()


def _sample_shards(ctx: StageContext, job: SampleJob, shards: list[RangeShard]) -> tuple[int, int, float]:
    """Run the shards not done yet: (shards computed, samples generated, their generation seconds)."""
    samples_dir, features_dir = Path(job.samples_dir), Path(job.features_dir)
    for folder, suffix in ((samples_dir, ".parquet"), (features_dir, ".npz")):
        folder.mkdir(parents=True, exist_ok=True)
        expected = {f"{shard.name}{suffix}" for shard in shards}
        for leftover in folder.iterdir():  # temporaries of a killed run, parts of another layout
            if leftover.name not in expected:
                leftover.unlink()
    missing = [shard for shard in shards if not job.done(shard)]
    computed = generated = 0
    seconds = 0.0
    total = ctx.config.num_samples
    with ctx.progress(total, "samples", unit="sample", initial=total - sum(s.rows for s in missing)) as progress:
        for result in fan_out(ctx.stage, job, missing, ctx.runtime):
            computed += result.computed
            generated += result.encoded
            seconds += result.seconds
            progress.update(result.rows)
    log.info("evaluate: %d of %d sample shards computed in this run", computed, len(shards))
    return computed, generated, seconds


def run_evaluate(ctx: StageContext) -> StageOutput:
    config: EvaluateConfig = ctx.config
    store, device = ctx.store, torch.device(ctx.device)
    if config.batch_size < 1:
        raise ValueError(f"evaluate.batch_size must be >= 1, got {config.batch_size}")
    shards = plan_range_shards(config.num_samples, config.shard_rows, "evaluate.shard_rows")
    setup = load_setup(str(store.root), dict(ctx.inputs), config, ctx.device)
    generator, tokenizer = setup.generator, setup.tokenizer
    text_conditioned = setup.text_conditioned
    if config.clip_path is not None and not text_conditioned:
        log.info("evaluate: clip_path is set but neither the generator nor the tokenizer uses text; no CLIP score")

    net = setup.net
    extractor = extractor_id(config.inception_classifier_path)
    if config.reference_npz is not None:
        reference, reference_text = reference_from_npz(
            config.reference_npz, tokenizer.config.image_size, store, net, extractor, config.batch_size,
            progress=lambda total: ctx.progress(total, "reference batch", unit="img"))
    else:
        reference = reference_statistics(
            ctx.inputs["ingest"], store, config.reference_split, config.reference_images, net, extractor,
            batch_size=config.batch_size,
            progress=lambda: ctx.progress(config.reference_images, "reference images", unit="img"),
        )
        reference_text = (f"ingest/{ctx.inputs['ingest'].artifact_id} {config.reference_split} split, first "
                          f"{reference.count} images as ingested (no crop); statistics {reference.key}")

    samples_dir, features_dir = ctx.output_dir / SAMPLES_TABLE, ctx.work_dir / FEATURES_DIR
    job = SampleJob(str(store.root), dict(ctx.inputs), config, ctx.device, str(samples_dir), str(features_dir))
    computed, generated, generation_seconds = _sample_shards(ctx, job, shards)
    scores = read_scores(features_dir, shards)

    pool = scores.features["pool"]
    summary: dict[str, Any] = {"num_samples": config.num_samples}
    distances, codes = _distances(pool, reference, config.seed)
    summary.update(distances)
    summary.update(_inception_score(scores.features, pool, reference))
    k = config.precision_recall_k
    if min(len(pool), reference.count) > k:
        summary["precision"], summary["recall"] = precision_recall(reference.features, pool, k=k, device=device)
    else:
        log.warning("evaluate: precision/recall need more than k=%d samples and reference images", k)
        summary["precision"] = summary["recall"] = None
    if scores.clip_score is not None:
        summary["clip_score"] = scores.clip_score
    summary[MEASUREMENTS_KEY] = _measurements(summary, len(pool), extractor, reference_text, codes, config)
    grid = grid_png(samples_dir, shards, config, setup.num_classes)
    if grid is not None:
        atomic_write_bytes(ctx.output_dir / GRID_FILE, grid)
    summary.update(
        # Of the shards this run computed (None when a resumed run computed none).
        samples_per_second=generated / generation_seconds if generated else None,
        shards=len(shards),
        shards_computed_this_run=computed,
        grid=GRID_FILE if grid is not None else None,
        reference_images=reference.count,
        reference=reference_text,
        reference_split=config.reference_split,
        reference_key=reference.key,
        generator=generator.kind.name,
        conditioning=generator.conditioning,
        text_conditioned=text_conditioned,
        sampler=generator.kind.sampler(config.sampling),
        sampling_steps=config.sampling.steps,
        guidance_scale=config.sampling.guidance_scale,
    )
    log.info("evaluate: gFID %s, IS %s, precision %s, recall %s", summary["gfid"], summary["inception_score"],
             summary["precision"], summary["recall"])
    table = TableRecord(glob=f"{SAMPLES_TABLE}/*.parquet", rows=config.num_samples,
                        columns={field.name: str(field.type) for field in SAMPLES_SCHEMA})
    return StageOutput(tables={SAMPLES_TABLE: table}, summary=summary)


def _distances(pool: np.ndarray, reference, seed: int) -> tuple[dict[str, Any], dict[str, str]]:
    """gFID and gKID (with its std over subsets) against the reference, and how each was computed."""
    if len(pool) < 2:
        return {"gfid": None, "gkid": None, "gkid_std": None}, {}
    gfid, fid_code = frechet(reference.features, pool, reference.mu, reference.sigma)
    values: dict[str, Any] = {"gfid": gfid, "gkid": None, "gkid_std": None}
    codes = {"gfid": fid_code}
    if min(len(pool), reference.count) >= 4:
        distance, codes["gkid"] = kid(reference.features, pool, seed)
        values.update(gkid=distance.mean, gkid_std=distance.std)
    return values, codes


def _measurements(summary: dict[str, Any], n: int, extractor: str, reference: str, codes: dict[str, str],
                  config: EvaluateConfig) -> dict[str, dict[str, Any]]:
    """The protocol of each generation metric, as its `metrics` row carries it."""
    seed = config.seed
    found: dict[str, Measurement] = {}
    for name in ("gfid", "gkid"):
        if summary.get(name) is not None:
            found[name] = Measurement(summary[name], n=n, implementation=f"{extractor} / {codes[name]}",
                                      reference=reference, seed=seed, std=summary.get(f"{name}_std"))
    if summary.get("inception_score") is not None:
        found["inception_score"] = Measurement(summary["inception_score"], n=n, seed=seed,
                                               std=summary["inception_score_std"],
                                               implementation=f"{extractor} / {summary['is_classifier']}, "
                                                              f"{min(10, n)} splits")
    for name in ("precision", "recall"):
        if summary.get(name) is not None:
            found[name] = Measurement(summary[name], n=n, reference=reference, seed=seed,
                                      implementation=f"{extractor} / k-NN manifolds, k={config.precision_recall_k}")
    if summary.get("clip_score") is not None:
        found["clip_score"] = Measurement(summary["clip_score"], n=n, seed=seed, implementation=f"CLIP {config.clip_path}")
    return measurements(**found)


def _inception_score(features: dict[str, list[np.ndarray]], pool: np.ndarray, reference) -> dict[str, Any]:
    splits = min(10, len(pool))
    if "logits" in features:
        mean, std = inception_score(logits=np.concatenate(features["logits"]), splits=splits)
        return {"inception_score": mean, "inception_score_std": std, "is_classifier": "inception-2015-12-05"}
    if reference.probe_weight is None:
        return {"inception_score": None, "inception_score_std": None, "is_classifier": "none (fewer than two classes)"}
    mean, std = inception_score(probs=reference.probe_probs(pool), splits=splits)
    return {"inception_score": mean, "inception_score_std": std, "is_classifier": "dataset-linear-probe",
            "is_probe_accuracy": reference.probe_accuracy}
