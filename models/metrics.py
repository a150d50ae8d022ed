"""Image-quality metrics: PSNR, SSIM, FID, KID, Inception Score, precision/recall and CLIP score.

Reconstruction metrics (``psnr``, ``ssim``) work on torch tensors in [0, max_val] and return one
value per image. Distribution metrics work on Inception features gathered by ``extract_features``,
which follows clean-fid's "clean" mode (uint8 images, PIL bicubic resize to 299 in float,
(x - 128) / 128), so ``fid_from_statistics`` gives the numbers clean-fid gives on the same images.

Error bars: ``kernel_inception_distance`` (unbiased, mean and std over subsets),
``bootstrap_interval`` (percentile bootstrap of a mean of per-image values such as PSNR/SSIM) and
``paired_difference`` (paired t-test across seeds). Report N (and k for precision/recall) with
every number: FID and precision/recall depend on them.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from models.inception import InceptionFeatures, to_uint8_clean_resized


# ---------------------------------------------------------------- reconstruction metrics

def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two image batches shaped [B,C,H,W] alike, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: Tensor, b: Tensor, max_val: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image: 10 log10(max_val^2 / MSE). [B,C,H,W] -> [B]."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(max_val**2 / mse)).float()  # inf for identical images


def _gaussian_window(size: int, sigma: float, channels: int, like: Tensor) -> Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: Tensor, b: Tensor, max_val: float = 1.0, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al. 2004) per image: [B,C,H,W] -> [B].

    Gaussian window 11 / sigma 1.5, K1=0.01, K2=0.03, population (not sample) statistics and
    only windows fully inside the image ("valid"), then the mean over pixels and channels.
    This is what skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=max_val)`` computes.
    """
    _check_pair(a, b)
    if min(a.shape[-2:]) < window_size:
        raise ValueError(f"ssim needs images of at least {window_size}x{window_size}, got {tuple(a.shape[-2:])}")
    x, y = a.double(), b.double()
    channels = x.shape[1]
    w = _gaussian_window(window_size, sigma, channels, x)
    blur = lambda t: F.conv2d(t, w, groups=channels)  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1).float()


# ---------------------------------------------------------------- Inception features

def _to_uint8_hwc(batch: np.ndarray | Tensor) -> np.ndarray:
    """uint8 numpy [B,H,W,C] or float tensor [B,C,H,W] in [0,1] -> uint8 numpy [B,H,W,C]."""
    if isinstance(batch, Tensor):
        if batch.ndim != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(f"float image tensors must be [B,3,H,W] or [B,1,H,W] in [0,1], got {tuple(batch.shape)}")
        # Quantize like saving a PNG, so generated images are scored as the files would be.
        batch = (batch.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        return batch.permute(0, 2, 3, 1).cpu().numpy()
    batch = np.asarray(batch)
    if batch.dtype != np.uint8 or batch.ndim not in (3, 4):
        raise ValueError(f"numpy images must be uint8 [B,H,W,3] or [B,H,W], got {batch.dtype} {batch.shape}")
    return batch


@torch.no_grad()
def extract_features(images_iter: Iterable[np.ndarray | Tensor], net: InceptionFeatures,
                     batch_size: int = 64, device: torch.device | str | None = None,
                     progress: bool = False) -> dict[str, np.ndarray]:
    """Inception features of every image, clean-fid style.

    images_iter yields uint8 numpy [B,H,W,3] (or [B,H,W] grayscale) or float tensors
    [B,3,H,W] in [0,1]; float tensors are quantized to uint8 first. Each image is resized with
    clean-fid's PIL bicubic float resizer and fed through ``net.forward_clean`` in float32
    (autocast off) in chunks of ``batch_size``. ``device`` defaults to the network's device;
    a different one moves the network there. Returns {"pool": [N,2048]} and, when the network
    has a classifier, {"logits": [N,1008]} as float64 numpy arrays.
    """
    if device is None:
        device = next(net.parameters()).device
    device = torch.device(device)
    net.to(device).eval()
    out: dict[str, list[np.ndarray]] = {}
    for batch in tqdm(images_iter, desc="inception features", disable=not progress):
        batch = _to_uint8_hwc(batch)
        for start in range(0, len(batch), batch_size):
            x = to_uint8_clean_resized(batch[start:start + batch_size]).to(device)
            with torch.autocast(device_type=device.type, enabled=False):
                feats = net.forward_clean(x)
            for key, value in feats.items():
                out.setdefault(key, []).append(value.double().cpu().numpy())
    if not out:
        raise ValueError("extract_features got no images from images_iter")
    return {key: np.concatenate(values) for key, values in out.items()}


# ---------------------------------------------------------------- FID

def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) of a feature matrix [N,D], as clean-fid stores them."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_statistics needs a [N,D] matrix with N >= 2, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fid_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between two Gaussians, with clean-fid's numerically stable routine."""
    from cleanfid.fid import frechet_distance

    with warnings.catch_warnings():
        # clean-fid passes scipy's deprecated `disp=` to sqrtm; the result is unaffected.
        warnings.filterwarnings("ignore", message=".*disp.*", category=DeprecationWarning)
        return float(frechet_distance(mu1, sigma1, mu2, sigma2))


def low_rank_frechet_distance(real: np.ndarray, fake: np.ndarray, mu_real: np.ndarray | None = None,
                              sigma_real: np.ndarray | None = None) -> float:
    """The Frechet distance of the features' Gaussians, exact, through the samples themselves.

    With centred features X [n, d] and Y [m, d], the eigenvalues of S_x S_y are the squared
    singular values of X Y^T / sqrt((n-1)(m-1)), so tr sqrt(S_x S_y) is that matrix's nuclear
    norm. When n or m <= d the covariances are singular: scipy's sqrtm (clean-fid's route) then
    warns that its result may be inaccurate and takes ~30 s for d = 2048 on a small CPU, while this
    needs one SVD of an n x m matrix. mu_real/sigma_real (float64 statistics of `real`) are used
    for the mean and trace terms when given.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    mu_x = real.mean(axis=0) if mu_real is None else mu_real
    x, y = real - real.mean(axis=0), fake - fake.mean(axis=0)
    n, m = len(x), len(y)
    trace_x = float(np.trace(sigma_real)) if sigma_real is not None else float((x * x).sum()) / (n - 1)
    trace_y = float((y * y).sum()) / (m - 1)
    cross = float(np.linalg.svd(x @ y.T, compute_uv=False).sum()) / math.sqrt((n - 1) * (m - 1))
    return float(np.sum((mu_x - fake.mean(axis=0)) ** 2) + trace_x + trace_y - 2 * cross)


# ---------------------------------------------------------------- KID

@dataclass(frozen=True)
class KernelDistance:
    """KID: mean and (population) std of the unbiased MMD^2 over ``subsets`` random subset pairs."""

    mean: float
    std: float
    subsets: int
    subset_size: int


# Up to this many real + fake samples, one kernel matrix of all of them (128 MiB of float64 at
# 4096) replaces three matmuls per subset: 100 subsets of 1000 then cost index lookups instead
# of ~1.2 TFLOP of float64 products. Entries are the same products, so the result is the same.
_KID_GRAM_MAX_SAMPLES = 4096


def _as_float64_matrix(features: np.ndarray | Tensor, name: str) -> np.ndarray:
    if isinstance(features, Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"{name} must be a [N,D] feature matrix with N >= 2, got shape {features.shape}")
    return features


def kernel_inception_distance(real_features: np.ndarray | Tensor, fake_features: np.ndarray | Tensor,
                              num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0) -> KernelDistance:
    """Kernel Inception Distance (Binkowski et al. 2018), clean-fid's estimator with a std.

    Kernel k(x, y) = (x.y / d + 1)^3. For each of ``num_subsets`` subsets, m = min(n_real, n_fake,
    max_subset_size) fake and m real rows are drawn without replacement and the unbiased MMD^2
    (off-diagonal means of k within each set, minus twice the mean of k across) is taken.

    Draws come from ``np.random.RandomState(seed)`` in clean-fid's order (fake subset, then real),
    so ``mean`` equals ``np.random.seed(seed); cleanfid.fid.kernel_distance(real, fake, ...)``
    (which returns only the mean and uses the global generator). ``std`` is the population std
    over subsets, as torch-fidelity and torchmetrics report it. It measures subset-to-subset
    spread at size m: when both sets have m rows every subset is the whole set and std is 0,
    which says nothing about the error of the estimate; use max_subset_size < N for a spread.
    """
    real = _as_float64_matrix(real_features, "real_features")
    fake = _as_float64_matrix(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    if num_subsets < 1 or max_subset_size < 2:
        raise ValueError(f"need num_subsets >= 1 and max_subset_size >= 2, got {num_subsets} and {max_subset_size}")
    d = real.shape[1]
    m = min(len(real), len(fake), max_subset_size)
    rng = np.random.RandomState(seed)
    kernel = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    gram = None
    if len(real) + len(fake) <= _KID_GRAM_MAX_SAMPLES:
        both = np.concatenate([fake, real])  # fake rows first, then real rows
        gram = kernel(both, both)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        fake_idx = rng.choice(len(fake), m, replace=False)
        real_idx = rng.choice(len(real), m, replace=False)
        if gram is not None:
            real_idx = real_idx + len(fake)
            k_ff, k_rr, k_fr = (gram[np.ix_(a, b)] for a, b in
                                ((fake_idx, fake_idx), (real_idx, real_idx), (fake_idx, real_idx)))
        else:
            x, y = fake[fake_idx], real[real_idx]
            k_ff, k_rr, k_fr = kernel(x, x), kernel(y, y), kernel(x, y)
        within = k_ff.sum() - np.trace(k_ff) + k_rr.sum() - np.trace(k_rr)
        values[i] = within / (m * (m - 1)) - 2 * k_fr.sum() / (m * m)
    return KernelDistance(mean=float(values.mean()), std=float(values.std()), subsets=num_subsets, subset_size=m)


# ---------------------------------------------------------------- Inception Score

def inception_score(logits: np.ndarray | Tensor | None = None, probs: np.ndarray | Tensor | None = None,
                    splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` chunks.

    Pass either ``logits`` [N,K] (softmax is taken over all K) or ``probs`` [N,K]. With the
    2015-12-05 network these are the 1008-way unbiased logits, exactly as torch-fidelity and
    StyleGAN2-ADA compute IS (the 8 unused classes get ~0 probability and do not matter).
    Splits are consecutive chunks in the given order, as in the original code.
    """
    if (logits is None) == (probs is None):
        raise ValueError("inception_score needs exactly one of logits= or probs=")
    as_numpy = lambda t: t.detach().cpu().double().numpy() if isinstance(t, Tensor) else np.asarray(t, np.float64)  # noqa: E731
    if logits is not None:
        p = torch.softmax(torch.from_numpy(as_numpy(logits)), dim=1).numpy()
    else:
        p = as_numpy(probs)
        if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError("probs rows must be non-negative and sum to 1; pass raw scores as logits=")
    if p.ndim != 2 or len(p) < splits:
        raise ValueError(f"inception_score needs [N,K] with N >= splits={splits}, got {p.shape}")
    scores = []
    for chunk in np.array_split(p, splits):
        p_y = chunk.mean(axis=0, keepdims=True)
        kl = (chunk * (np.log(chunk + 1e-12) - np.log(p_y + 1e-12))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------- precision / recall

def _knn_radii(features: Tensor, k: int, chunk_size: int) -> Tensor:
    """Distance from each sample to its k-th nearest other sample."""
    radii = []
    for start in range(0, len(features), chunk_size):
        d = torch.cdist(features[start:start + chunk_size], features)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # column 0 is the point itself
    return torch.cat(radii)


def _inside_manifold(queries: Tensor, refs: Tensor, radii: Tensor, chunk_size: int) -> Tensor:
    """Whether each query lies within the k-NN ball of at least one reference sample."""
    inside = []
    for start in range(0, len(queries), chunk_size):
        d = torch.cdist(queries[start:start + chunk_size], refs)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real_features: np.ndarray | Tensor, fake_features: np.ndarray | Tensor, k: int = 3,
                     chunk_size: int = 1024, device: torch.device | str | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) from k-NN manifolds.

    precision: fraction of fake samples inside the real manifold (union of balls around each
    real sample with radius = distance to its k-th nearest real neighbour); recall: fraction of
    real samples inside the fake manifold. Distances are computed ``chunk_size`` rows at a time,
    so 50k x 50k needs only chunk_size x 50k floats at once. ``device`` defaults to the device of
    tensor inputs (numpy inputs stay on torch's default device).

    Both numbers grow with k and with the number of samples (bigger balls, denser manifolds), so
    report k, len(real_features) and len(fake_features) with them; Kynkaanniemi et al. use k=3
    and 50k samples per set.
    """
    real = torch.as_tensor(real_features, dtype=torch.float32, device=device)
    fake = torch.as_tensor(fake_features, dtype=torch.float32, device=device or real.device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected [N,D] real and [M,D] fake features, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall needs more than k={k} samples in each set")
    real_radii = _knn_radii(real, k, chunk_size)
    fake_radii = _knn_radii(fake, k, chunk_size)
    precision = _inside_manifold(fake, real, real_radii, chunk_size).float().mean().item()
    recall = _inside_manifold(real, fake, fake_radii, chunk_size).float().mean().item()
    return precision, recall


# ---------------------------------------------------------------- error bars

@dataclass(frozen=True)
class Interval:
    """A mean with a confidence interval [low, high] from n values."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95


def _as_finite_vector(values: np.ndarray | Tensor | Sequence[float], name: str, min_n: int = 2) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) < min_n:
        raise ValueError(f"{name} must be a 1-D array of at least {min_n} values, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(values)).sum())} non-finite values; PSNR is inf for "
                         "identical images: cap it first (e.g. psnr(a, b).clamp(max=100)) or report those apart")
    return values


def bootstrap_interval(values: np.ndarray | Tensor | Sequence[float], resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> Interval:
    """Mean of per-image values (PSNR, SSIM, ...) with a percentile-bootstrap confidence interval.

    Resamples the values with replacement ``resamples`` times (scipy.stats.bootstrap, fixed seed)
    and takes the (1 - confidence)/2 and (1 + confidence)/2 quantiles of the resampled means.
    The interval covers sampling of images, not training noise: compare seeds with
    ``paired_difference``.
    """
    from scipy.stats import bootstrap

    x = _as_finite_vector(values, "values")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples} and {confidence}")
    # batch: resample ~4M values at a time, so 50k per-image values do not need 400 MB at once.
    result = bootstrap((x,), np.mean, n_resamples=resamples, confidence_level=confidence, method="percentile",
                       vectorized=True, batch=max(1, 4_000_000 // len(x)), rng=np.random.default_rng(seed))
    ci = result.confidence_interval
    return Interval(mean=float(x.mean()), low=float(ci.low), high=float(ci.high), n=len(x), confidence=confidence)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of a_i - b_i with a t confidence interval and the two-sided paired t-test p-value."""

    mean: float
    low: float
    high: float
    p_value: float
    n: int
    confidence: float = 0.95


def paired_difference(a: np.ndarray | Tensor | Sequence[float], b: np.ndarray | Tensor | Sequence[float],
                      confidence: float = 0.95) -> PairedDifference:
    """Compare two configurations run with the same seeds: a[i] and b[i] come from seed i.

    Pairing removes the seed-to-seed variation both share, so it detects smaller differences
    than comparing the two means. Student t with n - 1 degrees of freedom (scipy.stats.ttest_rel);
    it assumes the differences are roughly normal, which few seeds cannot check. When every
    difference is equal the spread is 0: p is 0 (or nan if they are all 0) and low == high.
    """
    from scipy.stats import ttest_rel

    x, y = _as_finite_vector(a, "a"), _as_finite_vector(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired_difference needs one b per a (same seeds), got {len(x)} and {len(y)} values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    with warnings.catch_warnings():
        # Zero spread: scipy warns about catastrophic cancellation and returns the limits we document.
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        result = ttest_rel(x, y)
        ci = result.confidence_interval(confidence_level=confidence)
    mean = float((x - y).mean())
    low, high = (float(ci.low), float(ci.high)) if np.isfinite(ci.low) else (mean, mean)
    return PairedDifference(mean=mean, low=low, high=high, p_value=float(result.pvalue), n=len(x),
                            confidence=confidence)


# ---------------------------------------------------------------- CLIP score

def _to_pil_list(images: np.ndarray | Tensor | Sequence) -> list:
    from PIL import Image

    if isinstance(images, (np.ndarray, Tensor)):
        arrays = _to_uint8_hwc(images)
        if arrays.ndim == 3 or arrays.shape[-1] == 1:
            arrays = np.repeat(arrays.reshape(*arrays.shape[:3], 1), 3, axis=-1)
        return [Image.fromarray(a) for a in arrays]
    return [img.convert("RGB") for img in images]  # already PIL images


@torch.no_grad()
def clip_score(images: np.ndarray | Tensor | Sequence, captions: Sequence[str], model_path: str | Path,
               batch_size: int = 64, device: torch.device | str | None = None) -> float:
    """CLIP score (Hessel et al. 2021): mean of 100 * max(cos(image, caption), 0).

    images: uint8 numpy [B,H,W,3], float tensor [B,3,H,W] in [0,1] or a list of PIL images,
    paired one-to-one with ``captions``. model_path: a local folder holding a CLIPModel and its
    CLIPProcessor (``save_pretrained`` output); nothing is downloaded. ``device`` defaults to
    the device of tensor images.
    """
    from transformers import CLIPModel, CLIPProcessor

    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP checkpoint at {model_path}: expected a folder written by "
                                "CLIPModel.save_pretrained and CLIPProcessor.save_pretrained")
    pil_images = _to_pil_list(images)
    if len(pil_images) != len(captions) or not captions:
        raise ValueError(f"clip_score needs one caption per image, got {len(pil_images)} images and {len(captions)} captions")
    if device is None:
        device = images.device if isinstance(images, Tensor) else torch.get_default_device()
    model = CLIPModel.from_pretrained(model_path, local_files_only=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(model_path, local_files_only=True)
    max_len = model.config.text_config.max_position_embeddings
    scores = []
    for start in range(0, len(captions), batch_size):
        inputs = processor(text=list(captions[start:start + batch_size]), images=pil_images[start:start + batch_size],
                           return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        outputs = model(**inputs.to(device))
        # CLIPModel returns L2-normalised embeddings, so the row-wise dot product is the cosine.
        cos = (outputs.image_embeds * outputs.text_embeds).sum(dim=-1)
        scores.append(100.0 * cos.clamp(min=0).float().cpu())
    return torch.cat(scores).mean().item()
