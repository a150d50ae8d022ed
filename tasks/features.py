"""Inception features of ingested images, cached store-wide by image content, and the two
distances every stage computes on them (FID, KID), with the description of the method used.

    <store>/caches/inception-features/<extractor>/part-*.npz   (ids [N] str, pool [N, 2048] float32)

An ingested image's id is the sha256 of its pixels, so a feature computed once serves every
later evaluation of any tokenizer or generator on the same images: re-scoring a validation
split costs only the reconstructions' features. Each part is written under a temporary name and
renamed (a kill loses at most the part being written); concurrent writers add distinct parts,
and an id present in two parts has the same features in both. Loaded with allow_pickle=False.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from models.inception import InceptionFeatures, inception_weights_path
from models.metrics import (KernelDistance, extract_features, feature_statistics, fid_from_statistics,
                            kernel_inception_distance, low_rank_frechet_distance)
from tasks.hashing import sha256_file
from tasks.store import Store, temporary_path

CACHE_DIR = Path("caches") / "inception-features"
# Bump when the preprocessing of images before the network changes.
FEATURES_VERSION = "1"


def extractor_id(weights_path: str | Path | None) -> str:
    """Identity of the feature network: its file name and the sha256 of the TorchScript file."""
    path = Path(weights_path) if weights_path is not None else inception_weights_path()
    return f"{path.name}:{sha256_file(path)[:16]}"


class FeatureCache:
    """Pool features by image id for one feature network (`extractor`: its name and file hash)."""

    def __init__(self, store: Store, extractor: str):
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in extractor)
        self.directory = store.root / CACHE_DIR / f"{safe}-v{FEATURES_VERSION}"
        self.extractor = extractor
        self._rows: dict[str, np.ndarray] = {}
        self._seen: set[Path] = set()
        self.computed = 0  # features this object computed (the rest came from the cache)

    def _load(self) -> None:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("part-*.npz")):
            if path in self._seen:
                continue
            with np.load(path, allow_pickle=False) as part:
                for image_id, row in zip(part["ids"].tolist(), part["pool"]):
                    self._rows.setdefault(image_id, row)
            self._seen.add(path)

    def missing(self, image_ids: Sequence[str]) -> list[str]:
        self._load()
        return [image_id for image_id in image_ids if image_id not in self._rows]

    def add(self, image_ids: Sequence[str], pool: np.ndarray) -> None:
        """Store the features of `image_ids` (rows of `pool`) as one new part."""
        if len(image_ids) != len(pool):
            raise ValueError(f"{len(image_ids)} ids for {len(pool)} feature rows")
        if not len(image_ids):
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"part-{uuid.uuid4().hex}.npz"
        tmp = temporary_path(path)
        with open(tmp, "wb") as handle:
            np.savez(handle, ids=np.asarray(list(image_ids)), pool=np.asarray(pool, np.float32))
        tmp.replace(path)
        self._seen.add(path)
        for image_id, row in zip(image_ids, np.asarray(pool, np.float32)):
            self._rows.setdefault(image_id, row)
        self.computed += len(image_ids)

    def get(self, image_ids: Sequence[str]) -> np.ndarray:
        """Features [N, 2048] (float64, as the metrics take them) of ids that are all cached."""
        absent = self.missing(image_ids)
        if absent:
            raise KeyError(f"{len(absent)} of {len(image_ids)} images have no cached features (e.g. {absent[0]})")
        return np.stack([self._rows[image_id] for image_id in image_ids]).astype(np.float64)

    def features(self, image_ids: Sequence[str], images: np.ndarray, net: InceptionFeatures,
                 batch_size: int = 64) -> np.ndarray:
        """Features of `images` (uint8 [N, H, W, 3] or float [N, 3, H, W], with their ids),
        computing only those not cached yet."""
        absent = set(self.missing(image_ids))
        if absent:
            index = [i for i, image_id in enumerate(image_ids) if image_id in absent]
            pool = extract_features([images[index]], net, batch_size=batch_size)["pool"]
            self.add([image_ids[i] for i in index], pool)
        return self.get(image_ids)


# KID subsets: clean-fid's 100 subsets of at most 1000, but at most half the smaller set, so that
# subsets differ and their std says something (when N = subset size every subset is the whole set).
KID_SUBSETS = 100
KID_MAX_SUBSET = 1000


def kid(real: np.ndarray, fake: np.ndarray, seed: int) -> tuple[KernelDistance, str]:
    """Unbiased KID of two feature sets with its std over subsets, and the method's description."""
    subset = max(2, min(KID_MAX_SUBSET, len(real) // 2, len(fake) // 2))
    result = kernel_inception_distance(real, fake, num_subsets=KID_SUBSETS, max_subset_size=subset, seed=seed)
    return result, f"unbiased KID, cubic kernel, {result.subsets} subsets of {result.subset_size}"


def frechet(real: np.ndarray, fake: np.ndarray, mu_real: np.ndarray | None = None,
            sigma_real: np.ndarray | None = None) -> tuple[float, str]:
    """FID of two feature sets and the method used: clean-fid's routine when both sets fill the
    2048-d feature space, the exact low-rank form otherwise (the usual case on CPU)."""
    if len(real) == 0:  # statistics without features (a precomputed reference batch)
        if mu_real is None or sigma_real is None:
            raise ValueError("frechet: no real features and no real statistics")
        return fid_from_statistics(*feature_statistics(fake), mu_real, sigma_real), "clean-fid frechet_distance"
    if min(len(real), len(fake)) > real.shape[1]:
        if mu_real is None or sigma_real is None:
            mu_real, sigma_real = feature_statistics(real)
        return fid_from_statistics(*feature_statistics(fake), mu_real, sigma_real), "clean-fid frechet_distance"
    return (low_rank_frechet_distance(real, fake, mu_real, sigma_real),
            f"exact low-rank frechet distance (N = {min(len(real), len(fake))} <= 2048)")
