"""Reference statistics from a reference batch in the ADM evaluator's `.npz` layout.

Published ImageNet gFIDs compare 50,000 samples with the ADM evaluator's reference batch
(`VIRTUAL_imagenet256_labeled.npz`: `arr_0` = uint8 images [N, 256, 256, 3], plus `mu`/`sigma`
of its TensorFlow Inception pool features). `evaluate.reference_npz` points at such a file:

- with `arr_0`, its images are centre-cropped to a square and resized (Lanczos, as ingest does)
  to the samples' resolution when they differ, and go through tok1d's own feature network
  (clean-fid's PyTorch port of inception-2015-12-05), so samples and reference are measured by
  the same network; features are cached by content (tasks/features.py) and the statistics by
  (file hash, resolution, network) under caches/reference-stats.
- with only `mu`/`sigma`, those statistics are used as they are. They come from whichever
  network made the file (the ADM evaluator's TensorFlow graph for the published files), so the
  FID mixes two implementations; KID and precision/recall need features and are skipped. The
  `reference` column of the metric says which case applied.

clean-fid and the ADM evaluator differ in the Inception implementation (PyTorch port vs the TF
graph) and in resizing (clean-fid: PIL bicubic on uint8 to 299; ADM: TF bilinear resize inside the
graph), so their FIDs of the same images differ (LlamaGen #34): compare numbers only when their
`implementation` and `reference` match.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
from PIL import Image

from models.inception import InceptionFeatures
from models.metrics import feature_statistics
from tasks.evaluate.reference import CACHE_DIR, REFERENCE_VERSION, ReferenceStats, load_reference, save_reference
from tasks.features import FeatureCache
from tasks.hashing import hash_value, sha256_file
from tasks.store import Store

log = logging.getLogger("tok1d")

IMAGES_KEY = "arr_0"


def centre_crop_resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [H, W, 3] -> its centred square, resized to resolution x resolution (Lanczos)."""
    height, width = image.shape[:2]
    side = min(height, width)
    if side == resolution and height == width:
        return image
    top, left = (height - side) // 2, (width - side) // 2
    resized = Image.fromarray(image).resize((resolution, resolution), Image.Resampling.LANCZOS,
                                            box=(left, top, left + side, top + side), reducing_gap=3.0)
    return np.asarray(resized)


def describe(path: Path, digest: str, stats: ReferenceStats, from_images: bool, resolution: int) -> str:
    """The `reference` column of the metrics measured against this batch (`digest`: the file's sha256)."""
    digest = digest[:16]
    if from_images:
        return (f"ADM reference batch {path.name} (sha256 {digest}): {stats.count} images, centre-cropped and "
                f"resized to {resolution} px, features by tok1d's network")
    return f"ADM reference batch {path.name} (sha256 {digest}): its precomputed mu/sigma (its own network)"


def reference_from_npz(
    path: str | Path,
    resolution: int,
    store: Store,
    net: InceptionFeatures,
    extractor: str,
    batch_size: int = 64,
    progress: Callable[[int], ContextManager[Any]] | None = None,
) -> tuple[ReferenceStats, str]:
    """The statistics of the reference batch at `path` and the text of its `reference` column."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"evaluate.reference_npz: no file {path} (an ADM-evaluator reference batch, e.g. "
                                "VIRTUAL_imagenet256_labeled.npz)")
    digest = sha256_file(path)  # once: reference batches are gigabytes
    with np.load(path, allow_pickle=False) as data:
        names = set(data.files)
        if IMAGES_KEY not in names:
            if not {"mu", "sigma"} <= names:
                raise ValueError(f"evaluate.reference_npz: {path} holds {sorted(names)}; expected {IMAGES_KEY!r} "
                                 "(images [N, H, W, 3] uint8) or 'mu' and 'sigma'")
            stats = ReferenceStats(key=f"npz-{digest[:16]}", mu=data["mu"].astype(np.float64),
                                   sigma=data["sigma"].astype(np.float64), features=np.zeros((0, len(data["mu"]))),
                                   labels=np.zeros(0, np.int64), probe_weight=None, probe_bias=None,
                                   probe_accuracy=None)
            return stats, describe(path, digest, stats, False, resolution)
        key = hash_value([REFERENCE_VERSION, "adm-npz", digest, resolution, extractor])[:32]
        cached = store.root / CACHE_DIR / f"{key}.npz"
        if cached.exists():
            stats = load_reference(cached, key)
            return stats, describe(path, digest, stats, True, resolution)
        images = data[IMAGES_KEY]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"evaluate.reference_npz: {path}[{IMAGES_KEY!r}] must be uint8 [N, H, W, 3], "
                             f"got {images.dtype} {images.shape}")
        stats = _compute(images, resolution, store, net, extractor, key, batch_size, progress)
    save_reference(cached, stats)
    return stats, describe(path, digest, stats, True, resolution)


def _compute(images: np.ndarray, resolution: int, store: Store, net: InceptionFeatures, extractor: str, key: str,
             batch_size: int, progress: Callable[[int], ContextManager[Any]] | None) -> ReferenceStats:
    if len(images) < 2:
        raise ValueError(f"the reference batch holds {len(images)} image(s); FID needs at least 2")
    cache = FeatureCache(store, extractor)
    chunks = []
    with (progress(len(images)) if progress is not None else nullcontext()) as bar:
        for start in range(0, len(images), batch_size):
            batch = np.stack([centre_crop_resize(image, resolution) for image in images[start:start + batch_size]])
            ids = [hashlib.sha256(image.tobytes()).hexdigest() for image in batch]
            chunks.append(cache.features(ids, batch, net, batch_size))
            if bar is not None:
                bar.update(len(batch))
    features = np.concatenate(chunks)
    mu, sigma = feature_statistics(features)
    log.info("evaluate: reference batch statistics of %d images", len(features))
    return ReferenceStats(key, mu, sigma, features.astype(np.float32), np.zeros(len(features), np.int64), None, None,
                          None)
