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

Everything random comes from one torch.Generator seeded with `seed`, so a rerun gives the same
samples, grid and metrics. Outputs: samples.png (rows = classes where possible) and the
`samples` table (sample_index, label_id, caption_id, image PNG).
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from models.inception import InceptionFeatures
from models.metrics import clip_score, extract_features, inception_score, precision_recall
from tasks.config import EvaluateConfig
from tasks.evaluate.generate import generate_images, to_uint8
from tasks.evaluate.reference import reference_statistics
from tasks.evaluate.reference_batch import reference_from_npz
from tasks.features import extractor_id, frechet, kid
from tasks.measurement import MEASUREMENTS_KEY, Measurement, measurements
from tasks.evaluate.sampling import balanced_labels, draw_captions
from tasks.pretokenize.read import token_meta
from tasks.stage import StageContext, StageOutput
from tasks.store import TableRecord, atomic_write_bytes
from tasks.tables import write_parquet_atomic
from tasks.train_generator.read import load_generator
from tasks.train_tokenizer.read import load_tokenizer

log = logging.getLogger("tok1d")

SAMPLES_TABLE = "samples"
SAMPLES_SCHEMA = pa.schema(
    [("sample_index", pa.int64()), ("label_id", pa.int32()), ("caption_id", pa.string()), ("image", pa.binary())]
)
SHARD_ROWS = 1024
# CLIP scores images in chunks of this many (the model is loaded per chunk; memory stays flat).
CLIP_CHUNK = 2048
GRID_FILE = "samples.png"


class SampleShards:
    """Writes the samples table as `samples/part-NNNNN.parquet` shards of SHARD_ROWS rows."""

    def __init__(self, folder: Path):
        shutil.rmtree(folder, ignore_errors=True)  # an earlier, interrupted attempt
        folder.mkdir(parents=True)
        self.folder = folder
        self.rows: list[dict[str, Any]] = []
        self.shards = 0
        self.written = 0

    def add(self, index: int, label: int, caption_id: str | None, image: np.ndarray) -> None:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        self.rows.append({"sample_index": index, "label_id": label, "caption_id": caption_id, "image": buffer.getvalue()})
        if len(self.rows) >= SHARD_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows and self.shards:
            return
        path = self.folder / f"part-{self.shards:05d}.parquet"
        write_parquet_atomic(pa.Table.from_pylist(self.rows, schema=SAMPLES_SCHEMA), path, use_dictionary=["caption_id"])
        self.written += len(self.rows)
        self.shards += 1
        self.rows = []


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SampleSink:
    """Where each decoded batch goes: Inception features, the samples table, the grid and CLIP."""

    def __init__(self, ctx: StageContext, net: InceptionFeatures, num_classes: int, score_clip: bool):
        config: EvaluateConfig = ctx.config
        self.config, self.net, self.device = config, net, torch.device(ctx.device)
        self.shards = SampleShards(ctx.output_dir / SAMPLES_TABLE)
        self.grid = GridCollector(config.grid_images, num_classes, config.num_samples)
        self.features: dict[str, list[np.ndarray]] = {}
        self.score_clip = score_clip
        self.clip_scores: list[tuple[float, int]] = []
        self.clip_images: list[np.ndarray] = []
        self.clip_prompts: list[str] = []

    def add(self, start: int, images: np.ndarray, labels: np.ndarray, captions: list[tuple[str, str]] | None) -> None:
        """Images [B, H, W, 3] uint8 of samples start..start+B-1, their labels and (caption_id, caption)s."""
        batch = extract_features([images], self.net, batch_size=self.config.batch_size, device=self.device)
        for key, value in batch.items():
            self.features.setdefault(key, []).append(value)
        for offset, image in enumerate(images):
            self.shards.add(start + offset, int(labels[offset]), captions[offset][0] if captions else None, image)
            self.grid.offer(start + offset, int(labels[offset]), image)
        if self.score_clip:
            self.clip_images.append(images)
            self.clip_prompts.extend(caption for _, caption in captions)
            if len(self.clip_prompts) >= CLIP_CHUNK:
                self._flush_clip()

    def _flush_clip(self) -> None:
        if self.clip_prompts:
            score = clip_score(np.concatenate(self.clip_images), self.clip_prompts, self.config.clip_path,
                               device=self.device)
            self.clip_scores.append((score, len(self.clip_prompts)))
            self.clip_images, self.clip_prompts = [], []

    def finish(self) -> float | None:
        """Write the last shard; the CLIP score over every sample (None without CLIP)."""
        self.shards.flush()
        if not self.score_clip:
            return None
        self._flush_clip()
        return sum(score * n for score, n in self.clip_scores) / sum(n for _, n in self.clip_scores)


def run_evaluate(ctx: StageContext) -> StageOutput:
    config: EvaluateConfig = ctx.config
    store, device = ctx.store, torch.device(ctx.device)
    if config.batch_size < 1:
        raise ValueError(f"evaluate.batch_size must be >= 1, got {config.batch_size}")
    generator, generator_info = load_generator(ctx.inputs["train-generator"], store, device)
    pretokenize = ctx.inputs["pretokenize"]
    meta = token_meta(pretokenize, store)
    if generator_info["tokens_artifact"] != pretokenize.artifact_id:
        raise ValueError(f"the generator was trained on tokens {generator_info['tokens_artifact']}, but evaluate got "
                         f"pretokenize artifact {pretokenize.artifact_id}; run the pipeline's stages together")
    tokenizer, _ = load_tokenizer(ctx.inputs["train-tokenizer"], store, device=device, ema=True)
    if tokenizer.config.num_latent_tokens != generator.seq_len or tokenizer.is_discrete != generator.discrete:
        kinds = {True: "discrete", False: "continuous"}
        raise ValueError(f"the tokenizer ({tokenizer.config.num_latent_tokens} {kinds[tokenizer.is_discrete]} tokens) "
                         f"does not decode the generator's {generator.seq_len} {kinds[generator.discrete]} tokens")

    num_classes = int(meta["num_classes"])
    labels = balanced_labels(config.num_samples, num_classes)
    text_conditioned = generator.uses_text or tokenizer.uses_text
    captions: list[tuple[str, str]] | None = None
    if text_conditioned:
        from tasks.caption.read import load_caption_pool
        from tasks.embed_text.read import load_text_embeddings

        captions = draw_captions(labels, load_caption_pool(ctx.inputs["caption"], store), config.seed)
        texts = load_text_embeddings(ctx.inputs["embed-text"], store)
    if config.clip_path is not None and not text_conditioned:
        log.info("evaluate: clip_path is set but neither the generator nor the tokenizer uses text; no CLIP score")

    net = InceptionFeatures(weights_path=config.inception_classifier_path).to(device)
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

    rng = torch.Generator(device=device).manual_seed(config.seed)
    sink = SampleSink(ctx, net, num_classes, score_clip=config.clip_path is not None and text_conditioned)
    generation_seconds = 0.0
    with ctx.progress(config.num_samples, "samples", unit="sample") as progress:
        for start in range(0, config.num_samples, config.batch_size):
            stop = min(start + config.batch_size, config.num_samples)
            text = text_mask = None
            if captions is not None:
                text, text_mask = texts.lookup([cid for cid, _ in captions[start:stop]])
                text, text_mask = text.to(device).float(), text_mask.to(device)
            _synchronize(device)
            began = time.perf_counter()
            decoded = generate_images(generator, tokenizer, torch.from_numpy(labels[start:stop]), config.sampling,
                                      rng, text, text_mask)
            images = to_uint8(decoded)
            _synchronize(device)
            generation_seconds += time.perf_counter() - began
            sink.add(start, images, labels[start:stop], captions[start:stop] if captions is not None else None)
            progress.update(stop - start)
    clip = sink.finish()

    pool = np.concatenate(sink.features["pool"])
    summary: dict[str, Any] = {"num_samples": config.num_samples}
    distances, codes = _distances(pool, reference, config.seed)
    summary.update(distances)
    summary.update(_inception_score(sink.features, pool, reference))
    k = config.precision_recall_k
    if min(len(pool), reference.count) > k:
        summary["precision"], summary["recall"] = precision_recall(reference.features, pool, k=k, device=device)
    else:
        log.warning("evaluate: precision/recall need more than k=%d samples and reference images", k)
        summary["precision"] = summary["recall"] = None
    if clip is not None:
        summary["clip_score"] = clip
    summary[MEASUREMENTS_KEY] = _measurements(summary, len(pool), extractor, reference_text, codes, config)
    grid_png = sink.grid.png()
    if grid_png is not None:
        atomic_write_bytes(ctx.output_dir / GRID_FILE, grid_png)
    summary.update(
        samples_per_second=config.num_samples / max(generation_seconds, 1e-9),
        grid=GRID_FILE if grid_png is not None else None,
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
    table = TableRecord(glob=f"{SAMPLES_TABLE}/*.parquet", rows=sink.shards.written,
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
