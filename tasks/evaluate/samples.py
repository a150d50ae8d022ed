"""Evaluate's sharded part: samples [start, stop) of the generator, decoded by the tokenizer,
scored by Inception (and CLIP), one shard at a time on whichever fan-out is attached
(tasks/shards.py: here, or one Ray task per shard).

Shard K covers samples [K * shard_rows, (K + 1) * shard_rows) of `evaluate.num_samples` and
writes two immutable files: the artifact's `samples/part-KKKKK.parquet` and, in the stage's work
folder, `features/part-KKKKK.npz` (Inception pool features and logits, the shard's CLIP score),
which the stage folds into the metrics. A shard whose two files exist and read back is done, so
a killed evaluation computes only the missing shards again. Shard K draws from its own
torch.Generator (`shard_seed`): its samples do not depend on which shards ran before it or where.
"""

from __future__ import annotations

import io
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from models.inception import InceptionFeatures
from models.metrics import clip_score, extract_features
from tasks.config import EvaluateConfig
from tasks.evaluate.generate import generate_images, to_uint8
from tasks.evaluate.sampling import balanced_labels, draw_captions
from tasks.hashing import hash_value
from tasks.pretokenize.read import token_meta
from tasks.shards import RangeShard, ShardResult, shard_done
from tasks.store import Manifest, Store, atomic_write_bytes
from tasks.tables import write_parquet_atomic
from tasks.train_generator.read import load_generator
from tasks.train_tokenizer.read import load_tokenizer

log = logging.getLogger("tok1d")

SAMPLES_TABLE = "samples"
SAMPLES_SCHEMA = pa.schema(
    [("sample_index", pa.int64()), ("label_id", pa.int32()), ("caption_id", pa.string()), ("image", pa.binary())]
)
FEATURES_DIR = "features"
# CLIP scores images in chunks of this many (the model is loaded per chunk; memory stays flat).
CLIP_CHUNK = 2048


def shard_seed(seed: int, index: int) -> int:
    """The seed of shard `index`'s generator. Shard 0 takes `seed` itself: an evaluation that fits
    in one shard draws exactly what one unsharded loop over its samples drew."""
    return seed if index == 0 else int(hash_value(["evaluate-shard", seed, index])[:15], 16)


@dataclass
class Setup:
    """What every shard of one evaluation samples and scores with."""

    generator: Any  # tasks.train_generator.kinds.Generator
    generator_info: dict[str, Any]
    tokenizer: Any  # models.tokenizer.Tokenizer (EMA weights)
    net: InceptionFeatures
    num_classes: int
    labels: np.ndarray  # [num_samples] int64
    captions: list[tuple[str, str]] | None  # (caption_id, caption) per sample, text-conditioned runs
    texts: Any  # tasks.embed_text.read.TextEmbeddings of the captions, or None
    score_clip: bool

    @property
    def text_conditioned(self) -> bool:
        return self.captions is not None


# One setup per process and evaluation: the in-process fan-out reuses the stage's own, a Ray
# worker loads the models once for all the shards it is given.
_SETUPS: dict[str, Setup] = {}


def load_setup(store_root: str, inputs: dict[str, Manifest], config: EvaluateConfig, device: str) -> Setup:
    """The generator, tokenizer and Inception on `device`, the samples' labels and captions; checks
    that they belong together (cached per process)."""
    key = hash_value([store_root, device, config.model_dump(mode="json"),
                      sorted((name, m.artifact_id) for name, m in inputs.items())])
    if key in _SETUPS:
        return _SETUPS[key]
    store, torch_device = Store(store_root), torch.device(device)
    generator, generator_info = load_generator(inputs["train-generator"], store, torch_device)
    pretokenize = inputs["pretokenize"]
    meta = token_meta(pretokenize, store)
    if generator_info["tokens_artifact"] != pretokenize.artifact_id:
        raise ValueError(f"the generator was trained on tokens {generator_info['tokens_artifact']}, but evaluate got "
                         f"pretokenize artifact {pretokenize.artifact_id}; run the pipeline's stages together")
    tokenizer, _ = load_tokenizer(inputs["train-tokenizer"], store, device=torch_device, ema=True)
    if tokenizer.config.num_latent_tokens != generator.seq_len or tokenizer.is_discrete != generator.discrete:
        kinds = {True: "discrete", False: "continuous"}
        raise ValueError(f"the tokenizer ({tokenizer.config.num_latent_tokens} {kinds[tokenizer.is_discrete]} tokens) "
                         f"does not decode the generator's {generator.seq_len} {kinds[generator.discrete]} tokens")
    num_classes = int(meta["num_classes"])
    labels = balanced_labels(config.num_samples, num_classes)
    captions = texts = None
    if generator.uses_text or tokenizer.uses_text:
        from tasks.caption.read import load_caption_pool
        from tasks.embed_text.read import load_text_embeddings

        captions = draw_captions(labels, load_caption_pool(inputs["caption"], store), config.seed)
        texts = load_text_embeddings(inputs["embed-text"], store)
    net = InceptionFeatures(weights_path=config.inception_classifier_path).to(torch_device)
    setup = Setup(generator, generator_info, tokenizer, net, num_classes, labels, captions, texts,
                  score_clip=config.clip_path is not None and captions is not None)
    _SETUPS.clear()  # one evaluation's models at a time: a long-lived worker must not pile them up
    _SETUPS[key] = setup
    return setup


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def features_done(path: Path) -> bool:
    """True when the shard's features file exists and opens (its arrays are read when used)."""
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            return "pool" in data.files
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        log.warning("evaluate: features file %s is unreadable (%s); computing its shard again", path, error)
        return False


@dataclass(frozen=True)
class SampleJob:
    """Sample, decode and score one shard (picklable: it runs on a Ray worker as well as here)."""

    store_root: str
    inputs: dict[str, Manifest]
    config: EvaluateConfig
    device: str
    samples_dir: str
    features_dir: str

    def paths(self, shard: RangeShard) -> tuple[Path, Path]:
        return Path(self.samples_dir) / f"{shard.name}.parquet", Path(self.features_dir) / f"{shard.name}.npz"

    def done(self, shard: RangeShard) -> bool:
        samples, features = self.paths(shard)
        return features_done(features) and shard_done(samples, SAMPLES_SCHEMA)

    def __call__(self, shard: RangeShard) -> ShardResult:
        if self.done(shard):
            return ShardResult(shard.name, shard.rows, 0, False)
        config, device = self.config, torch.device(self.device)
        setup = load_setup(self.store_root, self.inputs, config, self.device)
        rng = torch.Generator(device=device).manual_seed(shard_seed(config.seed, shard.index))
        rows: list[dict[str, Any]] = []
        features: dict[str, list[np.ndarray]] = {}
        clip_images: list[np.ndarray] = []
        clip_scores: list[tuple[float, int]] = []
        seconds = 0.0
        for start in range(shard.start, shard.stop, config.batch_size):
            stop = min(start + config.batch_size, shard.stop)
            labels = setup.labels[start:stop]
            captions = setup.captions[start:stop] if setup.captions is not None else None
            text = text_mask = None
            if captions is not None:
                text, text_mask = setup.texts.lookup([cid for cid, _ in captions])
                text, text_mask = text.to(device).float(), text_mask.to(device)
            _synchronize(device)
            began = time.perf_counter()
            decoded = generate_images(setup.generator, setup.tokenizer, torch.from_numpy(labels), config.sampling,
                                      rng, text, text_mask)
            images = to_uint8(decoded)
            _synchronize(device)
            seconds += time.perf_counter() - began
            for key, value in extract_features([images], setup.net, batch_size=config.batch_size, device=device).items():
                features.setdefault(key, []).append(value)
            for offset, image in enumerate(images):
                rows.append({"sample_index": start + offset, "label_id": int(labels[offset]),
                             "caption_id": captions[offset][0] if captions else None, "image": _png(image)})
            if setup.score_clip:
                clip_images.append(images)
                if sum(len(chunk) for chunk in clip_images) >= CLIP_CHUNK or stop == shard.stop:
                    chunk = np.concatenate(clip_images)
                    first = stop - len(chunk)
                    prompts = [caption for _, caption in setup.captions[first:stop]]
                    clip_scores.append((clip_score(chunk, prompts, config.clip_path, device=device), len(chunk)))
                    clip_images = []
        arrays = {key: np.concatenate(values) for key, values in features.items()}
        if clip_scores:
            count = sum(n for _, n in clip_scores)
            arrays["clip"] = np.array([sum(score * n for score, n in clip_scores) / count, count], np.float64)
        samples_path, features_path = self.paths(shard)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        # Features first, the samples part last: the samples part in place marks the shard done.
        atomic_write_bytes(features_path, buffer.getvalue())
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA), samples_path, use_dictionary=["caption_id"])
        log.info("evaluate: computed shard %s (%d samples)", shard.name, shard.rows)
        return ShardResult(shard.name, shard.rows, shard.rows, True, seconds)


@dataclass
class ShardScores:
    """The shards' features and CLIP scores, in shard order."""

    features: dict[str, np.ndarray]  # "pool" [N, 2048], "logits" [N, 1008] with the 2015 classifier
    clip_score: float | None


def read_scores(features_dir: Path, shards: list[RangeShard]) -> ShardScores:
    parts: dict[str, list[np.ndarray]] = {}
    clip: list[tuple[float, float]] = []
    for shard in shards:
        with np.load(features_dir / f"{shard.name}.npz", allow_pickle=False) as data:
            for key in data.files:
                if key == "clip":
                    score, count = data["clip"]
                    clip.append((float(score), float(count)))
                else:
                    parts.setdefault(key, []).append(data[key])
    score = sum(s * n for s, n in clip) / sum(n for _, n in clip) if clip else None
    return ShardScores({key: np.concatenate(values) for key, values in parts.items()}, score)
