"""gFID against a reference batch in the ADM evaluator's .npz layout (a small synthetic one)."""

from __future__ import annotations

import numpy as np
import pytest

from models.inception import InceptionFeatures
from models.metrics import extract_features, feature_statistics, fid_from_statistics
from tasks.evaluate.reference_batch import centre_crop_resize, reference_from_npz
from tasks.features import extractor_id, frechet
from tasks.store import Store


@pytest.fixture(scope="module")
def net():
    return InceptionFeatures().eval()


def images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(count, 1, 1, 3))
    noise = rng.integers(-40, 40, size=(count, height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def test_centre_crop_keeps_the_middle_square():
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :3] = 255  # side bands the centre crop removes (beyond the Lanczos filter's reach)
    image[:, 57:] = 255
    out = centre_crop_resize(image, 20)
    assert out.shape == (20, 20, 3) and out.max() == 0
    assert centre_crop_resize(out, 20) is out


def test_image_batch_is_cropped_measured_by_our_network_and_cached(tmp_path, net):
    store = Store(tmp_path / "store")
    batch = images(6, 48, 64)
    path = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(path, arr_0=batch, mu=np.zeros(2048), sigma=np.eye(2048))  # ADM files also hold TF statistics
    stats, reference = reference_from_npz(path, 32, store, net, extractor_id(None))
    expected = extract_features([np.stack([centre_crop_resize(i, 32) for i in batch])], net)["pool"]
    np.testing.assert_allclose(stats.features, expected, atol=1e-5)  # the images, not the file's mu/sigma
    assert stats.count == 6 and "6 images, centre-cropped and resized to 32 px" in reference
    again, _ = reference_from_npz(path, 32, store, net, extractor_id(None))  # from the statistics cache
    np.testing.assert_array_equal(again.mu, stats.mu)


def test_precomputed_statistics_are_used_as_they_are(tmp_path):
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(60, 2048)), rng.normal(loc=0.2, size=(40, 2048))
    mu, sigma = feature_statistics(real)
    path = tmp_path / "stats_only.npz"
    np.savez(path, mu=mu, sigma=sigma)
    stats, reference = reference_from_npz(path, 32, Store(tmp_path / "store"), net=None, extractor="unused")
    assert stats.count == 0 and "precomputed mu/sigma" in reference
    value, method = frechet(stats.features, fake, stats.mu, stats.sigma)
    assert value == pytest.approx(fid_from_statistics(*feature_statistics(fake), mu, sigma))
    assert method == "clean-fid frechet_distance"


def test_bad_reference_files_say_what_they_hold(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, something=np.zeros(3))
    with pytest.raises(ValueError, match="expected 'arr_0'"):
        reference_from_npz(path, 32, Store(tmp_path / "store"), net=None, extractor="x")
    with pytest.raises(FileNotFoundError, match="reference_npz"):
        reference_from_npz(tmp_path / "missing.npz", 32, Store(tmp_path / "store"), net=None, extractor="x")
