"""Inception features cached by image content, and the FID/KID computed on them."""

from __future__ import annotations

import numpy as np
import pytest

from models.metrics import feature_statistics, fid_from_statistics
from tasks.features import FeatureCache, frechet, kid
from tasks.store import Store


def test_frechet_equals_clean_fid_and_names_its_method():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 64)), rng.normal(loc=0.3, scale=1.5, size=(50, 64))
    value, method = frechet(real, fake)
    assert value == pytest.approx(fid_from_statistics(*feature_statistics(real), *feature_statistics(fake)), rel=1e-6)
    assert "low-rank" in method  # fewer samples than dimensions
    more, others = rng.normal(size=(80, 64)), rng.normal(size=(90, 64))
    value, method = frechet(more, others)
    assert value == pytest.approx(fid_from_statistics(*feature_statistics(more), *feature_statistics(others)), rel=1e-9)
    assert method == "clean-fid frechet_distance"
    assert frechet(real, real)[0] == pytest.approx(0.0, abs=1e-6)


def test_kid_has_a_spread_and_says_how_it_was_drawn():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(300, 16)), rng.normal(loc=0.5, size=(300, 16))
    distance, method = kid(real, fake, seed=0)
    assert distance.subset_size == 150 and distance.std > 0  # subsets of half the images differ
    assert method == "unbiased KID, cubic kernel, 100 subsets of 150"
    same, _ = kid(real, rng.normal(size=(300, 16)), seed=0)
    assert abs(same.mean) < distance.mean / 10


def test_feature_cache_computes_each_image_once(tmp_path, monkeypatch):
    import tasks.features as features

    calls: list[int] = []

    def fake_extract(batches, net, batch_size=64):
        images = np.concatenate([np.asarray(b) for b in batches])
        calls.append(len(images))
        return {"pool": images.reshape(len(images), -1)[:, :4].astype(np.float64) + 0.5}

    monkeypatch.setattr(features, "extract_features", fake_extract)
    store = Store(tmp_path / "store")
    images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    ids = [f"img{i}" for i in range(5)]
    cache = FeatureCache(store, "net.pt:abc")
    first = cache.features(ids[:3], images[:3], net=None)
    assert calls == [3]
    again = FeatureCache(store, "net.pt:abc")  # a later run, another process: reads the parts
    both = again.features(ids, images, net=None)
    assert calls == [3, 2] and again.computed == 2
    np.testing.assert_array_equal(both[:3], first)
    assert FeatureCache(store, "net.pt:abc").missing(ids) == []
    assert FeatureCache(store, "other.pt:def").missing(ids) == ids  # another network: its own features
    with pytest.raises(KeyError, match="2 of 6 images"):
        FeatureCache(store, "net.pt:abc").get([*ids, "x"][:4] + ["y", "z"])
